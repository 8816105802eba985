//! The ledger's side of durability: which records changed since the last commit (a journal of
//! dirty keys, not of operations), and the batch that writes them. Reading them back at start-up
//! is in `restore`.
//!
//! Tracking keys rather than operations coalesces: a lease renewed a hundred times between two
//! commits is written once, with its latest deadline. A lease that is gone (freed, expired) is
//! appended to a plain list instead: lease ids are never reused, so its removal needs no
//! coalescing, and a mass expiry of 100,000 leases costs the reaper a vector push per lease
//! rather than a hash-set insert, and the batch a move rather than 100,000 lookups under the
//! ledger's lock. Every change bumps a sequence number; a caller whose change has sequence `n`
//! may answer once a commit of a batch taken at `>= n` is durable. The store itself (files,
//! fsync) lives outside, behind this plain-data interface, so the ledger stays synchronous and
//! testable without a runtime.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{Counters, LeaseId, LeaseSet, Ledger, PoolId};

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPool {
    /// Its name.
    pub name: Arc<str>,
    /// Its capacity.
    pub capacity: u64,
    /// Highest use seen.
    pub peak_used: u64,
    /// Cumulative counters.
    pub counters: Counters,
}

/// A lease as stored: deadlines on the wall clock, which (unlike the monotonic clock) means
/// something to the next process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// Its id.
    pub id: LeaseId,
    /// Its pool.
    pub pool: Arc<str>,
    /// Bytes held.
    pub size: u64,
    /// Who holds it.
    pub holder: Arc<str>,
    /// Its scope.
    pub scope: Option<Arc<str>>,
    /// TTL applied at each renewal.
    pub ttl: Duration,
    /// When it dies unless renewed.
    pub deadline: SystemTime,
    /// When it was granted.
    pub granted: SystemTime,
    /// Idempotency key of the Allocate that granted it.
    pub request_key: Option<Arc<str>>,
}

/// An idempotency record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReplay {
    /// Holder and request id.
    pub key: Arc<str>,
    /// (pool, bytes) per item, in request order.
    pub items: Vec<(Arc<str>, u64)>,
    /// Scope asked.
    pub scope: Option<Arc<str>>,
    /// TTL asked.
    pub ttl: Duration,
    /// The leases granted.
    pub leases: Vec<LeaseId>,
}

/// What changed since the last batch: live keys with their current values, removed keys alone.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Changes up to this sequence number are in the batch.
    pub seq: u64,
    /// The server epoch (it never changes; the store writes it once).
    pub epoch: u64,
    /// The sequence number of the latest event this batch carries (or of the latest released,
    /// if none): numbering goes on from it after a restart, and its commit releases up to it.
    pub events: u64,
    /// The events whose changes it carries, numbered: written with it, so a watcher can resume
    /// from them after a restart.
    pub event_records: Vec<Arc<super::Event>>,
    /// How many of the latest events the store keeps (older ones are deleted as new ones come).
    pub events_kept: u64,
    /// Pools whose capacity or counters changed.
    pub pools: Vec<StoredPool>,
    /// Leases granted or renewed, with their current values.
    pub leases: Vec<StoredLease>,
    /// Leases gone (freed or expired) since the last batch. Ids are never reused, so applying
    /// these after `leases` is right whatever the order of the changes was.
    pub gone: Vec<LeaseId>,
    /// Idempotency records made (`Some`) or dropped (`None`).
    pub replays: Vec<(Arc<str>, Option<StoredReplay>)>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records() == 0
    }

    /// How many records it writes.
    pub fn records(&self) -> usize {
        self.pools.len() + self.leases.len() + self.gone.len() + self.replays.len()
    }
}

/// Keys changed since the last batch.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    /// Off for an in-memory ledger: nothing is tracked.
    pub(super) on: bool,
    /// The sequence number of the latest change. Written under the ledger's lock, readable
    /// without it (a call waits for the commit of its change without locking the ledger again).
    pub(super) seq: Arc<AtomicU64>,
    pub(super) pools: Vec<bool>,
    /// Leases granted or renewed (their latest value is written).
    pub(super) leases: LeaseSet,
    /// Leases gone, in the order they went.
    pub(super) gone: Vec<LeaseId>,
    pub(super) replays: HashSet<Arc<str>>,
}

impl Ledger {
    /// Starts tracking changes for a store (an in-memory ledger tracks nothing). Returns the
    /// latest change's sequence number as it moves, readable without the lock.
    pub fn track_changes(&mut self) -> Arc<AtomicU64> {
        self.dirty.on = true;
        self.events.hold_until_durable(self.dirty.seq.clone());
        self.dirty.seq.clone()
    }

