//! Pools: creating them, reading their statistics, resolving names.

use super::*;

impl Ledger {
    /// Adds a pool. The name must already be validated.
    pub fn create_pool(&mut self, name: &str, capacity: u64) -> Result<PoolStats, Error> {
        if self.pool_index.contains_key(name) {
            return Err(Error::PoolExists(name.to_owned()));
        }
        self.check_pool_limit()?;
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::invalid(
                "capacity_bytes",
                format!("{capacity} must be between 1 and {MAX_CAPACITY} (4 EiB)"),
            ));
        }
        let name: Arc<str> = name.into();
        let id = self.pools.len();
        self.pools.push(Pool::new(name.clone(), capacity));
        self.pool_index.insert(name.clone(), id);
        self.touch_pool(id);
        self.events.publish(Change {
            kind: EventKind::PoolCreated,
            pool: &name,
            lease: None,
            size: capacity,
            holder: None,
            scope: None,
            pool_used: 0,
        });
        Ok(self.pools[id].stats())
    }

    /// Statistics of one pool.
    pub fn pool_stats(&self, name: &str) -> Result<PoolStats, Error> {
        self.pool_id(name).map(|id| self.pools[id].stats())
    }

    /// Statistics of every pool, sorted by name.
    pub fn list_pools(&self) -> Vec<PoolStats> {
        let mut all: Vec<_> = self.pools.iter().map(Pool::stats).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Name of pool `id` (ids come from leases this ledger granted).
    pub fn pool_name(&self, id: PoolId) -> &Arc<str> {
        self.pools[id].name()
    }

    pub(super) fn pool_id(&self, name: &str) -> Result<PoolId, Error> {
        self.pool_index.get(name).copied().ok_or_else(|| Error::PoolNotFound(serving::echo::echo(name)))
    }
}
