//! memory-service: the authority over named pools of simulated device memory, leased over gRPC.
#![forbid(unsafe_code)]

pub mod ledger;
