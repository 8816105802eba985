//! A published point's replay against in-process services on the calling runtime's clock: on
//! tokio's paused clock (the CI subset, the suite bench) the device's step times pass instantly
//! and are measured exactly. Shared by `tests/ci_subset.rs` and `benches/suite.rs`.

use std::sync::Arc;

use e2e::{MemoryServer, RuntimeServer, config_with_pools};
use fidelity::{ReplayOptions, ReplayReport, Target, published::Scenario};
use runtime_service::config::{Overrides, layered};
use serving::device::DeviceSpec;

/// The runtime-service command line the live suite gives a point ([`RuntimeSettings::flags`]),
/// parsed as the binary parses it: the virtual clock runs what `--live` runs, from one source.
///
/// [`RuntimeSettings::flags`]: fidelity::published::RuntimeSettings::flags
#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    settings: Overrides,
}

/// The runtime configuration the suite's flags stand for.
pub fn runtime_config(scenario: &Scenario, memory: std::net::SocketAddr) -> runtime_service::Config {
    let argv = std::iter::once("runtime-service".to_owned()).chain(scenario.runtime.flags());
    let flags = <Flags as clap::Parser>::try_parse_from(argv).expect("the suite's flags parse").settings;
    let mut config = layered(None, flags).expect("the suite's flags are valid").config;
    config.memory_addr = format!("http://{memory}");
    config.instance = "fidelity".into();
    config.serve_fitting_defaults().expect("defaults fit");
    config.validate().expect("valid");
    config
}

pub async fn replay(scenario: &Scenario) -> ReplayReport {
    let device = DeviceSpec::preset(&scenario.runtime.device).expect("a preset");
    let memory = MemoryServer::start(config_with_pools(&serving::models::pool_split(&device))).await;
    let runtime = RuntimeServer::start(runtime_config(scenario, memory.addr)).await;
    e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
    let target = Target::from_channels(vec![runtime.channel().await]).expect("a channel");
    let vocab = target.model_info().await.expect("GetModelInfo").vocab_size;
    let schedule = scenario.workload.expand(vocab).expect("expands");
    let run = target.replay(Arc::new(schedule), &ReplayOptions::default()).await.expect("replays");
    runtime.stop().await;
    memory.stop().await;
    ReplayReport::of_run(&run)
}
