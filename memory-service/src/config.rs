//! Validated configuration: pools and lease limits. `main.rs` builds it from flags, environment and
//! an optional TOML file; tests build it directly.

use std::time::Duration;

pub use serving::config::ConfigError;
use serving::device::DeviceSpec;
pub use serving::units::parse_bytes;

use crate::{ledger::Limits, validate};
use serving::security::Security;

mod overrides;
pub use self::overrides::{Overrides, layered};

/// One pool to create at start-up: `NAME=SIZE` on the command line (`kv-cache=8GiB`), a
/// `[[pools]]` table (`name`, `capacity`) in the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "overrides::FilePool")]
pub struct PoolSpec {
    /// Pool name (a DNS label).
    pub name: String,
    /// Capacity in bytes.
    pub capacity: u64,
}

/// Everything the server needs, checked by [`Config::validate`] before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pools created at start-up.
    pub pools: Vec<PoolSpec>,
    /// TTL of a lease whose Allocate names none (the seed's 30 s idle limit).
    pub default_ttl: Duration,
    /// Longest TTL a caller may ask for; longer is refused, never clamped.
    pub max_ttl: Duration,
    /// Longest server-side wait a caller may ask for.
    pub max_wait: Duration,
    /// Delay suggested to a caller refused for lack of room (RetryInfo).
    pub retry_hint: Duration,
    /// How long a holder has to answer a ReclaimRequest before the leases it names are revoked.
    pub reclaim_timeout: Duration,
    /// Events each watcher may fall behind before it is told it lagged; also how many of the
    /// latest events are kept for watchers that resume.
    pub event_buffer: usize,
    /// How long shutdown waits for in-flight calls before closing connections.
    pub grace_period: Duration,
    /// Bounds on pools, leases, scope members and waiters.
    pub limits: Limits,
    /// Open WatchEvents streams at once.
    pub max_watchers: usize,
    /// Open KeepAlive streams at once.
    pub max_keepalive_streams: usize,
    /// TLS, tokens and transport limits.
    pub security: Security,
    /// Directory of the durable state store; `None` keeps the ledger in memory only.
    pub state_dir: Option<std::path::PathBuf>,
}

/// Longest reclaim timeout: past a minute, a waiter (at most 10 s by default) has long given up
/// before a stuck holder loses its lease, and the bound is pointless.
pub const MAX_RECLAIM_TIMEOUT: Duration = Duration::from_secs(60);

/// Device whose memory the default pools divide, so a bare memory-service fits a bare
/// runtime-service (which simulates the same device).
pub const DEFAULT_DEVICE: &str = "h100-sxm";

/// The three pools for device preset `name`, sized for what a bare runtime-service loads on that
/// device (see [`serving::models::pool_split`]).
pub fn pools_for_device(name: &str) -> Result<Vec<PoolSpec>, ConfigError> {
    let device = DeviceSpec::preset(name).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "no device preset {name:?}; use one of {} or set pools explicitly",
            DeviceSpec::preset_names().join(", ")
        ))
    })?;
    Ok(serving::models::pool_split(&device)
        .iter()
        .map(|&(name, capacity)| PoolSpec { name: name.into(), capacity })
        .collect())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pools: pools_for_device(DEFAULT_DEVICE).unwrap_or_default(),
            default_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
            // Long enough to ride out a burst of frees, short enough that a waiter the caller has
            // forgotten cannot hold its place for minutes (the seed's deadlock detector fired
            // after 500 ms).
            max_wait: Duration::from_secs(10),
            retry_hint: Duration::from_millis(200),
            // Long enough for a holder to evict blocks and free a few slabs (milliseconds), short
            // enough that a waiter with the default 10 s max wait is served well before it gives
            // up when a holder is stuck.
            reclaim_timeout: crate::ledger::DEFAULT_RECLAIM_TIMEOUT,
            event_buffer: 4096,
            grace_period: Duration::from_secs(10),
            limits: Limits::default(),
            max_watchers: 1024,
            max_keepalive_streams: 4096,
            security: Security::default(),
            state_dir: None,
        }
    }
}

