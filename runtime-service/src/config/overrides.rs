//! The settings a TOML file (`--config`) and the command line may both set, written once: the file
//! deserializes into [`Overrides`], the flags parse into another, and [`layered`] lays the file
//! over the defaults and the flags over the file. A setting added here is a file key, a flag and
//! an environment variable at once, with one help text.

use std::{path::Path, time::Duration};

use serde::Deserialize;
use serving::device::DeviceSpec;

use super::file::{FileModel, models_of};
use super::{Config, ConfigError, KvReserve, SchedulerMode, TimeScale};

/// Every field optional: `None` keeps what the layer below said.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Models that replace the embedded list (file only: `[[models]]`).
    #[arg(skip)]
    #[serde(default)]
    pub(super) models: Vec<FileModel>,
    /// Devices `device` may name besides the presets (file only: `[[devices]]`).
    #[arg(skip)]
    #[serde(default)]
    pub(super) devices: Vec<DeviceSpec>,
    /// Simulated device: an embedded preset (h100-sxm, a100-80gb, a100-40gb, l40s, l4, webgpu-laptop) or one
    /// defined under [[devices]] in the config file.
    #[arg(long, env = "RUNTIME_DEVICE")]
    pub device: Option<String>,
    /// Model served over the engine dialect (vllm.grpc.engine.VllmEngine, whose requests name no
    /// model): a configured model key. Default: the first preloaded model.
    #[arg(long, env = "RUNTIME_ENGINE_MODEL")]
    pub engine_model: Option<String>,
    /// CPU/GPU scheduling of the device: "overlapped" (the CPU prepares step N+1 while the GPU
    /// computes step N) or "sequential".
    #[arg(long, env = "RUNTIME_SCHEDULER")]
    pub scheduler: Option<SchedulerMode>,
    /// Sequences in one device step at most.
    #[arg(long, env = "RUNTIME_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Tokens computed in one step at most; prompts are chunked to fit.
    #[arg(long, env = "RUNTIME_MAX_BATCHED_TOKENS")]
    pub max_batched_tokens: Option<u32>,
    /// Generations admitted beyond a full batch before new ones are refused.
    #[arg(long, env = "RUNTIME_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "RUNTIME_KV_BLOCK_TOKENS")]
    pub kv_block_tokens: Option<u32>,
    /// Largest kv-cache slab leased from memory-service at once, in blocks.
    #[arg(long, env = "RUNTIME_KV_SLAB_BLOCKS")]
    pub kv_slab_blocks: Option<u64>,
    /// Free KV blocks kept ahead of need while a model has sequences.
    #[arg(long, env = "RUNTIME_KV_LOW_WATERMARK_BLOCKS")]
    pub kv_low_watermark_blocks: Option<u64>,
    /// How long a model's idle kv-cache slabs are kept after its last sequence, in milliseconds.
    #[arg(long, env = "RUNTIME_KV_IDLE_RELEASE_MS")]
    pub kv_idle_release_ms: Option<u64>,
    /// How KV memory is taken: "paged" (blocks as sequences grow) or "upfront" (prompt +
    /// max_tokens at admission, for comparison).
    #[arg(long, env = "RUNTIME_KV_RESERVE")]
    pub kv_reserve: Option<KvReserve>,
    /// Prefix caching, "on" (the default, as vLLM V1) or "off" (true or false in the file): full
    /// prompt blocks stay cached and later prompts that start the same way compute only the rest.
    #[arg(long, env = "RUNTIME_PREFIX_CACHING", value_parser = on_off)]
    pub prefix_caching: Option<bool>,
    /// Chunked prefill, "on" (the default, as vLLM V1 and SGLang) or "off" (vLLM V0's default): off,
    /// a step either prefills whole prompts, waiting ones first, or decodes, and each model's
    /// longest prompt is capped at --max-batched-tokens, as vLLM caps max_model_len.
    #[arg(long, env = "RUNTIME_CHUNKED_PREFILL", value_parser = on_off)]
    pub chunked_prefill: Option<bool>,
    /// Decode steps run back to back per schedule, admitting nobody in between, 1 to 64 (vLLM
    /// 0.6's --num-scheduler-steps: fewer schedules, later admissions). Default 1.
    #[arg(long, env = "RUNTIME_DECODE_STEPS")]
    pub decode_steps: Option<u32>,
    /// Prefix-cache event batches kept per model, so a router that reconnects resumes without a
    /// gap (SubscribeKvEvents' start_sequence_number).
    #[arg(long, env = "RUNTIME_KV_EVENTS_BUFFER")]
    pub kv_events_buffer: Option<usize>,
    /// Relative jitter of simulated step times, 0 to 1 (seeded: runs repeat exactly).
    #[arg(long, env = "RUNTIME_JITTER")]
    pub jitter: Option<f64>,
    /// Seed of the jitter: the same seed repeats the same step times.
    #[arg(long, env = "RUNTIME_JITTER_SEED")]
    pub jitter_seed: Option<u64>,
    /// Server-side wait for memory per attempt, in milliseconds.
    #[arg(long, env = "RUNTIME_MEMORY_WAIT_MS")]
    pub memory_wait_ms: Option<u64>,
    /// TTL of this instance's memory leases, in milliseconds.
    #[arg(long, env = "RUNTIME_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Longest time to the first token, in milliseconds.
    #[arg(long, env = "RUNTIME_TTFT_TIMEOUT_MS")]
    pub ttft_timeout_ms: Option<u64>,
    /// Longest gap between two tokens, in milliseconds.
    #[arg(long, env = "RUNTIME_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Longest stream, in milliseconds.
    #[arg(long, env = "RUNTIME_MAX_STREAM_LIFETIME_MS")]
    pub max_stream_lifetime_ms: Option<u64>,
    /// How many times faster than real time the device runs (1 to 1000): step times are slept
    /// that much shorter and every reported duration is simulated time. Lease TTLs, memory waits
    /// and stream timeouts stay wall-clock. The host's timers tick every millisecond, so a single
    /// event may be seen up to N ms (simulated) late; rates and means are not biased.
    #[arg(long, env = "RUNTIME_TIME_SCALE")]
    pub time_scale: Option<TimeScale>,
    /// Time given to streams and memory release at shutdown, in milliseconds.
    #[arg(long, env = "RUNTIME_GRACE_PERIOD_MS")]
    pub grace_period_ms: Option<u64>,
    /// Transport limits (file only: the flags set TLS and tokens instead).
    #[arg(skip)]
    pub(super) transport: Option<serving::transport::Transport>,
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{value:?} must be \"on\" or \"off\"")),
    }
}

