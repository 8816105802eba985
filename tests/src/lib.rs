//! Helpers shared by the end-to-end tests: start real servers on `127.0.0.1:0`, connect clients,
//! and stop them by joining their tasks, so a server error fails the test.
#![forbid(unsafe_code)]

pub mod certs;
mod checks;
mod configs;
pub mod otlp;
pub mod process;
mod requests;
mod servers;
mod waits;

pub use self::{
    checks::{bad_request_fields, proper_refusal, sample},
    configs::{
        TEST_BLOCK_BYTES, TEST_DEVICE, TEST_MODELS, config_with_pools, mtls_memory_config, runtime_config,
        test_device,
    },
    requests::{alloc, generate_request, http_get, pb_duration, reflected_services, stats},
    servers::{MemoryServer, RuntimeServer, TestServer, runtimes_on, wait_serving},
    waits::{wait_for_used, wait_for_waiters},
};
