//! The runtime-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use rand::{TryRng, rngs::SysRng};
use runtime_service::{Config, config, core::SchedulerMode, run, scheduler::KvReserve};
use serving::launch::Launch;

serving::security_args!(SecurityArgs, "RUNTIME_");

/// Streams generated tokens over gRPC (runtime.v1.RuntimeService), with memory leased from
/// memory-service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "RUNTIME_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Address of the admin HTTP port (Prometheus metrics at /metrics), or "off".
    #[arg(long, env = "RUNTIME_ADMIN_LISTEN", default_value = "127.0.0.1:9465")]
    admin_listen: String,
    /// Log format: "text" (human-readable) or "json" (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: serving::telemetry::LogFormat,
    /// memory-service endpoint.
    #[arg(long, env = "RUNTIME_MEMORY_ADDR", default_value = "http://127.0.0.1:50051")]
    memory_addr: String,
    /// TOML file with the device, models and limits (see deploy/runtime-service.toml). Flags
    /// override it.
    #[arg(long, env = "RUNTIME_CONFIG")]
    config: Option<PathBuf>,
    /// Name of this instance on its memory leases (default: runtime-<random>). In Kubernetes,
    /// the pod name.
    #[arg(long, env = "RUNTIME_INSTANCE")]
    instance: Option<String>,
    /// Simulated device: an embedded preset (h100-sxm, a100-40gb, l4, webgpu-laptop) or one
    /// defined under [[devices]] in the config file.
    #[arg(long, env = "RUNTIME_DEVICE")]
    device: Option<String>,
    /// Model served over the engine dialect (vllm.grpc.engine.VllmEngine, whose requests name no
    /// model): a configured model key. Default: the first preloaded model.
    #[arg(long, env = "RUNTIME_ENGINE_MODEL")]
    engine_model: Option<String>,
    /// CPU/GPU scheduling of the device: "overlapped" (the CPU prepares step N+1 while the GPU
    /// computes step N) or "sequential".
    #[arg(long, env = "RUNTIME_SCHEDULER")]
    scheduler: Option<SchedulerMode>,
    /// Sequences in one device step at most.
    #[arg(long, env = "RUNTIME_MAX_BATCH_SIZE")]
    max_batch_size: Option<usize>,
    /// Tokens computed in one step at most; prompts are chunked to fit.
    #[arg(long, env = "RUNTIME_MAX_BATCHED_TOKENS")]
    max_batched_tokens: Option<u32>,
    /// Generations admitted beyond a full batch before new ones are refused.
    #[arg(long, env = "RUNTIME_QUEUE_CAPACITY")]
    queue_capacity: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "RUNTIME_KV_BLOCK_TOKENS")]
    kv_block_tokens: Option<u32>,
    /// Largest kv-cache slab leased from memory-service at once, in blocks.
    #[arg(long, env = "RUNTIME_KV_SLAB_BLOCKS")]
    kv_slab_blocks: Option<u64>,
    /// How KV memory is taken: "paged" (blocks as sequences grow) or "upfront" (prompt +
    /// max_tokens at admission, for comparison).
    #[arg(long, env = "RUNTIME_KV_RESERVE")]
    kv_reserve: Option<KvReserve>,
    /// Prefix caching, "on" (the default, as vLLM V1) or "off": full prompt blocks stay cached
    /// and later prompts that start the same way compute only the rest.
    #[arg(long, env = "RUNTIME_PREFIX_CACHING", value_parser = on_off)]
    prefix_caching: Option<bool>,
    /// Prefix-cache event batches kept per model, so a router that reconnects resumes without a
    /// gap (SubscribeKvEvents' start_sequence_number).
    #[arg(long, env = "RUNTIME_KV_EVENTS_BUFFER")]
    kv_events_buffer: Option<usize>,
    /// Relative jitter of simulated step times, 0 to 1 (seeded: runs repeat exactly).
    #[arg(long, env = "RUNTIME_JITTER")]
    jitter: Option<f64>,
    /// Server-side wait for memory per attempt, in milliseconds.
    #[arg(long, env = "RUNTIME_MEMORY_WAIT_MS")]
    memory_wait_ms: Option<u64>,
    /// TTL of this instance's memory leases, in milliseconds.
    #[arg(long, env = "RUNTIME_LEASE_TTL_MS")]
    lease_ttl_ms: Option<u64>,
    /// Longest time to the first token, in milliseconds.
    #[arg(long, env = "RUNTIME_TTFT_TIMEOUT_MS")]
    ttft_timeout_ms: Option<u64>,
    /// Longest gap between two tokens, in milliseconds.
    #[arg(long, env = "RUNTIME_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Longest stream, in milliseconds.
    #[arg(long, env = "RUNTIME_MAX_STREAM_LIFETIME_MS")]
    max_stream_lifetime_ms: Option<u64>,
    #[command(flatten)]
    security: SecurityArgs,
    /// PEM CA that signed memory-service's certificate: TLS to memory-service (the address must
    /// be https://).
    #[arg(long, env = "RUNTIME_MEMORY_TLS_CA")]
    memory_tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate presented to memory-service (mutual TLS), with --memory-tls-key.
    #[arg(long, env = "RUNTIME_MEMORY_TLS_CERT")]
    memory_tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --memory-tls-cert.
    #[arg(long, env = "RUNTIME_MEMORY_TLS_KEY")]
    memory_tls_key: Option<std::path::PathBuf>,
    /// File holding the bearer token this runtime presents to memory-service.
    #[arg(long, env = "RUNTIME_MEMORY_TOKEN_FILE")]
    memory_token_file: Option<std::path::PathBuf>,
    /// Print what this configuration needs from memory-service (device, activations, each model's
    /// weights and whether it is preloaded) as JSON, and exit without serving: lets deployment
    /// checks size memory-service's pools from the binary itself.
    #[arg(long)]
    print_memory: bool,
    /// Time given to streams and memory release at shutdown, in milliseconds.
    #[arg(long, env = "RUNTIME_GRACE_PERIOD_MS")]
    grace_period_ms: Option<u64>,
}