/// A configuration laid in layers, and what the layers said that the caller still needs.
#[derive(Debug)]
pub struct Layered {
    /// Defaults, then the file, then the flags.
    pub config: Config,
    /// Whether the file lists `[[models]]`: then they replace the embedded defaults whole and are
    /// never trimmed to fit the device.
    pub lists_models: bool,
}

/// The defaults, the TOML file at `file` (if any) over them, and `flags` over both. `flags.device`
/// may name a device the file defines.
pub fn layered(file: Option<&Path>, flags: Overrides) -> Result<Layered, ConfigError> {
    let from_file: Overrides = match file {
        Some(path) => serving::config::read_toml(path)?,
        None => Overrides::default(),
    };
    let lists_models = !from_file.models.is_empty();
    let defined = from_file.devices.clone();
    let config = from_file.apply(Config::default(), &[])?;
    let mut config = flags.apply(config, &defined)?;
    config.fit_prompts_to_one_step();
    Ok(Layered { config, lists_models })
}

impl Overrides {
    /// Lays these settings over `config`. A device is looked up among the ones these settings
    /// define, then `defined` (a lower layer's), then the presets; a sole defined device is the
    /// device when none is named.
    pub fn apply(self, mut config: Config, defined: &[DeviceSpec]) -> Result<Config, ConfigError> {
        if !self.models.is_empty() {
            config.models = models_of(self.models)?;
        }
        let devices: Vec<DeviceSpec> = self.devices.iter().chain(defined).cloned().collect();
        if let Some(name) = &self.device {
            config.device = find_device(name, &devices)?;
        } else if let [only] = self.devices.as_slice() {
            config.device = only.clone();
        }
        let ms = Duration::from_millis;
        config.engine_model = self.engine_model.or(config.engine_model);
        config.scheduler = self.scheduler.unwrap_or(config.scheduler);
        config.max_batch_size = self.max_batch_size.unwrap_or(config.max_batch_size);
        config.max_batched_tokens = self.max_batched_tokens.unwrap_or(config.max_batched_tokens);
        config.queue_capacity = self.queue_capacity.unwrap_or(config.queue_capacity);
        config.kv_block_tokens = self.kv_block_tokens.unwrap_or(config.kv_block_tokens);
        config.kv_slab_blocks = self.kv_slab_blocks.unwrap_or(config.kv_slab_blocks);
        config.kv_low_watermark_blocks =
            self.kv_low_watermark_blocks.unwrap_or(config.kv_low_watermark_blocks);
        config.kv_idle_release = self.kv_idle_release_ms.map_or(config.kv_idle_release, ms);
        config.kv_reserve = self.kv_reserve.unwrap_or(config.kv_reserve);
        config.prefix_caching = self.prefix_caching.unwrap_or(config.prefix_caching);
        config.chunked_prefill = self.chunked_prefill.unwrap_or(config.chunked_prefill);
        config.decode_steps = self.decode_steps.unwrap_or(config.decode_steps);
        config.kv_events_buffer = self.kv_events_buffer.unwrap_or(config.kv_events_buffer);
        config.jitter = self.jitter.unwrap_or(config.jitter);
        config.jitter_seed = self.jitter_seed.unwrap_or(config.jitter_seed);
        config.memory_wait = self.memory_wait_ms.map_or(config.memory_wait, ms);
        config.lease_ttl = self.lease_ttl_ms.map_or(config.lease_ttl, ms);
        config.ttft_timeout = self.ttft_timeout_ms.map_or(config.ttft_timeout, ms);
        config.idle_timeout = self.idle_timeout_ms.map_or(config.idle_timeout, ms);
        config.max_stream_lifetime = self.max_stream_lifetime_ms.map_or(config.max_stream_lifetime, ms);
        config.grace_period = self.grace_period_ms.map_or(config.grace_period, ms);
        config.time_scale = self.time_scale.unwrap_or(config.time_scale);
        if let Some(transport) = self.transport {
            config.security.transport = transport;
        }
        Ok(config)
    }
}

