//! Bounds on everything a caller can make the ledger hold: pools, leases (in all and per holder),
//! members per scope and waiters (per pool and per holder). Bytes are bounded by pool capacity;
//! these bound the ledger's own memory and the work one call can cause.

use std::{collections::HashMap, sync::Arc};

use super::{Error, Ledger, Resolved};

/// The ledger's bounds. Defaults are generous for a real device (a runtime holds one lease per
/// model, one for activations and a few hundred KV slabs) and small enough that the books stay
/// a few hundred MiB at worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pools in all (CreatePool).
    pub pools: usize,
    /// Live leases in all.
    pub leases: usize,
    /// Live leases of one holder.
    pub leases_per_holder: usize,
    /// Live leases in one scope.
    pub scope_members: usize,
    /// Allocate calls waiting on one pool.
    pub waiters_per_pool: usize,
    /// Allocate calls of one holder waiting at once.
    pub waiters_per_holder: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pools: 256,
            leases: 1_000_000,
            leases_per_holder: 200_000,
            scope_members: 200_000,
            waiters_per_pool: 1024,
            waiters_per_holder: 64,
        }
    }
}

/// Per-holder counts, dropped at zero so the map only holds holders with something live.
#[derive(Debug, Default)]
pub(super) struct PerHolder(HashMap<Arc<str>, usize>);

impl PerHolder {
    pub(super) fn get(&self, holder: &str) -> usize {
        self.0.get(holder).copied().unwrap_or(0)
    }

    pub(super) fn add(&mut self, holder: &Arc<str>, n: usize) {
        *self.0.entry(holder.clone()).or_default() += n;
    }

    pub(super) fn sub(&mut self, holder: &str, n: usize) {
        if let Some(count) = self.0.get_mut(holder) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.0.remove(holder);
            }
        }
    }
}

impl Ledger {
    /// Sets the bounds. Existing state over a new bound stays; only new work is refused.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The bounds in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Refuses `request` if granting it would pass a lease bound.
    pub(super) fn check_lease_limits(&self, request: &Resolved) -> Result<(), Error> {
        let n = request.items.len();
        let limits = &self.limits;
        if self.leases.len() + n > limits.leases {
            return Err(Error::LimitReached {
                what: "leases",
                limit: limits.leases as u64,
                hint: "the server holds as many leases as it may; retry after some are freed",
            });
        }
        if self.holder_leases.get(&request.holder) + n > limits.leases_per_holder {
            return Err(Error::LimitReached {
                what: "leases per holder",
                limit: limits.leases_per_holder as u64,
                hint: "free leases you no longer need, or ask for fewer, larger ones",
            });
        }
        if let Some(scope) = &request.scope {
            let members = self.scopes.get(&*self.scope_key(&request.holder, scope)).map_or(0, |s| s.len());
            if members + n > limits.scope_members {
                return Err(Error::LimitReached {
                    what: "leases per scope",
                    limit: limits.scope_members as u64,
                    hint: "spread the leases over more scopes",
                });
            }
        }
        Ok(())
    }

    /// Refuses to queue `request` if a waiter bound is reached.
    pub(super) fn check_waiter_limits(&self, request: &Resolved) -> Result<(), Error> {
        let limits = &self.limits;
        if request.demand.iter().any(|&(p, _)| self.pools[p].waiters() as usize >= limits.waiters_per_pool) {
            return Err(Error::LimitReached {
                what: "waiters per pool",
                limit: limits.waiters_per_pool as u64,
                hint: "retry without max_wait, or later",
            });
        }
        if self.holder_waiters.get(&request.holder) >= limits.waiters_per_holder {
            return Err(Error::LimitReached {
                what: "waiting Allocate calls per holder",
                limit: limits.waiters_per_holder as u64,
                hint: "wait for your earlier Allocate calls to finish",
            });
        }
        Ok(())
    }

    /// Refuses a new pool past the bound.
    pub(super) fn check_pool_limit(&self) -> Result<(), Error> {
        if self.pools.len() >= self.limits.pools {
            return Err(Error::LimitReached {
                what: "pools",
                limit: self.limits.pools as u64,
                hint: "pools are never deleted; reuse an existing pool",
            });
        }
        Ok(())
    }
}
