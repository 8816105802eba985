//! The configs the tests start servers with: memory-service with given pools (plain or with
//! mutual TLS), runtime-service on the test models and the test device, whose round numbers let
//! a step time be checked by hand.

use std::{net::SocketAddr, time::Duration};

use memory_service::Config;

use crate::certs;

/// Default config with the given pools.
pub fn config_with_pools(pools: &[(&str, u64)]) -> Config {
    Config {
        pools: pools
            .iter()
            .map(|(name, capacity)| memory_service::config::PoolSpec {
                name: (*name).into(),
                capacity: *capacity,
            })
            .collect(),
        ..Config::default()
    }
}

/// Test models: tiny architectures, so steps are quick and memory footprints small. On
/// [`test_device`] a decode step of `test-webllm` reads 1 MB of weights at 1 GB/s (1 ms) plus a
/// 2 ms launch, about 3 ms; its CPU stage costs 2 ms per step. KV: 256 bytes per token, so a
/// 16-token block is 4 KiB.
pub const TEST_MODELS: &str = r#"
[[models]]
key = "test-webllm"
mock_lm = "webllm"
preload = true
max_tokens_limit = 512
max_prompt_tokens = 256
[models.arch]
parameters = 1000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 128
dtype_bytes = 1
context_length = 4096

[[models]]
key = "test-tjs"
mock_lm = "transformers-js"
preload = false
max_tokens_limit = 512
max_prompt_tokens = 256
[models.arch]
parameters = 2000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 128
dtype_bytes = 1
context_length = 4096
"#;

/// The test device in config-file form (for child processes), selected by `device = "test-gpu"`.
pub const TEST_DEVICE: &str = r#"
device = "test-gpu"
jitter = 0.0
kv_idle_release_ms = 0
kv_slab_blocks = 16
[[devices]]
name = "test-gpu"
memory_bytes = 1073741824
bandwidth_bytes_per_s = 1e9
flops_per_s = 1e12
bandwidth_efficiency = 1.0
flops_efficiency = 1.0
launch_overhead_s = 0.002
cpu_per_step_s = 0.002
cpu_per_seq_s = 0.0
"#;

/// The test device: round numbers, so step times can be checked by hand.
pub fn test_device() -> serving::device::DeviceSpec {
    serving::device::DeviceSpec {
        name: "test-gpu".into(),
        memory_bytes: 1 << 30,
        bandwidth_bytes_per_s: 1e9,
        flops_per_s: 1e12,
        bandwidth_efficiency: 1.0,
        flops_efficiency: 1.0,
        kv_bandwidth_efficiency: None,
        attention_flops_efficiency: None,
        launch_overhead_s: 0.002,
        cpu_per_step_s: 0.002,
        cpu_per_seq_s: 0.0,
        cpu_per_prompt_token_s: 0.0,
        frontend_s: 0.0,
    }
}

/// Bytes of one KV block of the test models (16 tokens × 256 bytes).
pub const TEST_BLOCK_BYTES: u64 = 4096;

/// A runtime config pointing at `memory` with the test models on the test device, no jitter,
/// 16-block slabs returned as soon as a model falls idle, and the prefix cache off: it would keep
/// an idle model's slabs as cache, and most tests check that memory comes back (the prefix-cache
/// tests turn it on).
pub fn runtime_config(memory: SocketAddr) -> runtime_service::Config {
    runtime_service::Config {
        memory_addr: format!("http://{memory}"),
        instance: "test-runtime".into(),
        device: test_device(),
        models: runtime_service::config::parse_models(TEST_MODELS).expect("test models parse"),
        jitter: 0.0,
        kv_idle_release: Duration::ZERO,
        kv_slab_blocks: 16,
        prefix_caching: false,
        ..runtime_service::Config::default()
    }
}

/// A memory-service config with the test pools and mutual TLS from `ca` (server certificate for
/// `localhost`, files written to `dir`).
pub fn mtls_memory_config(pools: &[(&str, u64)], ca: &certs::TestCa, dir: &certs::TempDir) -> Config {
    let server = ca.issue("memory-service");
    let mut config = config_with_pools(pools);
    config.security.tls = Some(serving::tls::TlsFiles {
        cert: dir.write("memory.crt", &server.cert),
        key: dir.write("memory.key", &server.key),
        client_ca: Some(dir.write("ca.crt", &ca.cert_pem())),
    });
    config
}
