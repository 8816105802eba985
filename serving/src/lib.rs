//! Serving glue shared by memory-service and runtime-service: listeners, reflection and health,
//! shutdown signals, gRPC deadlines, telemetry (logs, traces, metrics), the config exit code, and
//! the device, model and default-model knowledge both size memory from.
#![forbid(unsafe_code)]

pub mod admin;
pub mod arch;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod details;
pub mod device;
pub mod echo;
pub mod grpc;
pub mod json_logs;
pub mod launch;
pub mod models;
pub mod observe;
pub mod propagation;
mod reload;
pub mod security;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod units;

/// Exit code for a configuration error (`EX_USAGE` in sysexits.h): the process exits with it
/// before binding any port.
pub const EXIT_CONFIG: i32 = 64;
