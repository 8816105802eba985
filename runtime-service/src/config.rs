//! Validated configuration: the device, its models, the scheduler, KV paging, the memory-service
//! address and the stream limits. `main.rs` builds it from flags, environment and an optional TOML
//! file; tests build it directly.

mod engine_model;
mod file;
mod fit;
mod kinds;
mod lease_ttl;
mod models;
mod overrides;

pub use self::lease_ttl::MIN_LEASE_TTL;

use std::time::Duration;

pub use serving::config::ConfigError;

pub use self::file::parse_models;
pub use self::kinds::{KvReserve, SchedulerMode, TimeScale};
pub use self::models::ModelSpec;
pub use self::overrides::{Layered, Overrides, find_device, layered};
use serving::device::DeviceSpec;

/// Longest instance name: it prefixes every memory-service scope this runtime takes, whole,
/// within memory-service's 128-character limit (a long model key is shortened in the scope
/// instead).
pub const MAX_INSTANCE: usize = 48;
/// Longest name inside a scope (request id, model key).
pub const MAX_SCOPE_NAME: usize = 64;

/// Largest token limit a model may set (prompt or completion).
pub const MAX_TOKENS: u32 = 1 << 20;

/// Models served when no config file names any (those of them that fit the device): the list
/// memory-service sizes its pools for, so it lives in `serving`.
pub use serving::models::DEFAULT_MODELS;

/// Device simulated when none is named.
pub const DEFAULT_DEVICE: &str = "h100-sxm";

/// Everything runtime-service needs, checked by [`Config::validate`] before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// memory-service endpoint (`http://host:port`).
    pub memory_addr: String,
    /// Holder name on memory leases: identifies this instance in memory-service events.
    pub instance: String,
    /// The simulated device.
    pub device: DeviceSpec,
    /// Models.
    pub models: Vec<ModelSpec>,
    /// Key of the model the engine dialect (`vllm.grpc.engine.VllmEngine`, which names no
    /// model) serves; `None`: the first preloaded model, else the first.
    pub engine_model: Option<String>,
    /// Overlapped or sequential CPU/GPU scheduling, for the whole device.
    pub scheduler: SchedulerMode,
    /// Sequences in one step at most (vLLM's `max_num_seqs`).
    pub max_batch_size: usize,
    /// Tokens computed in one step at most (vLLM's `max_num_batched_tokens`): decodes count one
    /// each, prompts are chunked to fit.
    pub max_batched_tokens: u32,
    /// Generations admitted beyond a full batch before new ones are shed with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Tokens per KV block.
    pub kv_block_tokens: u32,
    /// Largest kv-cache slab leased at once, in blocks.
    pub kv_slab_blocks: u64,
    /// Free blocks kept ahead of need while a model has sequences.
    pub kv_low_watermark_blocks: u64,
    /// How long a model's idle slabs are kept after its last sequence leaves.
    pub kv_idle_release: Duration,
    /// Paged (blocks as sequences grow) or up-front (prompt + max_tokens at admission).
    pub kv_reserve: KvReserve,
    /// Whether full prompt blocks stay cached for later sequences (vLLM V1's default: on).
    pub prefix_caching: bool,
    /// Whether prompts are chunked to the token budget and mixed with decodes (vLLM V1's and
    /// SGLang's way); off, a step prefills whole prompts or decodes, as vLLM V0 did by default.
    pub chunked_prefill: bool,
    /// Decode steps run back to back per schedule, admitting nobody in between (vLLM 0.6's
    /// multi-step scheduling); 1, the default, schedules every step.
    pub decode_steps: u32,
    /// Prefix-cache event batches kept per model for subscribers that resume (vLLM's
    /// `buffer_steps`).
    pub kv_events_buffer: usize,
    /// Relative jitter of step times, 0 to 1.
    pub jitter: f64,
    /// Seed of that jitter: the same seed repeats the same timings.
    pub jitter_seed: u64,
    /// Simulated seconds per wall second of the device.
    pub time_scale: TimeScale,
    /// Server-side wait for memory per Allocate (the seed's 500 ms deadlock detector).
    pub memory_wait: Duration,
    /// Budget to reach memory-service per call; past it the call fails UNAVAILABLE.
    pub memory_timeout: Duration,
    /// TTL of this service's leases; a keep-alive stream renews them every third of it.
    pub lease_ttl: Duration,
    /// Longest time from the call to its first token.
    pub ttft_timeout: Duration,
    /// Longest gap between two tokens.
    pub idle_timeout: Duration,
    /// Longest stream.
    pub max_stream_lifetime: Duration,
    /// Delay suggested to shed callers (RetryInfo).
    pub retry_hint: Duration,
    /// How long shutdown waits for streams to end and memory to be returned.
    pub grace_period: Duration,
    /// TLS, tokens and transport limits of this service's own gRPC port.
    pub security: serving::security::Security,
    /// How this service proves itself to memory-service.
    pub memory_auth: MemoryAuth,
}

