//! A published point's replay against in-process services on the calling runtime's clock: on
//! tokio's paused clock (the CI subset, the suite bench) the device's step times pass instantly
//! and are measured exactly. Shared by `tests/ci_subset.rs`, `tests/offline.rs` and
//! `benches/suite.rs`; each uses part of it.
#![allow(dead_code)]

use std::sync::Arc;

use e2e::{MemoryServer, RuntimeServer, config_with_pools};
use fidelity::{ReplayOptions, ReplayReport, Run, Target, WorkloadSpec, published::Scenario, simulate};

/// The runtime configuration the suite's flags stand for ([`RuntimeSettings::flags`]), parsed
/// as the binary parses them: the virtual clock runs what `--live` runs, from one source.
///
/// [`RuntimeSettings::flags`]: fidelity::published::RuntimeSettings::flags
pub fn runtime_config(scenario: &Scenario) -> runtime_service::Config {
    simulate::runtime_config(None, scenario.runtime.flags(), None).expect("the suite's flags are valid")
}

/// Replays `scenario` through the live path: memory-service and runtime-service in-process,
/// the engine dialect over loopback gRPC.
pub async fn replay_run(scenario: &Scenario) -> Run {
    replay_config(runtime_config(scenario), &scenario.workload).await
}

/// Replays `workload` through the live path on a runtime configured by `config`.
pub async fn replay_config(mut config: runtime_service::Config, workload: &WorkloadSpec) -> Run {
    let memory = MemoryServer::start(config_with_pools(&serving::models::pool_split(&config.device))).await;
    config.memory_addr = format!("http://{}", memory.addr);
    config.instance = "fidelity".into();
    let runtime = RuntimeServer::start(config).await;
    e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
    let target = Target::from_channels(vec![runtime.channel().await]).expect("a channel");
    let vocab = target.model_info().await.expect("GetModelInfo").vocab_size;
    let schedule = workload.expand(vocab).expect("expands");
    let run = target.replay(Arc::new(schedule), &ReplayOptions::default()).await.expect("replays");
    runtime.stop().await;
    memory.stop().await;
    run
}

pub async fn replay(scenario: &Scenario) -> ReplayReport {
    ReplayReport::of_run(&replay_run(scenario).await)
}

/// Replays `scenario` on the offline simulator (no network), with the same configuration and
/// kv-cache pool.
pub async fn replay_offline(config: runtime_service::Config, workload: &WorkloadSpec) -> Run {
    let pool = simulate::default_kv_pool(&config);
    simulate::replay_offline(config, pool, workload, &ReplayOptions::default()).await.expect("replays")
}
