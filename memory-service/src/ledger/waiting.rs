//! Waiting for room: serving the FIFO queue, abandoning a wait, and describing a refusal.

use std::time::Duration;

use tokio::time::Instant;

use super::{Error, EventKind, Ledger, PoolId, Release, Resolved, events::Change};

impl Ledger {
    /// Takes waiter `ticket` out of the queue. Returns `None` if it was no longer queued (it was
    /// granted: the grant is in its receiver). Otherwise the error to answer: if `timed_out`, the
    /// wait is counted and published as a timeout.
    pub fn abandon_wait(
        &mut self,
        ticket: u64,
        now: Instant,
        waited: Duration,
        timed_out: bool,
    ) -> Option<Error> {
        let waiter = self.waiters.remove(ticket)?;
        self.unqueue(&waiter.request);
        let blocking = self.blocking(&waiter.request, Some(ticket));
        let err = self.no_room(&waiter.request, &blocking, waited, timed_out);
        if timed_out {
            for &(p, requested) in &blocking {
                self.pools[p].count_wait_timeout();
                self.publish_refusal(EventKind::WaitTimedOut, p, requested, &waiter.request);
            }
        }
        // A waiter leaving can unblock those behind it on the same pools.
        self.serve_waiters(now);
        Some(err)
    }

    /// Drops every waiter (shutdown): their receivers see the channel closed.
    pub fn close_waiters(&mut self) {
        let waiters: Vec<_> = self.waiters.drain().collect();
        for waiter in waiters {
            self.unqueue(&waiter.request);
        }
    }

    /// Undoes the books of a waiter leaving the queue.
    fn unqueue(&mut self, request: &Resolved) {
        for &(p, bytes) in &request.demand {
            self.pools[p].remove_waiter(bytes);
        }
        self.holder_waiters.sub(&request.holder, 1);
    }

    /// Grants queued requests that now fit, in arrival order. The head-of-line policy is
    /// backfilling that cannot delay anyone ahead: a waiter is granted only if, in each of its
    /// pools, it leaves room for everything the waiters ahead of it ask of that pool. So a large
    /// request never starves behind a stream of small ones (they cannot eat into the room it is
    /// owed), and a request waiting on a full pool C does not freeze pools A and B it also names:
    /// others may take A and B down to what it needs of them. New requests follow the same rule
    /// (`fits_now`), against every waiter.
    pub(super) fn serve_waiters(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        // Bytes promised to the waiters already passed over, per pool.
        let mut ahead = vec![0u128; self.pools.len()];
        let mut index = 0;
        while let Some(waiter) = self.waiters.get(index) {
            let demand = &waiter.request.demand;
            if waiter.reply.is_closed() {
                // The call is gone (its guard is about to look for it): drop it, grant nothing.
                if let Some(gone) = self.waiters.remove_at(index) {
                    self.unqueue(&gone.request);
                }
                continue;
            }
            let fits = demand.iter().all(|&(p, bytes)| self.pools[p].fits_behind(ahead[p], bytes));
            if !fits {
                for &(p, bytes) in demand {
                    ahead[p] += u128::from(bytes);
                }
                index += 1;
                continue;
            }
            let Some(waiter) = self.waiters.remove_at(index) else { break };
            self.unqueue(&waiter.request);
            // Lease bounds are checked again: others may have taken leases while it waited.
            let outcome = match self.check_lease_limits(&waiter.request) {
                Ok(()) => Ok(self.grant(&waiter.request, now)),
                Err(err) => Err(err),
            };
            // The receiver is owned by the waiting call's guard, which takes the grant back out
            // and frees it if the call is gone; so a failed send here can only follow a dropped
            // guard, and the leases must be returned now.
            if let Err(Ok(grant)) = waiter.reply.send(outcome) {
                for lease in grant.leases {
                    self.remove_lease(lease.id, Release::Freed, now);
                }
            }
        }
        // Room came back or a waiter left: those still waiting may now be served by reclaiming.
        self.ask_reclaims(now);
    }

    /// The pools that keep `request` from being granted: too little room once the waiters ahead
    /// of it are served. `ticket` is the request's place in the queue (`None`: a new request,
    /// behind everyone). Only these pools are charged with a refusal or timeout.
    pub(super) fn blocking(&self, request: &Resolved, ticket: Option<u64>) -> Vec<(PoolId, u64)> {
        let blocking: Vec<_> = request
            .demand
            .iter()
            .copied()
            .filter(|&(p, bytes)| !self.pools[p].fits_behind(self.waiters.ahead_of(p, ticket), bytes))
            .collect();
        // A queued request that nothing blocks would have been granted already, so this fallback
        // only guards against describing a refusal with no pool at all.
        if blocking.is_empty() { request.demand.first().copied().into_iter().collect() } else { blocking }
    }

    /// The error for a refusal, naming the first blocking pool and its numbers.
    pub(super) fn no_room(
        &self,
        request: &Resolved,
        blocking: &[(PoolId, u64)],
        waited: Duration,
        timed_out: bool,
    ) -> Error {
        // `resolve_items` refuses empty requests, so there is always a pool to name.
        let Some(&(p, requested)) = blocking.first().or(request.demand.first()) else {
            return Error::invalid("items", "at least one item is required");
        };
        let pool = &self.pools[p];
        Error::NoRoom {
            pool: pool.name().to_string(),
            requested,
            available: pool.available(),
            capacity: pool.capacity(),
            waiters: pool.waiters(),
            waited,
            timed_out,
        }
    }

    pub(super) fn publish_refusal(&mut self, kind: EventKind, p: PoolId, requested: u64, request: &Resolved) {
        // The pool's refusal counters changed (every caller counts just before).
        self.touch_pool(p);
        let pool = &self.pools[p];
        self.events.publish(Change {
            kind,
            pool: pool.name(),
            lease: None,
            size: requested,
            holder: Some(&request.holder),
            scope: request.scope.as_ref(),
            pool_used: pool.used(),
        });
    }
}
