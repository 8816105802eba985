//! runtime-service: token generation streamed over gRPC from simulated engines, pipelining a CPU
//! stage with a GPU stage, with every byte of memory leased from memory-service.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod pipeline;
