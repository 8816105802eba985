//! The offline path: a runtime configuration from the same flags runtime-service takes, and a
//! replay on the offline simulator's device (no network) instead of a live service.

use std::{path::Path, sync::Arc};

use runtime_service::{
    Config,
    config::{Overrides, layered},
    offline::Offline,
};

use crate::{ReplayOptions, Run, Target, WorkloadSpec};

/// runtime-service's flags, parsed as its binary parses them.
#[derive(Debug, clap::Parser)]
struct Flags {
    #[command(flatten)]
    settings: Overrides,
}

/// What runtime-service would run with these flags (and `file`, its `--config`), and then
/// `extra` laid over them: defaults → file → `flags` → `extra`. The engine model's defaults are
/// fitted to the device as the service fits them at start-up.
pub fn runtime_config(
    file: Option<&Path>,
    flags: impl IntoIterator<Item = String>,
    extra: Option<Overrides>,
) -> Result<Config, String> {
    let argv = std::iter::once("runtime-service".to_owned()).chain(flags);
    let flags = <Flags as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?.settings;
    let mut config = layered(file, flags).map_err(|e| e.to_string())?.config;
    if let Some(extra) = extra {
        config = extra.apply(config, &[]).map_err(|e| e.to_string())?;
        config.fit_prompts_to_one_step();
    }
    config.serve_fitting_defaults().map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The kv-cache pool memory-service gives a device by default ([`serving::models::pool_split`]):
/// what a replay against the suite's services has, so the offline device gets the same.
pub fn default_kv_pool(config: &Config) -> u64 {
    let [(_, kv), ..] = serving::models::pool_split(&config.device);
    kv
}

/// Replays `workload` on an offline device configured by `config` with a kv-cache pool of
/// `pool_bytes`, on the calling runtime's clock (run it on tokio's paused clock to go faster
/// than real time), and stops the device.
pub async fn replay_offline(
    config: Config,
    pool_bytes: u64,
    workload: &WorkloadSpec,
    options: &ReplayOptions,
) -> Result<Run, String> {
    let offline = Arc::new(Offline::start(config, Some(pool_bytes)).map_err(|e| e.to_string())?);
    let target = Target::offline(offline.clone());
    let vocab = offline.engine_model().vocab_size();
    let schedule = workload.expand(vocab).map_err(|e| e.to_string())?;
    let run = target.replay(Arc::new(schedule), options).await.map_err(|e| e.to_string());
    drop(target);
    if let Ok(offline) = Arc::try_unwrap(offline) {
        offline.stop().await;
    }
    run
}
