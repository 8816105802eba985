//! memory-service: the authority over named pools of simulated device memory, leased over gRPC.
//!
//! [`ledger`] is the synchronous core; [`service`] is the gRPC shell around it; [`server::run`]
//! serves it on a listener until a shutdown future resolves.
#![forbid(unsafe_code)]

pub mod config;
pub mod ledger;
pub mod metrics;
mod reaper;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;

pub use config::Config;
pub use server::run;
