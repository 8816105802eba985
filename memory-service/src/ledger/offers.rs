//! Offering leases as a cache: a KeepAlive stream opens, sets, hears and closes its offer, and a
//! lease leaving takes its offer with it.
//!
//! These are the ledger's operations over the reclaim state of `reclaim` (which holds the marks,
//! offers and asks, and the invariants between them); asking offered leases back is in
//! `reclaim_ask`.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    Error, Lease, LeaseId, LeaseSet, Ledger, Release,
    reclaim::{MAX_OFFERED, OfferHandle, Offered, ReclaimId, ReclaimNotice, StreamId},
};

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
        self.reclaim.open()
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
        if self.reclaim.mark(stream, id, p) {
            self.pools[p].offer(size, true);
        }
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
