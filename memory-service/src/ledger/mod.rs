//! The ledger: a plain synchronous state machine owning pools, leases, deadlines and waiters.
//!
//! Every operation takes `now` explicitly, so the whole policy (expiry, FIFO waiting, idempotency)
//! is unit- and property-testable without a runtime; the gRPC layer is a thin shell that holds the
//! ledger behind a mutex and never awaits while holding it.

mod error;
mod events;
mod expiry;
mod invariants;
mod lease;
mod limits;
mod pool;
mod request;
mod scopes;
mod waiters;
mod waiting;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, broadcast, oneshot},
    time::Instant,
};

pub use self::{
    error::Error,
    error::Violations,
    events::{Event, EventKind},
    lease::{IdGen, Lease, LeaseId, LeaseMap, LeaseSet},
    limits::Limits,
    pool::{Counters, PoolId, PoolStats, Release},
    request::{Admission, AllocRequest, Feasibility, Grant, PoolFit, Resolved},
};
use self::{
    events::{Change, EventBus},
    expiry::ExpiryQueue,
    limits::PerHolder,
    pool::Pool,
    request::{PoolBytes, Replay},
    waiters::WaitQueue,
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
}

/// Learns how long each lease lived and how it ended.
pub trait ReleaseObserver: Send + Sync + std::fmt::Debug {
    /// `lease` of `pool` left after `lived`, freed or expired.
    fn released(&self, pool: &str, lived: Duration, how: Release);
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
        }
    }

    /// Reports every lease release to `observer`.
    pub fn observe_releases(&mut self, observer: Arc<dyn ReleaseObserver>) {
        self.observer = Some(observer);
    }

    /// Boot id: random per ledger, so clients notice a restart.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Notified when the earliest deadline moves earlier.
    pub fn reaper_notify(&self) -> Arc<Notify> {
        self.reaper.clone()
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

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

    /// Number of live leases (all pools).
    pub fn live_leases(&self) -> usize {
        self.leases.len()
    }

    /// The earliest lease deadline, for the reaper's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiry.next_deadline()
    }

    /// Whether `items` would be granted now. Unknown pools and malformed sizes are errors; a
    /// request larger than a pool is not (it is reported as `fits_capacity == false`).
    pub fn can_allocate(&mut self, items: &[(String, u64)], now: Instant) -> Result<Feasibility, Error> {
        self.reap(now);
        let (_, demand) = self.resolve_items(items)?;
        let fits_capacity = demand.iter().all(|&(p, bytes)| bytes <= self.pools[p].capacity());
        let pools = demand
            .iter()
            .map(|&(p, requested)| {
                let pool = &self.pools[p];
                PoolFit {
                    pool: pool.name().clone(),
                    requested,
                    available: pool.available(),
                    capacity: pool.capacity(),
                    waiters: pool.waiters(),
                }
            })
            .collect();
        Ok(Feasibility { now: self.fits_now(&demand), fits_capacity, pools })
    }

    /// Grants `request` now, queues it (if `may_wait`), or refuses it.
    pub fn allocate(
        &mut self,
        request: AllocRequest,
        now: Instant,
        may_wait: bool,
    ) -> Result<Admission, Error> {
        self.reap(now);
        let (items, demand) = self.resolve_items(&request.items)?;
        let key =
            request.request_id.as_ref().map(|id| Arc::<str>::from(format!("{}\u{0}{}", request.holder, id)));
        let resolved =
            Resolved { items, demand, holder: request.holder, scope: request.scope, ttl: request.ttl, key };

        if let Some(key) = &resolved.key {
            if let Some(grant) = self.replay(key, &resolved)? {
                return Ok(Admission::Granted(grant));
            }
            if self.waiters.has_key(key) {
                let id = request.request_id.as_deref().unwrap_or_default();
                return Err(Error::RequestInProgress(id.to_owned()));
            }
        }

        if let Some(&(p, requested)) =
            resolved.demand.iter().find(|&&(p, bytes)| bytes > self.pools[p].capacity())
        {
            let pool = &mut self.pools[p];
            pool.count_rejected();
            let err = Error::ExceedsCapacity {
                pool: pool.name().to_string(),
                requested,
                capacity: pool.capacity(),
            };
            self.publish_refusal(EventKind::Rejected, p, requested, &resolved);
            return Err(err);
        }

        self.check_lease_limits(&resolved)?;
        if self.fits_now(&resolved.demand) {
            return Ok(Admission::Granted(self.grant(&resolved, now)));
        }
        if !may_wait {
            let blocking = self.blocking(&resolved, None);
            for &(p, requested) in &blocking {
                self.pools[p].count_rejected();
                self.publish_refusal(EventKind::Rejected, p, requested, &resolved);
            }
            return Err(self.no_room(&resolved, &blocking, Duration::ZERO, false));
        }

        self.check_waiter_limits(&resolved)?;
        for &(p, bytes) in &resolved.demand {
            self.pools[p].add_waiter(bytes);
        }
        self.holder_waiters.add(&resolved.holder, 1);
        let (reply, grant) = oneshot::channel();
        let ticket = self.waiters.push(resolved, reply);
        Ok(Admission::Queued { ticket, grant })
    }

    /// Renews one lease to `now + ttl`.
    pub fn renew(&mut self, id: LeaseId, now: Instant) -> Result<Lease, Error> {
        self.check_live(id, now)?;
        self.reap(now);
        let lease = self.leases.get_mut(&id).ok_or_else(|| Error::LeaseNotFound(id.to_string()))?;
        self.expiry.remove(lease.expires_at, id);
        lease.expires_at = now + lease.ttl;
        let lease = lease.clone();
        self.expiry.insert(lease.expires_at, id);
        let pool = &self.pools[lease.pool];
        self.events.publish(Change {
            kind: EventKind::Renewed,
            pool: pool.name(),
            lease: Some(id),
            size: lease.size,
            holder: Some(&lease.holder),
            scope: lease.scope.as_ref(),
            pool_used: pool.used(),
        });
        Ok(lease)
    }

    /// Frees one lease.
    pub fn free(&mut self, id: LeaseId, now: Instant) -> Result<Lease, Error> {
        self.check_live(id, now)?;
        self.reap(now);
        let lease =
            self.remove_lease(id, Release::Freed, now).ok_or_else(|| Error::LeaseNotFound(id.to_string()))?;
        self.serve_waiters(now);
        Ok(lease)
    }

    /// Reclaims every lease whose deadline is at or before `now`, all at once (never rate
    /// limited), then hands the room to waiters. Returns how many expired.
    pub fn reap(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(id) = self.expiry.pop_due(now) {
            if let Some(lease) = self.leases.remove(&id) {
                self.release(lease, Release::Expired, now);
                expired += 1;
            }
        }
        if expired > 0 {
            self.serve_waiters(now);
        }
        expired
    }

    fn pool_id(&self, name: &str) -> Result<PoolId, Error> {
        self.pool_index.get(name).copied().ok_or_else(|| Error::PoolNotFound(serving::echo::echo(name)))
    }

    /// Resolves pool names and sums the demand per pool, refusing unknown pools, zero sizes and
    /// sums that overflow.
    fn resolve_items(&self, items: &[(String, u64)]) -> Result<(PoolBytes, PoolBytes), Error> {
        if items.is_empty() {
            return Err(Error::invalid("items", "at least one item is required"));
        }
        let mut resolved = Vec::with_capacity(items.len());
        let mut demand: Vec<(PoolId, u64)> = Vec::with_capacity(items.len());
        for (i, (name, size)) in items.iter().enumerate() {
            let p = self.pool_id(name)?;
            if *size == 0 {
                return Err(Error::invalid(format!("items[{i}].size_bytes"), "must be greater than zero"));
            }
            resolved.push((p, *size));
            match demand.iter_mut().find(|(q, _)| *q == p) {
                Some((_, sum)) => {
                    *sum = sum.checked_add(*size).ok_or_else(|| {
                        Error::invalid("items", format!("sizes asked of pool {name:?} overflow 64 bits"))
                    })?;
                }
                None => demand.push((p, *size)),
            }
        }
        Ok((resolved, demand))
    }

    /// True if `demand` fits now and leaves every pool room for what its waiters ask: a
    /// newcomer may pass waiters only where it cannot delay them (see `serve_waiters`).
    fn fits_now(&self, demand: &[(PoolId, u64)]) -> bool {
        demand.iter().all(|&(p, bytes)| {
            let pool = &self.pools[p];
            pool.fits_behind(pool.reserved(), bytes)
        })
    }

    fn check_live(&mut self, id: LeaseId, now: Instant) -> Result<(), Error> {
        match self.leases.get(&id) {
            None => Err(Error::LeaseNotFound(id.to_string())),
            // Dead at its deadline, even if the reaper has not run yet (etcd users' lesson).
            Some(lease) if lease.expires_at <= now => {
                let ago = now - lease.expires_at;
                self.reap(now);
                Err(Error::LeaseExpired { id: id.to_string(), ago })
            }
            Some(_) => Ok(()),
        }
    }

    /// Returns the leases already granted under `key`, or `None` if there are none. A key reused
    /// with different parameters is refused rather than silently answered with other leases.
    fn replay(&self, key: &str, request: &Resolved) -> Result<Option<Grant>, Error> {
        let Some(replay) = self.replays.get(key) else { return Ok(None) };
        if replay.items != request.items || replay.scope != request.scope || replay.ttl != request.ttl {
            return Err(Error::invalid(
                "request_id",
                "already used by an earlier Allocate with different items, scope or ttl; use a new request_id",
            ));
        }
        let leases = replay.leases.iter().filter_map(|id| self.leases.get(id).cloned()).collect();
        Ok(Some(Grant { leases, replayed: true }))
    }

    fn grant(&mut self, request: &Resolved, now: Instant) -> Grant {
        let expires_at = now + request.ttl;
        let mut leases = Vec::with_capacity(request.items.len());
        for &(p, size) in &request.items {
            // One probe: a vacant entry both proves the random id unused and is where it goes.
            let (id, slot) = loop {
                let id = self.ids.next_id();
                if let std::collections::hash_map::Entry::Vacant(slot) = self.leases.entry(id) {
                    break (id, slot);
                }
            };
            let pool = &mut self.pools[p];
            pool.take(size);
            let lease = slot
                .insert(Lease {
                    id,
                    pool: p,
                    size,
                    holder: request.holder.clone(),
                    scope: request.scope.clone(),
                    ttl: request.ttl,
                    expires_at,
                    request_key: request.key.clone(),
                    granted_at: now,
                })
                .clone();
            self.events.publish(Change {
                kind: EventKind::Allocated,
                pool: pool.name(),
                lease: Some(id),
                size,
                holder: Some(&lease.holder),
                scope: lease.scope.as_ref(),
                pool_used: pool.used(),
            });
            if self.expiry.insert(expires_at, id) {
                self.reaper.notify_one();
            }
            if let Some(scope) = &request.scope {
                let key = self.scope_key(&request.holder, scope);
                match self.scopes.get_mut(&*key) {
                    Some(members) => members.insert(id),
                    None => self.scopes.entry(Arc::from(key)).or_default().insert(id),
                };
            }
            leases.push(lease);
        }
        self.holder_leases.add(&request.holder, leases.len());
        if let Some(key) = &request.key {
            self.replays.insert(
                key.clone(),
                Replay {
                    items: request.items.clone(),
                    scope: request.scope.clone(),
                    ttl: request.ttl,
                    leases: leases.iter().map(|l| l.id).collect(),
                },
            );
        }
        Grant { leases, replayed: false }
    }

    fn remove_lease(&mut self, id: LeaseId, how: Release, now: Instant) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.expiry.remove(lease.expires_at, id);
        Some(self.release(lease, how, now))
    }

    /// Returns a lease, already out of `leases` and `expiry`, to its pool and its indexes.
    fn release(&mut self, lease: Lease, how: Release, now: Instant) -> Lease {
        let id = lease.id;
        if let Some(scope) = &lease.scope {
            let key = self.scope_key(&lease.holder, scope);
            if let Some(members) = self.scopes.get_mut(&*key) {
                members.remove(&id);
                if members.is_empty() {
                    self.scopes.remove(&*key);
                }
            }
        }
        self.holder_leases.sub(&lease.holder, 1);
        // The grant is no longer whole: a retry under its key allocates afresh. Only if the
        // record is this lease's grant: a newer grant under the same key (made after another of
        // the old leases was freed) keeps its replay.
        if let Some(key) = &lease.request_key
            && self.replays.get(key).is_some_and(|replay| replay.leases.contains(&id))
        {
            self.replays.remove(key);
        }
        let pool = &mut self.pools[lease.pool];
        pool.give_back(lease.size, how);
        if let Some(observer) = &self.observer {
            // Expired leases died at their deadline, however late the reaper noticed.
            let ended = if how == Release::Expired { lease.expires_at } else { now };
            observer.released(pool.name(), ended.saturating_duration_since(lease.granted_at), how);
        }
        self.events.publish(Change {
            kind: match how {
                Release::Freed => EventKind::Freed,
                Release::Expired => EventKind::Expired,
            },
            pool: pool.name(),
            lease: Some(id),
            size: lease.size,
            holder: Some(&lease.holder),
            scope: lease.scope.as_ref(),
            pool_used: pool.used(),
        });
        lease
    }
}
