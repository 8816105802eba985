//! The TOML configuration file (`--config`): every key optional; `[[models]]` replace the embedded
//! list, `[[devices]]` add device presets that `device` may name.

use std::{path::Path, time::Duration};

use serde::Deserialize;

use super::{Config, ConfigError, ModelSpec};
use super::{KvReserve, SchedulerMode};
use serving::{arch::Arch, device::DeviceSpec};

use crate::engine::EngineKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    models: Vec<FileModel>,
    #[serde(default)]
    devices: Vec<DeviceSpec>,
    device: Option<String>,
    scheduler: Option<SchedulerMode>,
    max_batch_size: Option<usize>,
    max_batched_tokens: Option<u32>,
    queue_capacity: Option<usize>,
    kv_block_tokens: Option<u32>,
    kv_slab_blocks: Option<u64>,
    kv_low_watermark_blocks: Option<u64>,
    kv_idle_release_ms: Option<u64>,
    kv_reserve: Option<FileKvReserve>,
    prefix_caching: Option<bool>,
    kv_events_buffer: Option<usize>,
    jitter: Option<f64>,
    jitter_seed: Option<u64>,
    memory_wait_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    ttft_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_stream_lifetime_ms: Option<u64>,
    grace_period_ms: Option<u64>,
    transport: Option<serving::transport::Transport>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum FileKvReserve {
    Paged,
    Upfront,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    key: String,
    engine: EngineKind,
    #[serde(default)]
    preload: bool,
    /// An embedded architecture (`llama-3.1-8b`, ...); defaults to the key.
    preset: Option<String>,
    /// A full architecture instead of a preset.
    arch: Option<Arch>,
    max_tokens_limit: Option<u32>,
    max_prompt_tokens: Option<u32>,
    /// The user's own `tokenizer.json`.
    tokenizer: Option<std::path::PathBuf>,
}

fn models_of(file: Vec<FileModel>) -> Result<Vec<ModelSpec>, ConfigError> {
    file.into_iter()
        .map(|m| {
            let arch = Arch::for_model(&m.key, m.preset.as_deref(), m.arch).map_err(ConfigError::Invalid)?;
            // Defaults: the whole context for the prompt (capped), a quarter of it for the output.
            let context = arch.context_length;
            Ok(ModelSpec {
                key: m.key,
                engine: m.engine,
                preload: m.preload,
                max_tokens_limit: m.max_tokens_limit.unwrap_or((context / 4).clamp(1, 4096)),
                max_prompt_tokens: m.max_prompt_tokens.unwrap_or(context.min(8192)),
                arch,
                tokenizer: m.tokenizer,
            })
        })
        .collect()
}

/// Parses a `[[models]]` TOML document.
pub fn parse_models(text: &str) -> Result<Vec<ModelSpec>, ConfigError> {
    let file: File = toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: "<models>".to_owned(), message: e.to_string() })?;
    models_of(file.models)
}

