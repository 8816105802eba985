//! runtime-service: one simulated GPU serving models, with tokens streamed over gRPC from a
//! continuous-batching engine core whose CPU stage prepares step N+1 while the GPU computes step
//! N, and every byte of memory leased from memory-service.
//!
//! [`roofline`] prices steps from real GPUs' and models' numbers, [`scheduler`] forms batches
//! and preempts over paged KV blocks, [`core`] runs the device loop, [`kv`] leases KV slabs,
//! [`kv_events`] numbers the prefix cache's changes for routers, [`mock_lm`] (the seed's mock
//! language models) makes up the words and tokenizes them, [`executor`] admits and cancels
//! generations, [`memory`] talks to memory-service, [`generate`] runs one call end to end, [`dialect`] serves the same
//! core as vLLM's gRPC engine protocol, and [`server::run`] serves it all.
#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod dialect;
pub mod error;
pub mod executor;
pub mod generate;
pub mod kv;
pub mod kv_events;
pub mod memory;
pub mod metrics;
pub mod mock_lm;
pub mod models;
pub mod offline;
pub mod rng;
pub mod roofline;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
mod supervisor;
pub mod tokenizer;

pub use config::Config;
pub use server::run;
