//! Reclaimable leases: the leases each KeepAlive stream offers as a cache, and what happens to
//! an offer when its lease leaves, its holder takes it back, or its stream ends.
//!
//! Offers are soft state of a stream, never stored: a holder that restarts, or whose stream
//! breaks, offers nothing until it says so again, and its leases stay held meanwhile. Asking
//! for offered leases back, and revoking those not given back in time, is in `reclaim_ask`.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{Error, Lease, LeaseId, LeaseMap, LeaseSet, Ledger, PoolId, Release};

/// Most leases one stream may offer: as many as one KeepAlive message may name, so a whole set
/// always fits in one message.
pub const MAX_OFFERED: usize = 1024;

/// How long a holder has to answer a ReclaimRequest unless configured otherwise.
pub const DEFAULT_RECLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// Identifies a KeepAlive stream that offers leases.
pub type StreamId = u64;
/// Identifies one ReclaimRequest.
pub type ReclaimId = u64;

/// An offered lease.
#[derive(Debug)]
pub(super) struct Mark {
    /// The stream that offers it (and hears the ask).
    pub(super) stream: StreamId,
    /// When it was offered, as a ledger-wide counter: the earliest offered is asked first.
    pub(super) order: u64,
    /// The ask that names it, if it was asked back.
    pub(super) asked: Option<ReclaimId>,
}

/// One stream's offer.
#[derive(Debug)]
pub(super) struct Offer {
    /// The leases it offers, at most [`MAX_OFFERED`].
    pub(super) leases: LeaseSet,
    /// Asks not yet sent on the stream, oldest first; at most one per open ask of this stream,
    /// so at most [`MAX_OFFERED`].
    pub(super) outbox: VecDeque<ReclaimId>,
    /// Wakes the stream's task when the outbox fills: the ledger never waits on a stream.
    wake: Arc<Notify>,
}

/// One ReclaimRequest still open: some lease it names is still held, offered and not revoked.
#[derive(Debug)]
pub(super) struct Ask {
    pub(super) pool: PoolId,
    pub(super) stream: StreamId,
    /// The leases still asked for, earliest offered first.
    pub(super) leases: Vec<LeaseId>,
    /// Bytes of the waiters' shortfall they were picked to cover.
    pub(super) needed: u64,
    pub(super) asked_at: Instant,
    pub(super) deadline: Instant,
}

/// The ledger's reclaim state. Every lease is offered by at most one stream and named by at
/// most one open ask, so marks bound everything else here (see `check_reclaim`).
#[derive(Debug)]
pub(super) struct Reclaim {
    pub(super) marks: LeaseMap<Mark>,
    pub(super) offers: HashMap<StreamId, Offer>,
    /// Per pool, the offered leases not asked for, by (order, id): the next to ask is first.
    pub(super) idle: Vec<BTreeSet<(u64, LeaseId)>>,
    pub(super) asks: HashMap<ReclaimId, Ask>,
    /// Open asks by deadline, so revocation touches only what is due (like expiry).
    pub(super) deadlines: BTreeSet<(Instant, ReclaimId)>,
    next_order: u64,
    next_stream: StreamId,
    pub(super) next_ask: ReclaimId,
    pub(super) timeout: Duration,
}

impl Default for Reclaim {
    fn default() -> Self {
        Reclaim {
            marks: LeaseMap::default(),
            offers: HashMap::new(),
            idle: Vec::new(),
            asks: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_order: 0,
            next_stream: 0,
            next_ask: 0,
            timeout: DEFAULT_RECLAIM_TIMEOUT,
        }
    }
}

impl Reclaim {
    /// The idle set of pool `p`, grown on first use (pools are created at any time).
    pub(super) fn idle_mut(&mut self, p: PoolId) -> &mut BTreeSet<(u64, LeaseId)> {
        if self.idle.len() <= p {
            self.idle.resize_with(p + 1, BTreeSet::new);
        }
        &mut self.idle[p]
    }

    /// Takes `id` out of ask `rid`; an ask left with no lease is closed.
    pub(super) fn leave_ask(&mut self, rid: ReclaimId, id: LeaseId) {
        let Some(ask) = self.asks.get_mut(&rid) else { return };
        ask.leases.retain(|&l| l != id);
        if ask.leases.is_empty() {
            let (deadline, stream) = (ask.deadline, ask.stream);
            self.asks.remove(&rid);
            self.deadlines.remove(&(deadline, rid));
            // Not sent yet: nothing left to ask for, so nothing to send.
            if let Some(offer) = self.offers.get_mut(&stream) {
                offer.outbox.retain(|&r| r != rid);
            }
        }
    }

