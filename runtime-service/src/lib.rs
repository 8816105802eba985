//! runtime-service: token generation streamed over gRPC from simulated engines, pipelining a CPU
//! stage with a GPU stage, with every byte of memory leased from memory-service.
//!
//! [`engine`] simulates the engines, [`pipeline`] overlaps their CPU and GPU stages,
//! [`executor`] admits and cancels generations, [`memory`] leases and renews memory,
//! [`generate`] runs one call end to end, and [`server::run`] serves it all.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod error;
pub mod executor;
pub mod generate;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod server;
pub mod service;
pub mod state;
mod supervisor;

pub use config::Config;
pub use server::run;