impl Config {
    /// Checks every value; the first problem found is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = std::collections::HashSet::new();
        for pool in &self.pools {
            if let Err(reason) = validate::pool_name(&pool.name) {
                return invalid(format!("pool {:?}: {reason}", pool.name));
            }
            if pool.capacity == 0 || pool.capacity > crate::ledger::MAX_CAPACITY {
                return invalid(format!(
                    "pool {:?}: capacity must be between 1 byte and 4 EiB, got {}",
                    pool.name, pool.capacity
                ));
            }
            if !seen.insert(&pool.name) {
                return invalid(format!("pool {:?} is listed twice", pool.name));
            }
        }
        if self.max_ttl < validate::MIN_TTL {
            return invalid(format!("max TTL {:?} is below the 1 ms minimum", self.max_ttl));
        }
        if self.default_ttl < validate::MIN_TTL || self.default_ttl > self.max_ttl {
            return invalid(format!(
                "default TTL {:?} must be between 1 ms and the max TTL {:?}",
                self.default_ttl, self.max_ttl
            ));
        }
        if self.event_buffer == 0 || self.event_buffer > 1 << 20 {
            return invalid(format!("event buffer {} must be between 1 and 1048576", self.event_buffer));
        }
        if self.max_wait > Duration::from_secs(3600) {
            return invalid(format!("max wait {:?} must be at most 1 h", self.max_wait));
        }
        if self.reclaim_timeout < Duration::from_millis(1) || self.reclaim_timeout > MAX_RECLAIM_TIMEOUT {
            return invalid(format!(
                "reclaim timeout {:?} must be between 1 ms and {MAX_RECLAIM_TIMEOUT:?}",
                self.reclaim_timeout
            ));
        }
        let l = &self.limits;
        for (name, value, max) in [
            ("limits.pools", l.pools, 1 << 16),
            ("limits.leases", l.leases, 1 << 26),
            ("limits.leases_per_holder", l.leases_per_holder, 1 << 26),
            ("limits.scope_members", l.scope_members, 1 << 26),
            ("limits.waiters_per_pool", l.waiters_per_pool, 1 << 20),
            ("limits.waiters_per_holder", l.waiters_per_holder, 1 << 20),
            ("limits.watchers", self.max_watchers, 1 << 20),
            ("limits.keepalive_streams", self.max_keepalive_streams, 1 << 20),
        ] {
            if value == 0 || value > max {
                return invalid(format!("{name} = {value} must be between 1 and {max}"));
            }
        }
        if self.pools.len() > l.pools {
            return invalid(format!("{} pools configured but limits.pools is {}", self.pools.len(), l.pools));
        }
        self.security.transport.validate().map_err(ConfigError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_hold_the_three_pools() {
        let config = Config::default();
        config.validate().unwrap();
        let names: Vec<_> = config.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["kv-cache", "activations", "uniforms"]);
    }

    #[test]
    fn bad_values_are_refused() {
        let bad_name =
            Config { pools: vec![PoolSpec { name: "KV".into(), capacity: 1 }], ..Config::default() };
        assert!(bad_name.validate().is_err());
        let dup = PoolSpec { name: "a".into(), capacity: 1 };
        assert!(Config { pools: vec![dup.clone(), dup], ..Config::default() }.validate().is_err());
        let ttl = Config { default_ttl: Duration::from_secs(7200), ..Config::default() };
        assert!(ttl.validate().is_err());
        for reclaim_timeout in [Duration::ZERO, Duration::from_micros(999), Duration::from_secs(61)] {
            assert!(
                Config { reclaim_timeout, ..Config::default() }.validate().is_err(),
                "{reclaim_timeout:?}"
            );
        }
    }

    #[test]
    fn a_toml_file_replaces_pools_and_limits() {
        let dir = std::env::temp_dir().join(format!("memory-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.toml");
        std::fs::write(
            &path,
            "default_ttl_ms = 5000\nreclaim_timeout_ms = 250\n[[pools]]\nname = \"kv-cache\"\ncapacity = \"1GiB\"\n\
             [[pools]]\nname = \"scratch\"\ncapacity = 4096\n",
        )
        .unwrap();
        let config = layered(Some(&path), Overrides::default()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.default_ttl, Duration::from_secs(5));
        assert_eq!(config.reclaim_timeout, Duration::from_millis(250));
        assert_eq!(
            config.pools,
            [
                PoolSpec { name: "kv-cache".into(), capacity: 1 << 30 },
                PoolSpec { name: "scratch".into(), capacity: 4096 }
            ]
        );
        let flags = Overrides { pools: vec!["kv-cache=2GiB".parse().unwrap()], ..Overrides::default() };
        let config = layered(Some(&path), flags).unwrap();
        assert_eq!(config.pools, [PoolSpec { name: "kv-cache".into(), capacity: 2 << 30 }], "flags win");
        assert_eq!(config.default_ttl, Duration::from_secs(5), "the file's other keys stay");
        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        assert!(matches!(layered(Some(&path), Overrides::default()), Err(ConfigError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
