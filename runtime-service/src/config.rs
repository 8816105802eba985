//! Validated configuration: models, the memory-service address, executor limits and timeouts.
//! `main.rs` builds it from flags, environment and an optional TOML file; tests build it directly.

use std::{path::Path, time::Duration};

use serde::Deserialize;
pub use serving::config::ConfigError;
use serving::units::ByteSize;

use crate::engine::{EngineKind, LatencyProfile, MemoryProfile};

/// Largest token limit a model may set (prompt or completion).
const MAX_TOKENS: u32 = 1 << 20;

/// Models served when no config file names any.
pub const DEFAULT_MODELS: &str = include_str!("../models.toml");

/// One servable model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Key clients name in GenerateRequest.model.
    pub key: String,
    /// Simulated engine.
    pub engine: EngineKind,
    /// Load (lease uniforms) at start-up; health waits for it.
    pub preload: bool,
    /// Memory needs.
    pub memory: MemoryProfile,
    /// Time costs.
    pub latency: LatencyProfile,
    /// Largest max_tokens accepted.
    pub max_tokens_limit: u32,
    /// Largest prompt, in tokens.
    pub max_prompt_tokens: u32,
}

/// Everything runtime-service needs, checked by [`Config::validate`] before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// memory-service endpoint (`http://host:port`).
    pub memory_addr: String,
    /// Holder name on memory leases: identifies this instance in memory-service events.
    pub instance: String,
    /// Models.
    pub models: Vec<ModelSpec>,
    /// Tokens the CPU stage may run ahead of the GPU stage; also how many tokens' activations a
    /// generation reserves.
    pub pipeline_depth: u32,
    /// Generations running at once.
    pub max_concurrent: usize,
    /// Generations waiting for a slot before new ones are shed with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Server-side wait for memory per Allocate (the seed's 500 ms deadlock detector).
    pub memory_wait: Duration,
    /// Budget to reach memory-service per call attempt; past it the attempt fails UNAVAILABLE.
    pub memory_timeout: Duration,
    /// Attempts at reserving memory before the first token (1 = no retry).
    pub retry_attempts: u32,
    /// First retry backoff; doubles each attempt, with full jitter.
    pub retry_backoff: Duration,
    /// Largest retry backoff.
    pub retry_backoff_max: Duration,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory_addr: "http://127.0.0.1:50051".into(),
            instance: "runtime-service".into(),
            models: parse_models(DEFAULT_MODELS).unwrap_or_default(),
            pipeline_depth: 2,
            max_concurrent: 64,
            queue_capacity: 256,
            memory_wait: Duration::from_millis(500),
            memory_timeout: Duration::from_secs(2),
            retry_attempts: 5,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            ttft_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            max_stream_lifetime: Duration::from_secs(600),
            retry_hint: Duration::from_millis(500),
            grace_period: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    models: Vec<FileModel>,
    pipeline_depth: Option<u32>,
    max_concurrent: Option<usize>,
    queue_capacity: Option<usize>,
    memory_wait_ms: Option<u64>,
    retry_attempts: Option<u32>,
    lease_ttl_ms: Option<u64>,
    ttft_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_stream_lifetime_ms: Option<u64>,
    grace_period_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    key: String,
    engine: EngineKind,
    #[serde(default)]
    preload: bool,
    uniform_bytes: ByteSize,
    kv_bytes_per_token: ByteSize,
    activation_bytes_per_token: ByteSize,
    max_tokens_limit: u32,
    max_prompt_tokens: u32,
    prefill_per_token_ms: Option<f64>,
    cpu_per_token_ms: Option<f64>,
    gpu_per_token_ms: Option<f64>,
    jitter: Option<f64>,
}

