//! A model of the durable store: the change batches applied to a snapshot as the real store
//! would write them, and the check that restoring it gives the ledger's books back.

use std::collections::HashMap;

use memory_service::ledger::{Batch, LeaseId, Ledger, Snapshot};
use proptest::prelude::*;
use tokio::time::Instant;

/// What the store would hold after the batches so far.
#[derive(Default)]
pub(super) struct Store {
    snapshot: Snapshot,
    leases: HashMap<LeaseId, usize>,
}

impl Store {
    pub(super) fn apply(&mut self, batch: Batch) {
        let s = &mut self.snapshot;
        s.epoch = Some(batch.epoch);
        for pool in batch.pools {
            match s.pools.iter_mut().find(|p| p.name == pool.name) {
                Some(stored) => *stored = pool,
                None => s.pools.push(pool),
            }
        }
        for lease in batch.leases {
            match self.leases.get(&lease.id).copied() {
                Some(i) => s.leases[i] = lease,
                None => {
                    self.leases.insert(lease.id, s.leases.len());
                    s.leases.push(lease);
                }
            }
        }
        for id in batch.gone {
            if let Some(i) = self.leases.remove(&id) {
                s.leases.swap_remove(i);
                if let Some(moved) = s.leases.get(i) {
                    self.leases.insert(moved.id, i);
                }
            }
        }
        for (key, replay) in batch.replays {
            s.replays.retain(|r| r.key != key);
            if let Some(replay) = replay {
                s.replays.push(replay);
            }
        }
    }
}

/// Restores what `store` holds and checks it is the books of `ledger` (committed just before).
pub(super) fn check_restore(
    ledger: &Ledger,
    store: &Store,
    now: Instant,
    wall: std::time::SystemTime,
) -> Result<(), TestCaseError> {
    let mut restored = Ledger::new(16);
    restored.restore(store.snapshot.clone(), now, wall).map_err(|e| TestCaseError::fail(e.to_string()))?;
    restored.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(restored.epoch(), ledger.epoch());
    prop_assert_eq!(restored.live_leases(), ledger.live_leases());
    for pool in ledger.list_pools() {
        let back = restored.pool_stats(&pool.name).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Offers and asks are soft state: none survives a restart, and open asks count as declined.
        let mut counters = pool.counters;
        let c = &pool.counters;
        counters.reclaim_declined += c.reclaim_asked - c.reclaim_returned - c.reclaim_declined - c.revoked;
        prop_assert_eq!(
            (back.used, back.live_leases, back.counters),
            (pool.used, pool.live_leases, counters)
        );
        prop_assert_eq!((back.reclaimable, back.reclaiming), (0, 0));
    }
    Ok(())
}