/// The device called `name`: one of `defined`, else an embedded preset.
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
    fn flags_override_the_file_which_overrides_the_defaults() {
        let dir = std::env::temp_dir().join(format!("runtime-overrides-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("runtime.toml");
        let mut tiny = DeviceSpec::preset("l4").expect("preset");
        tiny.name = "tiny".into();
        tiny.frontend_s = 0.0; // the file leaves it at its default
        std::fs::write(
            &path,
            "max_batch_size = 512\njitter_seed = 7\nkv_reserve = \"upfront\"\n[[devices]]\nname = \"tiny\"\n\
             memory_bytes = 25769803776\nbandwidth_bytes_per_s = 3e11\nflops_per_s = 1.21e14\n\
             bandwidth_efficiency = 0.8\nflops_efficiency = 0.5\nlaunch_overhead_s = 0.0005\n\
             cpu_per_step_s = 0.001\ncpu_per_seq_s = 0.000025\n",
        )
        .expect("write");
        let flags =
            Overrides { max_batch_size: Some(64), device: Some("tiny".into()), ..Overrides::default() };
        let layered = layered(Some(&path), flags).expect("layers");
        std::fs::remove_dir_all(&dir).ok();
        let config = layered.config;
        assert_eq!(config.max_batch_size, 64, "the flag wins");
        assert_eq!(config.jitter_seed, 7, "the file wins over the default");
        assert_eq!(config.kv_reserve, KvReserve::Upfront);
        assert_eq!(config.device, tiny, "a flag names a device the file defines");
        assert_eq!(config.max_batched_tokens, Config::default().max_batched_tokens);
        assert!(!layered.lists_models);
    }
}