fn millis(field: &str, ms: f64) -> Result<Duration, String> {
    if !ms.is_finite() || !(0.0..=60_000.0).contains(&ms) {
        return Err(format!("{field} = {ms} must be between 0 and 60000 ms"));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn models_of(file: Vec<FileModel>) -> Result<Vec<ModelSpec>, ConfigError> {
    file.into_iter()
        .map(|m| {
            let bad = |e: String| ConfigError::Invalid(format!("model {:?}: {e}", m.key));
            let defaults = m.engine.engine().default_latency();
            let latency = LatencyProfile {
                prefill_per_token: m
                    .prefill_per_token_ms
                    .map_or(Ok(defaults.prefill_per_token), |v| millis("prefill_per_token_ms", v))
                    .map_err(bad)?,
                cpu_per_token: m
                    .cpu_per_token_ms
                    .map_or(Ok(defaults.cpu_per_token), |v| millis("cpu_per_token_ms", v))
                    .map_err(bad)?,
                gpu_per_token: m
                    .gpu_per_token_ms
                    .map_or(Ok(defaults.gpu_per_token), |v| millis("gpu_per_token_ms", v))
                    .map_err(bad)?,
                jitter: m.jitter.unwrap_or(defaults.jitter),
            };
            Ok(ModelSpec {
                memory: MemoryProfile {
                    kv_bytes_per_token: m.kv_bytes_per_token.bytes().map_err(bad)?,
                    activation_bytes_per_token: m.activation_bytes_per_token.bytes().map_err(bad)?,
                    uniform_bytes: m.uniform_bytes.bytes().map_err(bad)?,
                },
                key: m.key,
                engine: m.engine,
                preload: m.preload,
                latency,
                max_tokens_limit: m.max_tokens_limit,
                max_prompt_tokens: m.max_prompt_tokens,
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

impl Config {
    /// Overlays the TOML file at `path` on `self`.
    pub fn merge_file(mut self, path: &Path) -> Result<Self, ConfigError> {
        let file: File = serving::config::read_toml(path)?;
        if !file.models.is_empty() {
            self.models = models_of(file.models)?;
        }
        let ms = Duration::from_millis;
        self.pipeline_depth = file.pipeline_depth.unwrap_or(self.pipeline_depth);
        self.max_concurrent = file.max_concurrent.unwrap_or(self.max_concurrent);
        self.queue_capacity = file.queue_capacity.unwrap_or(self.queue_capacity);
        self.memory_wait = file.memory_wait_ms.map_or(self.memory_wait, ms);
        self.retry_attempts = file.retry_attempts.unwrap_or(self.retry_attempts);
        self.lease_ttl = file.lease_ttl_ms.map_or(self.lease_ttl, ms);
        self.ttft_timeout = file.ttft_timeout_ms.map_or(self.ttft_timeout, ms);
        self.idle_timeout = file.idle_timeout_ms.map_or(self.idle_timeout, ms);
        self.max_stream_lifetime = file.max_stream_lifetime_ms.map_or(self.max_stream_lifetime, ms);
        self.grace_period = file.grace_period_ms.map_or(self.grace_period, ms);
        Ok(self)
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
        let max_instance = crate::memory::MAX_INSTANCE;
        if self.instance.is_empty()
            || self.instance.chars().count() > max_instance
            || self.instance.chars().any(|c| c.is_control() || c == '/')
        {
            return invalid(format!(
                "instance name {:?} must be 1 to {max_instance} printable characters without '/'",
                self.instance
            ));
        }
        if self.models.is_empty() {
            return invalid("at least one model is required".into());
        }
        let mut keys = std::collections::HashSet::new();
        for m in &self.models {
            let key_ok = !m.key.is_empty()
                && m.key.len() <= crate::memory::MAX_SCOPE_NAME
                && m.key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
            if !key_ok {
                return invalid(format!("model key {:?}: use 1 to 64 of a-z, 0-9, '-', '.', '_'", m.key));
            }
            if !keys.insert(&m.key) {
                return invalid(format!("model {:?} is listed twice", m.key));
            }
            if !(1..=MAX_TOKENS).contains(&m.max_tokens_limit)
                || !(1..=MAX_TOKENS).contains(&m.max_prompt_tokens)
            {
                return invalid(format!(
                    "model {:?}: token limits must be between 1 and {MAX_TOKENS}",
                    m.key
                ));
            }
            if m.memory.kv_bytes_per_token == 0
                || m.memory.activation_bytes_per_token == 0
                || m.memory.uniform_bytes == 0
            {
                return invalid(format!("model {:?}: memory sizes must be greater than zero", m.key));
            }
            if !(0.0..=1.0).contains(&m.latency.jitter) {
                return invalid(format!(
                    "model {:?}: jitter {} must be between 0 and 1",
                    m.key, m.latency.jitter
                ));
            }
        }
        if !(1..=64).contains(&self.pipeline_depth) {
            return invalid(format!("pipeline depth {} must be between 1 and 64", self.pipeline_depth));
        }
        if self.max_concurrent == 0 || self.max_concurrent > 100_000 {
            return invalid(format!("max concurrent {} must be between 1 and 100000", self.max_concurrent));
        }
        if self.queue_capacity > 1_000_000 {
            return invalid(format!("queue capacity {} must be at most 1000000", self.queue_capacity));
        }
        if self.retry_attempts == 0 || self.retry_attempts > 100 {
            return invalid(format!("retry attempts {} must be between 1 and 100", self.retry_attempts));
        }
        // memory-service refuses TTLs above its maximum (1 h by default) and waits above 5 min.
        if self.lease_ttl > Duration::from_secs(3600) {
            return invalid(format!("lease TTL {:?} must be at most 1 h", self.lease_ttl));
        }
        if self.memory_wait > Duration::from_secs(300) {
            return invalid(format!("memory wait {:?} must be at most 5 min", self.memory_wait));
        }
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
    use super::*;

    #[test]
    fn embedded_models_are_valid_with_two_engines() {
        let config = Config::default();
        config.validate().unwrap();
        assert!(config.models.len() >= 2);
        assert!(config.models.iter().any(|m| m.engine == EngineKind::Webllm));
        assert!(config.models.iter().any(|m| m.engine == EngineKind::TransformersJs));
        assert!(config.models.iter().any(|m| m.preload));
    }

    #[test]
    fn bad_values_are_refused() {
        let bad_addr = Config { memory_addr: "127.0.0.1:50051".into(), ..Config::default() };
        assert!(bad_addr.validate().is_err());
        assert!(Config { pipeline_depth: 0, ..Config::default() }.validate().is_err());
        assert!(Config { models: vec![], ..Config::default() }.validate().is_err());
        let mut dup = Config::default();
        dup.models.push(dup.models[0].clone());
        assert!(dup.validate().is_err());
        assert!(parse_models("[[models]]\nkey = \"x\"\nengine = \"cuda\"\n").is_err());
    }
}