impl Args {
    fn into_config(self) -> Result<Config, String> {
        let mut config = Config::default();
        let mut defined = Vec::new();
        let mut lists_models = false;
        if let Some(path) = &self.config {
            config = config::read_file(config, path).map_err(|e| e.to_string())?;
            defined = config::defined_devices(path).map_err(|e| e.to_string())?;
            lists_models = config::lists_models(path).map_err(|e| e.to_string())?;
        }
        if let Some(name) = &self.device {
            config.device = config::find_device(name, &defined).map_err(|e| e.to_string())?;
        }
        config.memory_addr = self.memory_addr;
        config.instance = self
            .instance
            .unwrap_or_else(|| format!("runtime-{:08x}", SysRng.try_next_u64().unwrap_or_default() as u32));
        let ms = Duration::from_millis;
        config.scheduler = self.scheduler.unwrap_or(config.scheduler);
        config.engine_model = self.engine_model.or(config.engine_model);
        config.max_batch_size = self.max_batch_size.unwrap_or(config.max_batch_size);
        config.max_batched_tokens = self.max_batched_tokens.unwrap_or(config.max_batched_tokens);
        config.queue_capacity = self.queue_capacity.unwrap_or(config.queue_capacity);
        config.kv_block_tokens = self.kv_block_tokens.unwrap_or(config.kv_block_tokens);
        config.kv_slab_blocks = self.kv_slab_blocks.unwrap_or(config.kv_slab_blocks);
        config.kv_reserve = self.kv_reserve.unwrap_or(config.kv_reserve);
        config.prefix_caching = self.prefix_caching.unwrap_or(config.prefix_caching);
        config.kv_events_buffer = self.kv_events_buffer.unwrap_or(config.kv_events_buffer);
        config.jitter = self.jitter.unwrap_or(config.jitter);
        config.memory_wait = self.memory_wait_ms.map_or(config.memory_wait, ms);
        config.lease_ttl = self.lease_ttl_ms.map_or(config.lease_ttl, ms);
        config.ttft_timeout = self.ttft_timeout_ms.map_or(config.ttft_timeout, ms);
        config.idle_timeout = self.idle_timeout_ms.map_or(config.idle_timeout, ms);
        config.max_stream_lifetime = self.max_stream_lifetime_ms.map_or(config.max_stream_lifetime, ms);
        config.grace_period = self.grace_period_ms.map_or(config.grace_period, ms);
        self.security.apply(&mut config.security)?;
        config.memory_auth.tls_ca = self.memory_tls_ca.or(config.memory_auth.tls_ca);
        config.memory_auth.token_file = self.memory_token_file.or(config.memory_auth.token_file);
        config.memory_auth.tls_identity = match (self.memory_tls_cert, self.memory_tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => config.memory_auth.tls_identity,
            _ => return Err("--memory-tls-cert and --memory-tls-key go together".into()),
        };
        // Once the device and the token budget are final: the embedded models are trimmed to what
        // that device holds (the models memory-service --device sizes `uniforms` for); models a
        // file lists are the operator's choice, checked by `validate` instead.
        if !lists_models {
            for (model, reason) in config.serve_fitting_defaults().map_err(|e| e.to_string())? {
                tracing::warn!(%model, device = %config.device.name, %reason, "default model not served on this device");
            }
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = match serving::launch::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    if args.print_memory {
        return print_memory(args);
    }
    let launch = Launch {
        service: "runtime-service",
        listen: args.listen,
        admin_listen: args.admin_listen.clone(),
        log_format: args.log_format,
    };
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-memory`: the validated configuration's memory needs, as one JSON object.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the output is the point
fn print_memory(args: Args) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            return ExitCode::from(serving::EXIT_CONFIG as u8);
        }
    };
    let models: Vec<String> = config
        .models
        .iter()
        .map(|m| {
            format!(
                r#"{{"key":"{}","preload":{},"weight_bytes":{}}}"#,
                m.key,
                m.preload,
                m.arch.weight_bytes()
            )
        })
        .collect();
    let preload: u64 = config.models.iter().filter(|m| m.preload).map(|m| m.arch.weight_bytes()).sum();
    println!(
        r#"{{"device":"{}","activation_bytes":{},"preload_weight_bytes":{},"models":[{}]}}"#,
        config.device.name,
        config.activation_bytes(),
        preload,
        models.join(",")
    );
    ExitCode::SUCCESS
}

/// "on" or "off", as a flag's value.
fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{value:?} must be \"on\" or \"off\"")),
    }
}