    /// Queues ask `rid` on `stream` and wakes its task.
    pub(super) fn post(&mut self, stream: StreamId, rid: ReclaimId) {
        if let Some(offer) = self.offers.get_mut(&stream) {
            offer.outbox.push_back(rid);
            offer.wake.notify_one();
        }
    }
}

/// A ReclaimRequest to send on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimNotice {
    /// The ask's id.
    pub id: ReclaimId,
    /// The pool.
    pub pool: Arc<str>,
    /// The leases still asked for, earliest offered first.
    pub leases: Vec<LeaseId>,
    /// Their total size.
    pub bytes: u64,
    /// Bytes of the shortfall they cover (at most `bytes`).
    pub needed: u64,
    /// Time left before they are revoked.
    pub within: Duration,
}

/// What a new reclaimable set left offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    /// Leases the stream offers now.
    pub offered: usize,
    /// Ids in the set that name no live lease (ignored), each once.
    pub not_found: Vec<LeaseId>,
}

/// A stream's way to hear its asks: its id, and the notification that says some are waiting.
#[derive(Debug, Clone)]
pub struct OfferHandle {
    /// The stream's id in the ledger.
    pub id: StreamId,
    /// Notified when asks wait in the stream's outbox ([`Ledger::take_notices`]).
    pub wake: Arc<Notify>,
}

impl Ledger {
    /// How long a holder has to answer an ask before its leases are revoked.
    pub fn set_reclaim_timeout(&mut self, timeout: Duration) {
        self.reclaim.timeout = timeout;
    }

    /// The reclaim timeout in force.
    pub fn reclaim_timeout(&self) -> Duration {
        self.reclaim.timeout
    }

    /// Registers a stream that will offer leases. It must be closed with
    /// [`Ledger::close_offer`] when it ends.
    pub fn open_offer(&mut self) -> OfferHandle {
        self.reclaim.next_stream += 1;
        let id = self.reclaim.next_stream;
        let wake = Arc::new(Notify::new());
        let offer = Offer { leases: LeaseSet::default(), outbox: VecDeque::new(), wake: wake.clone() };
        self.reclaim.offers.insert(id, offer);
        OfferHandle { id, wake }
    }

