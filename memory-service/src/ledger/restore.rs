//! Restoring the ledger at start-up from what the store holds: pools, leases with the time they
//! have left, idempotency records, and the event tail watchers resume from.
//!
//! Separate from `durable` (the journal of what changed, written while the server runs): this is
//! the other direction, run once into a fresh ledger, and the only place that turns wall-clock
//! deadlines back into monotonic ones and decides what cannot be accounted for.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{
    Error, Lease, Ledger,
    durable::{StoredLease, StoredPool, StoredReplay},
    request::Replay,
};

/// Everything a store holds, read back at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The epoch of the ledger that wrote it.
    pub epoch: Option<u64>,
    /// The sequence number of the latest event released (0 for a store that has none).
    pub events: u64,
    /// The latest events stored, oldest first.
    pub event_tail: Vec<super::Event>,
    /// Pools.
    pub pools: Vec<StoredPool>,
    /// Leases.
    pub leases: Vec<StoredLease>,
    /// Idempotency records.
    pub replays: Vec<StoredReplay>,
}

/// What a restore found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Leases alive again, with their remaining time.
    pub live: usize,
    /// Leases whose deadline passed while the server was down, expired at once.
    pub expired: usize,
    /// Stored leases that cannot be accounted for (their pool is not stored, or they do not fit
    /// in what is left of it): not restored, and deleted from the store by the next commit. Only
    /// a damaged or hand-edited store has any.
    pub dropped: usize,
    /// Pools whose stored counters did not add up with the leases restored (a dropped lease,
    /// or a damaged store), and were made to (see `Pool::reconcile_counters`).
    pub reconciled: usize,
}

impl Ledger {
    /// Loads `snapshot` into this (fresh) ledger: the epoch, pools and their counters, leases with
    /// the time they have left, and idempotency records. Leases whose deadline passed while the
    /// server was down expire now, with EXPIRED events and counters. Leases of a pool the
    /// snapshot lacks, or too big for what is left of their pool, are dropped (they cannot be
    /// accounted for) and noted as gone, so the next commit deletes them instead of every start
    /// dropping them again.
    pub fn restore(&mut self, snapshot: Snapshot, now: Instant, wall: SystemTime) -> Result<Restored, Error> {
        if let Some(epoch) = snapshot.epoch {
            self.epoch = epoch;
        }
        // Same epoch, so the same numbering: watchers resume by (epoch, sequence).
        self.events.continue_after(snapshot.events, snapshot.event_tail);
        for pool in &snapshot.pools {
            // Restored pools are not new: bypass the pool bound, which may have been lowered.
            let id = self.pools.len();
            self.pools.push(super::pool_account::Pool::new(pool.name.clone(), pool.capacity));
            self.pool_index.insert(pool.name.clone(), id);
        }
        let to_mono = |at: SystemTime| match at.duration_since(wall) {
            Ok(ahead) => now + ahead,
            Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
        };
        let mut restored = Restored::default();
        for stored in snapshot.leases {
            let fits =
                self.pool_index.get(&stored.pool).filter(|&&p| stored.size <= self.pools[p].available());
            let Some(&p) = fits else {
                restored.dropped += 1;
                self.touch_gone(stored.id);
                continue;
            };
            let expires_at = to_mono(stored.deadline);
            let lease = Lease {
                id: stored.id,
                pool: p,
                size: stored.size,
                holder: stored.holder,
                scope: stored.scope,
                ttl: stored.ttl,
                expires_at,
                request_key: stored.request_key,
                granted_at: to_mono(stored.granted),
            };
            self.pools[p].take(lease.size);
            self.expiry.insert(lease.expires_at, lease.id);
            if let Some(scope) = &lease.scope {
                let key = self.scope_key(&lease.holder, scope);
                match self.scopes.get_mut(&*key) {
                    Some(members) => members.insert(lease.id),
                    None => self.scopes.entry(Arc::from(key)).or_default().insert(lease.id),
                };
            }
            self.holder_leases.add(&lease.holder, 1);
            if lease.expires_at <= now {
                restored.expired += 1;
            } else {
                restored.live += 1;
            }
            self.leases.insert(lease.id, lease);
        }
        // The stored counters already count the restored leases, unless the store is damaged:
        // then they are made to add up, and written back by the next commit.
        for (p, pool) in snapshot.pools.iter().enumerate() {
            self.pools[p].restore_counters(pool.peak_used, pool.counters);
            if self.pools[p].reconcile_counters() {
                restored.reconciled += 1;
                self.touch_pool(p);
            }
            if self.pools[p].close_restored_asks() {
                self.touch_pool(p);
            }
        }
        for replay in snapshot.replays {
            let items: Option<Vec<_>> = replay
                .items
                .iter()
                .map(|(pool, size)| self.pool_index.get(pool).map(|&p| (p, *size)))
                .collect();
            // A record whose pool or leases did not come back can never be replayed: noted as
            // changed, so the next commit deletes it (it is absent from the books).
            let Some(items) = items.filter(|_| replay.leases.iter().all(|id| self.leases.contains_key(id)))
            else {
                self.touch_replay(&replay.key);
                continue;
            };
            self.replays.insert(
                replay.key,
                Replay { items, scope: replay.scope, ttl: replay.ttl, leases: replay.leases },
            );
        }
        // Deadlines that passed while down: expired now, as the reaper would have.
        self.reap(now);
        Ok(restored)
    }
}