/// Credentials for the hop to memory-service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryAuth {
    /// PEM CA that signed memory-service's certificate: turns TLS on (the address must then be
    /// `https://`).
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub tls_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// File holding the bearer token presented to memory-service.
    pub token_file: Option<std::path::PathBuf>,
    /// How often the CA and client certificate are checked for changes (used from the next
    /// connection on).
    pub tls_reload: Duration,
}

impl Default for MemoryAuth {
    fn default() -> Self {
        MemoryAuth {
            tls_ca: None,
            tls_identity: None,
            token_file: None,
            tls_reload: serving::tls::RELOAD_INTERVAL,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory_addr: "http://127.0.0.1:50051".into(),
            instance: "runtime-service".into(),
            device: DeviceSpec::preset(DEFAULT_DEVICE).unwrap_or_else(|| unreachable!("embedded preset")),
            models: parse_models(DEFAULT_MODELS).unwrap_or_default(),
            engine_model: None,
            scheduler: SchedulerMode::Overlapped,
            max_batch_size: 256,
            max_batched_tokens: serving::models::DEFAULT_MAX_BATCHED_TOKENS,
            queue_capacity: 1024,
            kv_block_tokens: 16,
            kv_slab_blocks: 64,
            kv_low_watermark_blocks: 8,
            kv_idle_release: Duration::from_secs(1),
            kv_reserve: KvReserve::Paged,
            prefix_caching: true,
            kv_events_buffer: 10_000,
            jitter: 0.02,
            jitter_seed: 0x5EED,
            time_scale: TimeScale::REAL,
            chunked_prefill: true,
            decode_steps: 1,
            memory_wait: Duration::from_millis(500),
            memory_timeout: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(30),
            ttft_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            max_stream_lifetime: Duration::from_secs(600),
            retry_hint: Duration::from_millis(500),
            grace_period: Duration::from_secs(10),
            security: serving::security::Security::default(),
            memory_auth: MemoryAuth::default(),
        }
    }
}

impl Config {
    /// The serving front end's own time per request (vLLM's API server, another process), in
    /// wall time: it delays a request without holding the device.
    pub fn frontend_delay(&self) -> Duration {
        self.time_scale.to_wall(Duration::from_secs_f64(self.device.frontend_s))
    }

    /// Activation bytes the device reserves: one buffer per step for the largest batch of the
    /// hungriest model, twice (double buffering: step N+1 is built while step N runs). The same
    /// formula memory-service sizes its `activations` pool with.
    pub fn activation_bytes(&self) -> u64 {
        serving::models::activation_bytes(self.models.iter().map(|m| &m.arch), self.max_batched_tokens)
    }