    /// Replaces the leases `stream` offers with `ids` (ownership already checked). Leases it
    /// no longer names are taken back, declining any ask for them; leases it offered already
    /// keep their place; new ones join last, in order (a lease another stream offered moves
    /// here). Then waiters the offer can serve are asked for.
    pub fn set_reclaimable(
        &mut self,
        stream: StreamId,
        ids: &[LeaseId],
        now: Instant,
    ) -> Result<Offered, Error> {
        if ids.len() > MAX_OFFERED {
            return Err(Error::invalid(
                "reclaimable.lease_ids",
                format!("at most {MAX_OFFERED} leases per stream, got {}", ids.len()),
            ));
        }
        if !self.reclaim.offers.contains_key(&stream) {
            // Only a stream's own task sets its offer, between open and close.
            return Err(Error::invalid("reclaimable", "this stream no longer offers leases"));
        }
        self.reap(now);
        let mut seen = LeaseSet::with_capacity_and_hasher(ids.len(), Default::default());
        let mut keep = LeaseSet::with_capacity_and_hasher(ids.len(), Default::default());
        let (mut fresh, mut not_found) = (Vec::new(), Vec::new());
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            if !self.leases.contains_key(&id) {
                not_found.push(id);
                continue;
            }
            keep.insert(id);
            if self.reclaim.marks.get(&id).is_none_or(|m| m.stream != stream) {
                fresh.push(id);
            }
        }
        let dropped: Vec<LeaseId> = self
            .reclaim
            .offers
            .get(&stream)
            .map(|o| o.leases.iter().filter(|id| !keep.contains(id)).copied().collect())
            .unwrap_or_default();
        for id in dropped {
            self.unmark(id);
        }
        for id in fresh {
            self.unmark(id);
            self.mark(stream, id);
        }
        self.ask_reclaims(now);
        Ok(Offered { offered: self.offered(stream), not_found })
    }

    /// How many leases `stream` offers.
    pub fn offered(&self, stream: StreamId) -> usize {
        self.reclaim.offers.get(&stream).map_or(0, |o| o.leases.len())
    }

    /// The asks waiting to be sent on `stream`, as they stand now (leases answered since are
    /// left out; asks fully answered are dropped).
    pub fn take_notices(&mut self, stream: StreamId, now: Instant) -> Vec<ReclaimNotice> {
        let Some(offer) = self.reclaim.offers.get_mut(&stream) else { return Vec::new() };
        let rids: Vec<ReclaimId> = offer.outbox.drain(..).collect();
        rids.into_iter()
            .filter_map(|rid| {
                let ask = self.reclaim.asks.get(&rid)?;
                let bytes = ask.leases.iter().filter_map(|id| self.leases.get(id)).map(|l| l.size).sum();
                Some(ReclaimNotice {
                    id: rid,
                    pool: self.pools[ask.pool].name().clone(),
                    leases: ask.leases.clone(),
                    bytes,
                    needed: ask.needed.min(bytes),
                    within: ask.deadline.saturating_duration_since(now),
                })
            })
            .collect()
    }

    /// `stream` ended: it offers nothing any more (its asks are declined, its leases stay held),
    /// and waiters are asked for elsewhere.
    pub fn close_offer(&mut self, stream: StreamId, now: Instant) {
        let Some(offer) = self.reclaim.offers.remove(&stream) else { return };
        for id in offer.leases {
            self.unmark(id);
        }
        self.ask_reclaims(now);
    }

    /// Offers live lease `id` on `stream` (not offered by any stream yet).
    fn mark(&mut self, stream: StreamId, id: LeaseId) {
        let Some(lease) = self.leases.get(&id) else { return };
        let (p, size) = (lease.pool, lease.size);
        let r = &mut self.reclaim;
        let Some(offer) = r.offers.get_mut(&stream) else { return };
        offer.leases.insert(id);
        r.next_order += 1;
        let order = r.next_order;
        r.marks.insert(id, Mark { stream, order, asked: None });
        r.idle_mut(p).insert((order, id));
        self.pools[p].offer(size, true);
    }

    /// Takes back the offer of live lease `id`, if any: an ask for it is declined.
    fn unmark(&mut self, id: LeaseId) {
        let Some(mark) = self.reclaim.marks.remove(&id) else { return };
        if let Some(offer) = self.reclaim.offers.get_mut(&mark.stream) {
            offer.leases.remove(&id);
        }
        // Only live leases are offered: a lease leaving goes through `forget_offer` instead.
        let Some(lease) = self.leases.get(&id) else { return };
        let (p, size) = (lease.pool, lease.size);
        let pool = &mut self.pools[p];
        pool.offer(size, false);
        match mark.asked {
            Some(rid) => {
                pool.ask(size, false);
                pool.counters_mut().reclaim_declined += 1;
                self.reclaim.leave_ask(rid, id);
                self.touch_pool(p);
            }
            None => {
                self.reclaim.idle_mut(p).remove(&(mark.order, id));
            }
        }
    }

    /// `lease` is leaving (`how`), already out of `leases`: its offer goes with it, and if it was
    /// asked for, it is an answer (returned, or revoked) and its bytes are reclaimed. Called by
    /// `release`, so before the pool's counters are written.
    pub(super) fn forget_offer(&mut self, lease: &Lease, how: Release, now: Instant) {
        if self.reclaim.marks.is_empty() {
            return;
        }
        let Some(mark) = self.reclaim.marks.remove(&lease.id) else { return };
        if let Some(offer) = self.reclaim.offers.get_mut(&mark.stream) {
            offer.leases.remove(&lease.id);
        }
        let pool = &mut self.pools[lease.pool];
        pool.offer(lease.size, false);
        let Some(rid) = mark.asked else {
            self.reclaim.idle_mut(lease.pool).remove(&(mark.order, lease.id));
            return;
        };
        pool.ask(lease.size, false);
        let counters = pool.counters_mut();
        // A revocation is counted as such by the pool's release.
        if how != Release::Revoked {
            counters.reclaim_returned += 1;
        }
        counters.reclaimed_bytes += u128::from(lease.size);
        if let (Some(ask), Some(observer)) = (self.reclaim.asks.get(&rid), &self.observer) {
            // When the bytes came back: a lease is dead at its deadline (or its ask's), however
            // late the reaper noticed.
            let back = match how {
                Release::Freed => now,
                Release::Expired => lease.expires_at.min(now),
                Release::Revoked => ask.deadline.min(now),
            };
            let waited = back.saturating_duration_since(ask.asked_at);
            observer.reclaim_answered(lease.pool, pool.name(), waited, how == Release::Revoked);
        }
        self.reclaim.leave_ask(rid, lease.id);
    }
}
