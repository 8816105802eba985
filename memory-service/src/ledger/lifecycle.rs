//! A lease's life after its grant: renewal, free, expiry, and the release that returns it to its
//! pool and indexes.

use super::*;

impl Ledger {
    /// Number of live leases (all pools).
    pub fn live_leases(&self) -> usize {
        self.leases.len()
    }

    /// The earliest deadline (a lease's expiry, or an ask's revocation), for the reaper's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.expiry.next_deadline(), self.next_reclaim_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
        self.touch_lease(id);
        let pool = &self.pools[lease.pool];
        self.events.publish(Change::of_lease(EventKind::Renewed, pool, &lease));
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

    /// Reclaims every lease whose deadline is at or before `now`, and revokes the leases of
    /// every ask whose deadline is, all at once (never rate limited), then hands the room to
    /// waiters. Returns how many leases went (expired or revoked).
    pub fn reap(&mut self, now: Instant) -> usize {
        let mut gone = 0;
        while let Some(id) = self.expiry.pop_due(now) {
            if let Some(lease) = self.leases.remove(&id) {
                self.release(lease, Release::Expired, now);
                gone += 1;
            }
        }
        gone += self.revoke_due(now);
        if gone > 0 {
            self.serve_waiters(now);
        }
        gone
    }

    pub(super) fn check_live(&mut self, id: LeaseId, now: Instant) -> Result<(), Error> {
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

    pub(super) fn remove_lease(&mut self, id: LeaseId, how: Release, now: Instant) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.expiry.remove(lease.expires_at, id);
        Some(self.release(lease, how, now))
    }

    /// Returns a lease, already out of `leases` and `expiry`, to its pool and its indexes.
    pub(super) fn release(&mut self, lease: Lease, how: Release, now: Instant) -> Lease {
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
        self.forget_offer(&lease, how, now);
        // The grant is no longer whole: a retry under its key allocates afresh. Only if the
        // record is this lease's grant: a newer grant under the same key (made after another of
        // the old leases was freed) keeps its replay.
        if let Some(key) = &lease.request_key
            && self.replays.get(key).is_some_and(|replay| replay.leases.contains(&id))
        {
            self.replays.remove(key);
            self.touch_replay(key);
        }
        self.touch_gone(id);
        self.touch_pool(lease.pool);
        let pool = &mut self.pools[lease.pool];
        pool.give_back(lease.size, how);
        if let Some(observer) = &self.observer {
            // Expired leases died at their deadline, however late the reaper noticed.
            let ended = if how == Release::Expired { lease.expires_at } else { now };
            observer.released(
                lease.pool,
                pool.name(),
                ended.saturating_duration_since(lease.granted_at),
                how,
            );
        }
        let kind = match how {
            Release::Freed => EventKind::Freed,
            Release::Expired => EventKind::Expired,
            Release::Revoked => EventKind::Revoked,
        };
        self.events.publish(Change::of_lease(kind, pool, &lease));
        lease
    }
}