    /// Checks every value; the first problem found is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let uri: Result<tonic::transport::Uri, _> = self.memory_addr.parse();
        match uri {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => {
                return invalid(format!(
                    "memory address {:?} must look like http://host:port",
                    self.memory_addr
                ));
            }
        }
        // The instance name prefixes every memory scope; longer names would push scopes past
        // memory-service's 128-character limit and no model could ever load.
        let max_instance = MAX_INSTANCE;
        if self.instance.is_empty()
            || self.instance.chars().count() > max_instance
            || self.instance.chars().any(|c| c.is_control() || c == '/')
        {
            return invalid(format!(
                "instance name {:?} must be 1 to {max_instance} printable characters without '/'",
                self.instance
            ));
        }
        self.device.validate().map_err(ConfigError::Invalid)?;
        self.validate_models()?;
        self.validate_fit()?;
        if !(1..=4096).contains(&self.max_batch_size) {
            return invalid(format!("max batch size {} must be between 1 and 4096", self.max_batch_size));
        }
        if !(1..=1 << 20).contains(&self.max_batched_tokens) {
            return invalid(format!(
                "max batched tokens {} must be between 1 and 1048576",
                self.max_batched_tokens
            ));
        }
        if (self.max_batched_tokens as usize) < self.max_batch_size {
            return invalid(format!(
                "max batched tokens {} must be at least max batch size {}: a full batch of decodes is one token each",
                self.max_batched_tokens, self.max_batch_size
            ));
        }
        if self.queue_capacity > 1_000_000 {
            return invalid(format!("queue capacity {} must be at most 1000000", self.queue_capacity));
        }
        if !(1..=1024).contains(&self.kv_block_tokens) {
            return invalid(format!("KV block tokens {} must be between 1 and 1024", self.kv_block_tokens));
        }
        if !(1..=1 << 20).contains(&self.kv_slab_blocks) || self.kv_low_watermark_blocks > 1 << 20 {
            return invalid(
                "KV slab blocks must be between 1 and 1048576 and the low watermark at most that".into(),
            );
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return invalid(format!("jitter {} must be between 0 and 1", self.jitter));
        }
        // What memory-service accepts (TTL, wait) is its own configuration: the runtime checks
        // against what it advertises when it connects (see `supervisor`), not fixed numbers.
        if self.lease_ttl > Duration::from_secs(86_400) || self.memory_wait > Duration::from_secs(86_400) {
            return invalid("lease TTL and memory wait must be at most a day".into());
        }
        if self.memory_auth.tls_identity.is_some() && self.memory_auth.tls_ca.is_none() {
            return invalid("--memory-tls-cert and --memory-tls-key need --memory-tls-ca".into());
        }
        if self.memory_auth.tls_ca.is_some() && !self.memory_addr.starts_with("https://") {
            return invalid(format!(
                "with --memory-tls-ca the memory address must be https://, got {:?}",
                self.memory_addr
            ));
        }
        if !(1..=64).contains(&self.decode_steps) {
            return invalid(format!("decode steps {} must be between 1 and 64", self.decode_steps));
        }
        if !self.chunked_prefill
            && let Some(m) = self.models.iter().find(|m| m.max_prompt_tokens > self.max_batched_tokens)
        {
            return invalid(format!(
                "with chunked prefill off a prompt is computed in one step: model {:?} accepts prompts of {} \
                 tokens but --max-batched-tokens is {}; raise it or lower the model's max_prompt_tokens",
                m.key, m.max_prompt_tokens, self.max_batched_tokens
            ));
        }
        self.security.transport.validate().map_err(ConfigError::Invalid)?;
        self.validate_lease_ttl()?;
        for (name, d) in [
            ("lease TTL", self.lease_ttl),
            ("memory timeout", self.memory_timeout),
            ("TTFT timeout", self.ttft_timeout),
            ("idle timeout", self.idle_timeout),
            ("max stream lifetime", self.max_stream_lifetime),
        ] {
            if d < Duration::from_millis(10) {
                return invalid(format!("{name} {d:?} must be at least 10 ms"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serving::arch::Arch;

    use super::*;
    use crate::mock_lm::MockLmKind;

    #[test]
    fn embedded_defaults_are_valid_with_both_engines_and_fit_memory_services_defaults() {
        let config = Config::default();
        config.validate().expect("valid defaults");
        assert!(config.models.iter().any(|m| m.mock_lm == MockLmKind::Webllm));
        assert!(config.models.iter().any(|m| m.mock_lm == MockLmKind::TransformersJs));
        let names: Vec<_> = config.models.iter().map(|m| m.key.as_str()).collect();
        for preset in Arch::PRESETS {
            assert!(names.contains(&preset), "{preset} is served by default");
        }
        // A bare memory-service sizes its pools for the same device: every default model's
        // weights fit in `uniforms` (the preloaded ones and those loaded on demand), and
        // activations fit theirs. Every preset is checked in `fit`'s tests.
        let pools = serving::models::pool_split(&config.device);
        let pool = |name: &str| pools.iter().find(|(n, _)| *n == name).map(|(_, b)| *b).unwrap_or(0);
        let all: u64 = config.models.iter().map(|m| m.arch.weight_bytes()).sum();
        assert!(all <= pool("uniforms"), "{all} > {}", pool("uniforms"));
        assert!(config.activation_bytes() <= pool("activations"));
        assert!(pool("kv-cache") > 16 << 30, "a useful kv-cache");
    }

    #[test]
    fn bad_values_are_refused() {
        let bad_addr = Config { memory_addr: "127.0.0.1:50051".into(), ..Config::default() };
        assert!(bad_addr.validate().is_err());
        assert!(Config { max_batch_size: 0, ..Config::default() }.validate().is_err());
        assert!(Config { jitter: 2.0, ..Config::default() }.validate().is_err());
        assert!(Config { models: vec![], ..Config::default() }.validate().is_err());
        let mut dup = Config::default();
        dup.models.push(dup.models[0].clone());
        assert!(dup.validate().is_err());
        let mut long = Config::default();
        long.models[0].max_prompt_tokens = long.models[0].arch.context_length + 1;
        assert!(long.validate().is_err());
        assert!(parse_models("[[models]]\nkey = \"x\"\nmock_lm = \"cuda\"\n").is_err());
        assert!(parse_models("[[models]]\nkey = \"x\"\nmock_lm = \"webllm\"\npreset = \"gpt-9\"\n").is_err());
    }
}