/// Overlays the TOML file at `path` on `config`.
pub fn read_file(mut config: Config, path: &Path) -> Result<Config, ConfigError> {
    let file: File = serving::config::read_toml(path)?;
    if !file.models.is_empty() {
        config.models = models_of(file.models)?;
    }
    if let Some(name) = &file.device {
        config.device = find_device(name, &file.devices)?;
    } else if let [only] = file.devices.as_slice() {
        config.device = only.clone();
    }
    let ms = Duration::from_millis;
    config.scheduler = file.scheduler.unwrap_or(config.scheduler);
    config.max_batch_size = file.max_batch_size.unwrap_or(config.max_batch_size);
    config.max_batched_tokens = file.max_batched_tokens.unwrap_or(config.max_batched_tokens);
    config.queue_capacity = file.queue_capacity.unwrap_or(config.queue_capacity);
    config.kv_block_tokens = file.kv_block_tokens.unwrap_or(config.kv_block_tokens);
    config.kv_slab_blocks = file.kv_slab_blocks.unwrap_or(config.kv_slab_blocks);
    config.kv_low_watermark_blocks = file.kv_low_watermark_blocks.unwrap_or(config.kv_low_watermark_blocks);
    config.kv_idle_release = file.kv_idle_release_ms.map_or(config.kv_idle_release, ms);
    config.kv_reserve = match file.kv_reserve {
        Some(FileKvReserve::Paged) => KvReserve::Paged,
        Some(FileKvReserve::Upfront) => KvReserve::Upfront,
        None => config.kv_reserve,
    };
    config.prefix_caching = file.prefix_caching.unwrap_or(config.prefix_caching);
    config.kv_events_buffer = file.kv_events_buffer.unwrap_or(config.kv_events_buffer);
    config.jitter = file.jitter.unwrap_or(config.jitter);
    config.jitter_seed = file.jitter_seed.unwrap_or(config.jitter_seed);
    config.memory_wait = file.memory_wait_ms.map_or(config.memory_wait, ms);
    config.lease_ttl = file.lease_ttl_ms.map_or(config.lease_ttl, ms);
    config.ttft_timeout = file.ttft_timeout_ms.map_or(config.ttft_timeout, ms);
    config.idle_timeout = file.idle_timeout_ms.map_or(config.idle_timeout, ms);
    config.max_stream_lifetime = file.max_stream_lifetime_ms.map_or(config.max_stream_lifetime, ms);
    config.grace_period = file.grace_period_ms.map_or(config.grace_period, ms);
    if let Some(transport) = file.transport {
        config.security.transport = transport;
    }
    Ok(config)
}

/// Whether a config file lists `[[models]]` (then they replace the embedded defaults whole, and
/// are never trimmed to fit the device).
pub fn lists_models(path: &Path) -> Result<bool, ConfigError> {
    let file: File = serving::config::read_toml(path)?;
    Ok(!file.models.is_empty())
}

/// The devices a config file defines (for `--device` to name one of them).
pub fn defined_devices(path: &Path) -> Result<Vec<DeviceSpec>, ConfigError> {
    let file: File = serving::config::read_toml(path)?;
    Ok(file.devices)
}

/// The device called `name`: one the file defines, else an embedded preset.
pub fn find_device(name: &str, defined: &[DeviceSpec]) -> Result<DeviceSpec, ConfigError> {
    defined.iter().find(|d| d.name == name).cloned().or_else(|| DeviceSpec::preset(name)).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "no device {name:?}; use one of {} or define it under [[devices]]",
            DeviceSpec::preset_names().join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_defines_a_device_and_models_by_preset_or_architecture() {
        let dir = std::env::temp_dir().join(format!("runtime-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("runtime.toml");
        std::fs::write(
            &path,
            r#"
device = "tiny"
scheduler = "sequential"
kv_reserve = "upfront"
[[devices]]
name = "tiny"
memory_bytes = 1073741824
bandwidth_bytes_per_s = 1e9
flops_per_s = 1e12
bandwidth_efficiency = 1.0
flops_efficiency = 1.0
launch_overhead_s = 0.002
cpu_per_step_s = 0.002
cpu_per_seq_s = 0.0
[[models]]
key = "llama-3.2-1b"
engine = "webllm"
[[models]]
key = "toy"
engine = "transformers-js"
max_tokens_limit = 64
[models.arch]
parameters = 1000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 256
dtype_bytes = 1
context_length = 512
"#,
        )
        .expect("write config");
        let config = read_file(Config::default(), &path).expect("parses");
        std::fs::remove_dir_all(&dir).ok();
        config.validate().expect("valid");
        assert_eq!(config.device.name, "tiny");
        assert_eq!(config.scheduler, SchedulerMode::Sequential);
        assert_eq!(config.kv_reserve, KvReserve::Upfront);
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[1].arch.kv_bytes_per_token(), 2 * 2 * 2 * 32);
        assert!(find_device("h200", &[]).is_err());
    }

    #[test]
    fn the_example_file_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/runtime-service.toml");
        let config = read_file(Config::default(), &path).expect("the example parses");
        config.validate().expect("the example is valid");
        assert_eq!(config.device.name, "h100-sxm");
        assert_eq!(defined_devices(&path).expect("devices").len(), 1);
        assert_eq!(config.models.len(), 2);
    }
}
