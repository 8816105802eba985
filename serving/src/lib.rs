//! Serving glue shared by memory-service and runtime-service: listeners, reflection and health,
//! shutdown signals, gRPC deadlines, logging and the config exit code.
#![forbid(unsafe_code)]

pub mod deadline;
pub mod grpc;
pub mod logging;
pub mod shutdown;
pub mod units;

/// Exit code for a configuration error (`EX_USAGE` in sysexits.h): the process exits with it
/// before binding any port.
pub const EXIT_CONFIG: i32 = 64;
