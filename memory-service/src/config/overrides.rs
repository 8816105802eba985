//! The settings a TOML file (`--config`) and the command line may both set, written once: the file
//! deserializes into [`Overrides`], the flags parse into another, and [`layered`] lays the file
//! over the defaults and the flags over the file. A setting added here is a file key, a flag and
//! an environment variable at once, with one help text.

use std::{path::Path, time::Duration};

use serde::Deserialize;
use serving::{transport::Transport, units::ByteSize};

use super::{Config, ConfigError, PoolSpec, pools_for_device};

/// Every field optional: `None` (or an empty list) keeps what the layer below said.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Sizes the three pools for a device preset (h100-sxm, a100-80gb, a100-40gb, l40s, l4, webgpu-laptop) as a
    /// bare runtime-service on it loads: of 90% of its memory, uniforms for the weights of the
    /// default models that fit, activations for their step buffers, the rest (at least a
    /// quarter) kv-cache. Default: h100-sxm.
    #[arg(long, env = "MEMORY_DEVICE")]
    pub device: Option<String>,
    /// Pools as NAME=SIZE (e.g. kv-cache=8GiB), comma-separated or repeated; replaces the
    /// defaults, the device's split and the file's pools.
    #[arg(long = "pool", env = "MEMORY_POOLS", value_delimiter = ',')]
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// TTL of a lease whose Allocate names none, in milliseconds.
    #[arg(long, env = "MEMORY_DEFAULT_TTL_MS")]
    pub default_ttl_ms: Option<u64>,
    /// Longest TTL a caller may ask for, in milliseconds.
    #[arg(long, env = "MEMORY_MAX_TTL_MS")]
    pub max_ttl_ms: Option<u64>,
    /// Longest server-side wait a caller may ask for, in milliseconds.
    #[arg(long, env = "MEMORY_MAX_WAIT_MS")]
    pub max_wait_ms: Option<u64>,
    /// Retry delay suggested when memory is short, in milliseconds.
    #[arg(long, env = "MEMORY_RETRY_HINT_MS")]
    pub retry_hint_ms: Option<u64>,
    /// How long a holder has to answer a ReclaimRequest (give back or stop offering the leases
    /// it names) before they are revoked, in milliseconds: 1 to 60000. Default 1000.
    #[arg(long, env = "MEMORY_RECLAIM_TIMEOUT_MS")]
    pub reclaim_timeout_ms: Option<u64>,
    /// Events a watcher may fall behind before it is told it lagged, and the latest events
    /// kept for watchers that resume after a sequence.
    #[arg(long, env = "MEMORY_EVENT_BUFFER")]
    pub event_buffer: Option<usize>,
    /// Time given to in-flight calls at shutdown, in milliseconds.
    #[arg(long, env = "MEMORY_GRACE_PERIOD_MS")]
    pub grace_period_ms: Option<u64>,
    /// Directory of the durable ledger: every acknowledged change is on disk before its reply,
    /// and a restart keeps the epoch and every live lease. Without it the ledger is in memory.
    #[arg(long, env = "MEMORY_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Bounds on pools, leases, waiters and streams (file only: the `[limits]` table).
    #[arg(skip)]
    pub(super) limits: Option<FileLimits>,
    /// Transport limits (file only: the flags set TLS and tokens instead).
    #[arg(skip)]
    pub(super) transport: Option<Transport>,
}

/// The `[limits]` table; every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    pools: Option<usize>,
    leases: Option<usize>,
    leases_per_holder: Option<usize>,
    scope_members: Option<usize>,
    waiters_per_pool: Option<usize>,
    waiters_per_holder: Option<usize>,
    watchers: Option<usize>,
    keepalive_streams: Option<usize>,
}

/// A `[[pools]]` table, before its capacity is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePool {
    name: String,
    /// Bytes, as an integer or a string with a unit (`"8GiB"`).
    capacity: ByteSize,
}

impl TryFrom<FilePool> for PoolSpec {
    type Error = String;
    fn try_from(pool: FilePool) -> Result<Self, String> {
        Ok(PoolSpec { capacity: pool.capacity.bytes()?, name: pool.name })
    }
}

impl std::str::FromStr for PoolSpec {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, String> {
        let (name, size) = spec.split_once('=').ok_or_else(|| format!("{spec:?}: expected NAME=SIZE"))?;
        let capacity = super::parse_bytes(size).map_err(|e| format!("{spec:?}: {e}"))?;
        Ok(PoolSpec { name: name.trim().to_owned(), capacity })
    }
}

/// The defaults, the TOML file at `file` (if any) over them, and `flags` over both.
pub fn layered(file: Option<&Path>, flags: Overrides) -> Result<Config, ConfigError> {
    let from_file: Overrides = match file {
        Some(path) => serving::config::read_toml(path)?,
        None => Overrides::default(),
    };
    flags.apply(from_file.apply(Config::default())?)
}

impl Overrides {
    /// Lays these settings over `config`: a device's split replaces the pools, and pools listed
    /// here replace that.
    pub fn apply(self, mut config: Config) -> Result<Config, ConfigError> {
        if let Some(device) = &self.device {
            config.pools = pools_for_device(device)?;
        }
        if !self.pools.is_empty() {
            config.pools = self.pools;
        }
        let ms = Duration::from_millis;
        config.default_ttl = self.default_ttl_ms.map_or(config.default_ttl, ms);
        config.max_ttl = self.max_ttl_ms.map_or(config.max_ttl, ms);
        config.max_wait = self.max_wait_ms.map_or(config.max_wait, ms);
        config.retry_hint = self.retry_hint_ms.map_or(config.retry_hint, ms);
        config.reclaim_timeout = self.reclaim_timeout_ms.map_or(config.reclaim_timeout, ms);
        config.event_buffer = self.event_buffer.unwrap_or(config.event_buffer);
        config.grace_period = self.grace_period_ms.map_or(config.grace_period, ms);
        config.state_dir = self.state_dir.or(config.state_dir);
        if let Some(transport) = self.transport {
            config.security.transport = transport;
        }
        if let Some(l) = self.limits {
            let limits = &mut config.limits;
            limits.pools = l.pools.unwrap_or(limits.pools);
            limits.leases = l.leases.unwrap_or(limits.leases);
            limits.leases_per_holder = l.leases_per_holder.unwrap_or(limits.leases_per_holder);
            limits.scope_members = l.scope_members.unwrap_or(limits.scope_members);
            limits.waiters_per_pool = l.waiters_per_pool.unwrap_or(limits.waiters_per_pool);
            limits.waiters_per_holder = l.waiters_per_holder.unwrap_or(limits.waiters_per_holder);
            config.max_watchers = l.watchers.unwrap_or(config.max_watchers);
            config.max_keepalive_streams = l.keepalive_streams.unwrap_or(config.max_keepalive_streams);
        }
        Ok(config)
    }
}
