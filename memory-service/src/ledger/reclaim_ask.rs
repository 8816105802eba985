//! Asking for reclaimable leases back when Allocate calls wait for room they could give, and
//! revoking the leases not given back by their deadline.
//!
//! The policy, in one place: walk the waiters in queue order, as `serve_waiters` does; a waiter
//! whose shortfall in each pool it names is covered by that pool's offered bytes can be served
//! by reclaiming, and each pool is asked for the largest such shortfall, less what is already
//! asked. So a pool is asked only for what waiters lack (rounded up to whole leases, earliest
//! offered first), never for a waiter that reclaiming alone cannot serve, and never twice for the
//! same bytes. It runs whenever the answer can grow (a waiter queued, room freed, an offer made
//! or taken back), so `check_reclaim` can demand that nothing is left to ask after any operation.

use tokio::time::Instant;

use super::{
    EventKind, LeaseId, Ledger, PoolId, Release,
    events::Change,
    reclaim::{Ask, StreamId},
};

impl Ledger {
    /// Asks the holders of offered leases for what waiting calls lack and reclaiming can give.
    pub(super) fn ask_reclaims(&mut self, now: Instant) {
        if self.reclaim.marks.is_empty() || self.waiters.is_empty() {
            return;
        }
        for (p, want) in self.reclaim_wanted() {
            self.ask_pool(p, want, now);
        }
    }

    /// Bytes to ask back now, per pool (only pools with something to ask). See the module docs.
    pub(super) fn reclaim_wanted(&self) -> Vec<(PoolId, u64)> {
        if self.reclaim.marks.is_empty() {
            return Vec::new();
        }
        let mut ahead = vec![0u128; self.pools.len()];
        let mut target = vec![0u128; self.pools.len()];
        for i in 0..self.waiters.len() {
            let Some(waiter) = self.waiters.get(i) else { break };
            let demand = &waiter.request.demand;
            let short = |p: PoolId, bytes: u64| {
                (ahead[p] + u128::from(bytes)).saturating_sub(u128::from(self.pools[p].available()))
            };
            // A call that left keeps its place until the next serving pass drops it (as in
            // `serve_waiters`), but nothing is reclaimed for it.
            let rescuable = !waiter.reply.is_closed()
                && demand
                    .iter()
                    .all(|&(p, bytes)| short(p, bytes) <= u128::from(self.pools[p].reclaimable()));
            if rescuable {
                for &(p, bytes) in demand {
                    target[p] = target[p].max(short(p, bytes));
                }
            }
            for &(p, bytes) in demand {
                ahead[p] += u128::from(bytes);
            }
        }
        target
            .into_iter()
            .enumerate()
            .filter_map(|(p, target)| {
                let want = target.saturating_sub(u128::from(self.pools[p].reclaiming()));
                // At most the pool's offered bytes, which fit in 64 bits.
                (want > 0).then(|| (p, u64::try_from(want).unwrap_or(u64::MAX)))
            })
            .collect()
    }

    /// Asks for `want` bytes of pool `p`: its earliest offered leases not asked yet, whole, until
    /// they cover it; one ask per stream that offers some of them.
    fn ask_pool(&mut self, p: PoolId, want: u64, now: Instant) {
        let mut left = want;
        // (stream, leases, bytes of `want` they cover), streams in the order first picked.
        let mut groups: Vec<(StreamId, Vec<LeaseId>, u64)> = Vec::new();
        for &(_, id) in self.reclaim.idle.get(p).into_iter().flatten() {
            if left == 0 {
                break;
            }
            let (Some(lease), Some(mark)) = (self.leases.get(&id), self.reclaim.marks.get(&id)) else {
                continue;
            };
            let covered = lease.size.min(left);
            left -= covered;
            match groups.iter_mut().find(|(stream, ..)| *stream == mark.stream) {
                Some((_, leases, bytes)) => {
                    leases.push(id);
                    *bytes += covered;
                }
                None => groups.push((mark.stream, vec![id], covered)),
            }
        }
        if groups.is_empty() {
            return;
        }
        let deadline = now + self.reclaim.timeout;
        for (stream, leases, needed) in groups {
            self.reclaim.next_ask += 1;
            let rid = self.reclaim.next_ask;
            for &id in &leases {
                let (Some(lease), Some(mark)) = (self.leases.get(&id), self.reclaim.marks.get_mut(&id))
                else {
                    continue;
                };
                mark.asked = Some(rid);
                let order = mark.order;
                self.reclaim.idle_mut(p).remove(&(order, id));
                let pool = &mut self.pools[p];
                pool.ask(lease.size, true);
                pool.counters_mut().reclaim_asked += 1;
                self.events.publish(Change::of_lease(EventKind::ReclaimRequested, pool, lease));
            }
            self.pools[p].counters_mut().reclaim_requests += 1;
            self.reclaim.asks.insert(rid, Ask { pool: p, stream, leases, needed, asked_at: now, deadline });
            self.reclaim.deadlines.insert((deadline, rid));
            if self.reclaim.deadlines.first() == Some(&(deadline, rid)) {
                // The reaper may sleep on a later deadline: it re-reads the earliest.
                self.reaper.notify_one();
            }
            self.reclaim.post(stream, rid);
        }
        self.touch_pool(p);
    }

    /// Revokes the leases of every ask whose deadline is at or before `now`: each still held and
    /// offered (answered leases left their ask). Returns how many were revoked.
    pub(super) fn revoke_due(&mut self, now: Instant) -> usize {
        let mut revoked = 0;
        while let Some(&(at, rid)) = self.reclaim.deadlines.first() {
            if at > now {
                break;
            }
            self.reclaim.deadlines.pop_first();
            let leases = self.reclaim.asks.get(&rid).map(|ask| ask.leases.clone()).unwrap_or_default();
            for id in leases {
                if self.remove_lease(id, Release::Revoked, now).is_some() {
                    revoked += 1;
                }
            }
            // Closed with its last lease; this only guards against an ask left behind.
            self.reclaim.asks.remove(&rid);
        }
        revoked
    }

    /// The earliest deadline of an open ask.
    pub(super) fn next_reclaim_deadline(&self) -> Option<Instant> {
        self.reclaim.deadlines.first().map(|&(at, _)| at)
    }
}
