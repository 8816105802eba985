//! The ledger: a plain synchronous state machine owning pools, leases, deadlines and waiters.
//!
//! Every operation takes `now` explicitly, so the whole policy (expiry, FIFO waiting, idempotency)
//! is unit- and property-testable without a runtime; the gRPC layer is a thin shell that holds the
//! ledger behind a mutex and never awaits while holding it.

mod allocation;
mod durable;
mod error;
mod events;
mod expiry;
mod invariants;
mod lease;
mod lifecycle;
mod limits;
mod offers;
mod pool_account;
mod pools;
mod reclaim;
mod reclaim_ask;
mod request;
mod restore;
mod scopes;
mod wait_queue;
mod waiting;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_durable;
#[cfg(test)]
mod tests_events;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_reclaim;

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};

use self::{
    durable::Dirty,
    events::{Change, EventBus},
    expiry::ExpiryQueue,
    limits::PerHolder,
    pool_account::Pool,
    reclaim::Reclaim,
    request::{PoolBytes, Replay},
    wait_queue::WaitQueue,
};
pub use self::{
    durable::{Batch, StoredLease, StoredPool, StoredReplay},
    error::Error,
    error::Violations,
    events::{Event, EventKind, ResumeGap, Subscription},
    lease::{IdGen, Lease, LeaseId, LeaseMap, LeaseSet},
    limits::Limits,
    pool_account::{Counters, PoolId, PoolStats, Release},
    reclaim::{
        DEFAULT_RECLAIM_TIMEOUT, MAX_OFFERED, OfferHandle, Offered, ReclaimId, ReclaimNotice, StreamId,
    },
    request::{AllocRequest, AllocateOutcome, Feasibility, Grant, PoolFit, Resolved},
    restore::{Restored, Snapshot},
};

/// Largest pool: 4 EiB. Bounding capacity bounds every sum of live lease sizes, so the books
/// cannot overflow whatever a client asks.
pub const MAX_CAPACITY: u64 = 1 << 62;

/// All of memory-service's state. See the module docs.
#[derive(Debug)]
pub struct Ledger {
    pools: Vec<Pool>,
    pool_index: HashMap<Arc<str>, PoolId>,
    leases: LeaseMap<Lease>,
    scopes: HashMap<Arc<str>, LeaseSet>,
    expiry: ExpiryQueue,
    waiters: WaitQueue,
    replays: HashMap<Arc<str>, Replay>,
    events: EventBus,
    ids: IdGen,
    epoch: u64,
    /// Woken when the earliest deadline moves earlier, so the reaper re-arms its timer.
    reaper: Arc<Notify>,
    /// Told of every lease that leaves (metrics).
    observer: Option<Arc<dyn ReleaseObserver>>,
    limits: Limits,
    holder_leases: PerHolder,
    holder_waiters: PerHolder,
    /// Scopes are keyed by holder and name, not name alone (see `set_scopes_per_holder`).
    scopes_per_holder: bool,
    /// What changed since the last commit to the store, if there is one.
    dirty: Dirty,
    /// Leases offered as reclaimable, and the asks for them (soft state, never stored).
    reclaim: Reclaim,
}

/// Learns how long each lease lived and how it ended.
pub trait ReleaseObserver: Send + Sync + std::fmt::Debug {
    /// A lease of pool `id` (named `pool`; ids are stable, pools are never removed) left after
    /// `lived`, freed or expired.
    fn released(&self, id: PoolId, pool: &str, lived: Duration, how: Release);

    /// A lease of pool `id` asked back by a ReclaimRequest came back `after` the ask: returned
    /// by its holder (freed, or expired), or `revoked` at the deadline.
    fn reclaim_answered(&self, id: PoolId, pool: &str, after: Duration, revoked: bool) {
        let _ = (id, pool, after, revoked);
    }
}

impl Ledger {
    /// An empty ledger whose event ring holds `event_capacity` events per watcher.
    pub fn new(event_capacity: usize) -> Self {
        let mut ids = IdGen::from_os();
        Ledger {
            pools: Vec::new(),
            pool_index: HashMap::new(),
            leases: LeaseMap::default(),
            scopes: HashMap::new(),
            expiry: ExpiryQueue::default(),
            waiters: WaitQueue::default(),
            replays: HashMap::new(),
            events: EventBus::new(event_capacity),
            epoch: ids.next_u64(),
            ids,
            reaper: Arc::new(Notify::new()),
            observer: None,
            limits: Limits::default(),
            holder_leases: PerHolder::default(),
            holder_waiters: PerHolder::default(),
            scopes_per_holder: false,
            dirty: Dirty::default(),
            reclaim: Reclaim::default(),
        }
    }

    /// Reports every lease release to `observer`.
    pub fn observe_releases(&mut self, observer: Arc<dyn ReleaseObserver>) {
        self.observer = Some(observer);
    }

    /// The epoch: random per ledger, kept by a restore, so clients notice a restart that lost
    /// the state.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Notified when the earliest deadline moves earlier.
    pub fn reaper_notify(&self) -> Arc<Notify> {
        self.reaper.clone()
    }

    /// A receiver of every event released from now on, and the retained events after
    /// `after`, if asked (a watcher that resumes).
    pub fn subscribe(&self, after: Option<u64>) -> Result<Subscription, ResumeGap> {
        self.events.subscribe(after)
    }

    /// Releases to watchers the held events numbered up to `through`: the batch that carried
    /// them is on disk.
    pub fn release_events(&mut self, through: u64) {
        self.events.release(through);
    }

    /// Takes back leases whose grant was not delivered (its commit failed, or its caller left):
    /// freed, and if their grant's event was never released, no watcher hears of them at all.
    /// Leases already gone are skipped. Returns how many were freed.
    pub fn withdraw(&mut self, leases: &[LeaseId], now: Instant) -> usize {
        let mut freed = 0;
        for &id in leases {
            if self.free(id, now).is_ok() {
                self.events.withdraw(id);
                freed += 1;
            }
        }
        freed
    }
}
