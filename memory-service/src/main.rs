//! The memory-service binary: flags and environment → validated [`Config`] → [`run`].

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use memory_service::{Config, config::PoolSpec, run};
use serving::launch::Launch;

serving::security_args!(SecurityArgs, "MEMORY_");

/// Leases named pools of simulated device memory over gRPC (memory.v1.MemoryService).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "MEMORY_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the admin HTTP port (Prometheus metrics at /metrics), or "off".
    #[arg(long, env = "MEMORY_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    admin_listen: String,
    /// Log format: "text" (human-readable) or "json" (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: serving::telemetry::LogFormat,
    /// TOML file with pools and limits (see deploy/memory-service.toml). Flags override it.
    #[arg(long, env = "MEMORY_CONFIG")]
    config: Option<PathBuf>,
    /// Sizes the three pools for a device preset (h100-sxm, a100-40gb, l4, webgpu-laptop) as a
    /// bare runtime-service on it loads: of 90% of its memory, uniforms for the weights of the
    /// default models that fit, activations for their step buffers, the rest (at least a
    /// quarter) kv-cache. Default: h100-sxm.
    #[arg(long, env = "MEMORY_DEVICE")]
    device: Option<String>,
    /// Pools as NAME=SIZE (e.g. kv-cache=8GiB), comma-separated or repeated; replaces the
    /// defaults, the device's split and the file's pools.
    #[arg(long = "pool", env = "MEMORY_POOLS", value_delimiter = ',')]
    pools: Vec<String>,
    /// TTL of a lease whose Allocate names none, in milliseconds.
    #[arg(long, env = "MEMORY_DEFAULT_TTL_MS")]
    default_ttl_ms: Option<u64>,
    /// Longest TTL a caller may ask for, in milliseconds.
    #[arg(long, env = "MEMORY_MAX_TTL_MS")]
    max_ttl_ms: Option<u64>,
    /// Longest server-side wait a caller may ask for, in milliseconds.
    #[arg(long, env = "MEMORY_MAX_WAIT_MS")]
    max_wait_ms: Option<u64>,
    /// Retry delay suggested when memory is short, in milliseconds.
    #[arg(long, env = "MEMORY_RETRY_HINT_MS")]
    retry_hint_ms: Option<u64>,
    /// How long a holder has to answer a ReclaimRequest (give back or stop offering the leases
    /// it names) before they are revoked, in milliseconds: 1 to 60000. Default 1000.
    #[arg(long, env = "MEMORY_RECLAIM_TIMEOUT_MS")]
    reclaim_timeout_ms: Option<u64>,
    /// Events a watcher may fall behind before it is told it lagged, and the latest events
    /// kept for watchers that resume after a sequence.
    #[arg(long, env = "MEMORY_EVENT_BUFFER")]
    event_buffer: Option<usize>,
    /// Print the pools this configuration creates (name and bytes) as JSON, and exit without
    /// serving: lets deployment checks compare them with what runtimes preload.
    #[arg(long)]
    print_pools: bool,
    /// Time given to in-flight calls at shutdown, in milliseconds.
    #[arg(long, env = "MEMORY_GRACE_PERIOD_MS")]
    grace_period_ms: Option<u64>,
    #[command(flatten)]
    security: SecurityArgs,
    /// Directory of the durable ledger: every acknowledged change is on disk before its reply,
    /// and a restart keeps the epoch and every live lease. Without it the ledger is in memory.
    #[arg(long, env = "MEMORY_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl Args {
    fn into_config(self) -> Result<Config, String> {
        let mut config = Config::default();
        if let Some(path) = &self.config {
            config = config.merge_file(path).map_err(|e| e.to_string())?;
        }
        if let Some(device) = &self.device {
            config.pools = memory_service::config::pools_for_device(device).map_err(|e| e.to_string())?;
        }
        if !self.pools.is_empty() {
            config.pools = self.pools.iter().map(|spec| parse_pool(spec)).collect::<Result<_, _>>()?;
        }
        let ms = Duration::from_millis;
        config.default_ttl = self.default_ttl_ms.map_or(config.default_ttl, ms);
        config.max_ttl = self.max_ttl_ms.map_or(config.max_ttl, ms);
        config.max_wait = self.max_wait_ms.map_or(config.max_wait, ms);
        config.retry_hint = self.retry_hint_ms.map_or(config.retry_hint, ms);
        config.reclaim_timeout = self.reclaim_timeout_ms.map_or(config.reclaim_timeout, ms);
        config.event_buffer = self.event_buffer.unwrap_or(config.event_buffer);
        config.grace_period = self.grace_period_ms.map_or(config.grace_period, ms);
        if self.state_dir.is_some() {
            config.state_dir = self.state_dir.clone();
        }
        self.security.apply(&mut config.security)?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

fn parse_pool(spec: &str) -> Result<PoolSpec, String> {
    let (name, size) = spec.split_once('=').ok_or_else(|| format!("--pool {spec:?}: expected NAME=SIZE"))?;
    let capacity = memory_service::config::parse_bytes(size).map_err(|e| format!("--pool {spec:?}: {e}"))?;
    Ok(PoolSpec { name: name.trim().to_owned(), capacity })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = match serving::launch::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    if args.print_pools {
        return print_pools(args);
    }
    let launch = Launch {
        service: "memory-service",
        listen: args.listen,
        admin_listen: args.admin_listen.clone(),
        log_format: args.log_format,
    };
    serving::launch::launch(launch, move || args.into_config(), run).await
}

/// `--print-pools`: the validated configuration's pools, as one JSON object.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the output is the point
fn print_pools(args: Args) -> ExitCode {
    match args.into_config() {
        Ok(config) => {
            let pools: Vec<String> =
                config.pools.iter().map(|p| format!(r#""{}":{}"#, p.name, p.capacity)).collect();
            println!(r#"{{"pools":{{{}}}}}"#, pools.join(","));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            ExitCode::from(serving::EXIT_CONFIG as u8)
        }
    }
}