    fn bump(&mut self) {
        // Only ever written under the ledger's lock (`&mut self`): a load and a store, not a
        // locked read-modify-write, which a mass expiry would pay three times per lease.
        let seq = self.dirty.seq.load(Ordering::Relaxed);
        self.dirty.seq.store(seq + 1, Ordering::Release);
    }

    /// The sequence number of the latest change.
    pub fn change_seq(&self) -> u64 {
        self.dirty.seq.load(Ordering::Acquire)
    }

    pub(super) fn touch_pool(&mut self, p: PoolId) {
        if self.dirty.on {
            if self.dirty.pools.len() <= p {
                self.dirty.pools.resize(p + 1, false);
            }
            self.dirty.pools[p] = true;
            self.bump();
        }
    }

    pub(super) fn touch_lease(&mut self, id: LeaseId) {
        if self.dirty.on {
            self.dirty.leases.insert(id);
            self.bump();
        }
    }

    /// Notes a lease freed or expired.
    pub(super) fn touch_gone(&mut self, id: LeaseId) {
        if self.dirty.on {
            self.dirty.gone.push(id);
            self.bump();
        }
    }

    pub(super) fn touch_replay(&mut self, key: &Arc<str>) {
        if self.dirty.on {
            self.dirty.replays.insert(key.clone());
            self.bump();
        }
    }

    /// Takes every change since the last batch, with current values; deadlines are converted to
    /// the wall clock by the readings `now` and `wall` of the two clocks.
    pub fn take_batch(&mut self, now: Instant, wall: SystemTime) -> Batch {
        let to_wall = |at: Instant| {
            if at >= now {
                wall + (at - now)
            } else {
                wall.checked_sub(now - at).unwrap_or(SystemTime::UNIX_EPOCH)
            }
        };
        let dirty = std::mem::take(&mut self.dirty.pools);
        let pools = dirty.iter().enumerate().filter(|&(_, &d)| d).map(|(p, _)| self.stored_pool(p)).collect();
        // A lease granted and gone since the last batch is no longer in `leases`: only its
        // removal is written.
        let leases = std::mem::take(&mut self.dirty.leases)
            .into_iter()
            .filter_map(|id| {
                self.leases.get(&id).map(|l| StoredLease {
                    id,
                    pool: self.pools[l.pool].name().clone(),
                    size: l.size,
                    holder: l.holder.clone(),
                    scope: l.scope.clone(),
                    ttl: l.ttl,
                    deadline: to_wall(l.expires_at),
                    granted: to_wall(l.granted_at),
                    request_key: l.request_key.clone(),
                })
            })
            .collect();
        let gone = std::mem::take(&mut self.dirty.gone);
        let replays = std::mem::take(&mut self.dirty.replays)
            .into_iter()
            .map(|key| {
                let stored = self.replays.get(&key).map(|r| StoredReplay {
                    key: key.clone(),
                    items: r.items.iter().map(|&(p, size)| (self.pools[p].name().clone(), size)).collect(),
                    scope: r.scope.clone(),
                    ttl: r.ttl,
                    leases: r.leases.clone(),
                });
                (key, stored)
            })
            .collect();
        let (event_records, events) = self.events.number_held();
        Batch {
            seq: self.change_seq(),
            epoch: self.epoch,
            events,
            event_records,
            events_kept: self.events.capacity() as u64,
            pools,
            leases,
            gone,
            replays,
        }
    }

    /// Marks the keys of `batch` changed again (its commit failed), so the next batch writes
    /// their values as they are then.
    pub fn retake(&mut self, batch: &Batch) {
        // Its events were not kept: their numbers go back (see `EventBus::unnumber`).
        self.events.unnumber();
        for pool in &batch.pools {
            if let Some(&p) = self.pool_index.get(&pool.name) {
                self.touch_pool(p);
            }
        }
        for lease in &batch.leases {
            // Gone since (then it is in the next batch's removals): nothing to write again.
            if self.leases.contains_key(&lease.id) {
                self.touch_lease(lease.id);
            }
        }
        for &id in &batch.gone {
            self.touch_gone(id);
        }
        for (key, _) in &batch.replays {
            self.touch_replay(key);
        }
    }

    fn stored_pool(&self, p: PoolId) -> StoredPool {
        let stats = self.pools[p].stats();
        StoredPool {
            name: stats.name,
            capacity: stats.capacity,
            peak_used: stats.peak_used,
            counters: stats.counters,
        }
    }
}
