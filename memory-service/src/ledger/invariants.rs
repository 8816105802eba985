//! The accounting invariants, checked by unit, property and stress tests.

use super::{Ledger, lease::LeaseSet};

impl Ledger {
    /// Checks every accounting invariant; `Err` describes the first broken one. Used by tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut used = vec![0u64; self.pools.len()];
        let mut count = vec![0u64; self.pools.len()];
        for (id, lease) in &self.leases {
            used[lease.pool] += lease.size;
            count[lease.pool] += 1;
            if let Some(scope) = &lease.scope
                && !self.scopes.get(&*self.scope_key(&lease.holder, scope)).is_some_and(|s| s.contains(id))
            {
                return Err(format!("lease {id} missing from scope {scope}"));
            }
        }
        let mut waiting = vec![0u64; self.pools.len()];
        for i in 0..self.waiters.len() {
            if let Some(w) = self.waiters.get(i) {
                for &(p, _) in &w.request.demand {
                    waiting[p] += 1;
                }
            }
        }
        for (p, pool) in self.pools.iter().enumerate() {
            let s = pool.stats();
            if s.used + s.available != s.capacity {
                return Err(format!(
                    "{}: used {} + available {} != capacity {}",
                    s.name, s.used, s.available, s.capacity
                ));
            }
            if s.used != used[p] || s.live_leases != count[p] {
                return Err(format!(
                    "{}: books say {} bytes in {} leases, leases sum to {} in {}",
                    s.name, s.used, s.live_leases, used[p], count[p]
                ));
            }
            if s.waiters != waiting[p] {
                return Err(format!("{}: {} waiters counted, {} queued", s.name, s.waiters, waiting[p]));
            }
            let c = s.counters;
            if c.granted != c.freed + c.expired + c.revoked + s.live_leases
                || c.granted_bytes != c.released_bytes + u128::from(s.used)
            {
                return Err(format!("{}: counters do not add up: {c:?}, live {}", s.name, s.live_leases));
            }
        }
        if self.expiry.len() != self.leases.len() {
            return Err(format!("{} deadlines for {} leases", self.expiry.len(), self.leases.len()));
        }
        let scoped: usize = self.scopes.values().map(LeaseSet::len).sum();
        if scoped != self.leases.values().filter(|l| l.scope.is_some()).count()
            || self.scopes.values().any(LeaseSet::is_empty)
        {
            return Err("scope index out of step with leases".into());
        }
        let mut per_holder: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for lease in self.leases.values() {
            *per_holder.entry(&lease.holder).or_default() += 1;
        }
        if let Some((holder, n)) = per_holder.iter().find(|(h, n)| self.holder_leases.get(h) != **n) {
            return Err(format!("holder {holder}: {n} leases, {} counted", self.holder_leases.get(holder)));
        }
        let mut waiting: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for i in 0..self.waiters.len() {
            if let Some(w) = self.waiters.get(i) {
                *waiting.entry(&w.request.holder).or_default() += 1;
            }
        }
        if let Some((holder, n)) = waiting.iter().find(|(h, n)| self.holder_waiters.get(h) != **n) {
            return Err(format!("holder {holder}: {n} waiters, {} counted", self.holder_waiters.get(holder)));
        }
        self.check_no_servable_waiter()?;
        self.check_reclaim()
    }

    /// Liveness: after any operation, no queued waiter could be granted under the
    /// cannot-delay-anyone-ahead rule (it would have been served when the room appeared).
    fn check_no_servable_waiter(&self) -> Result<(), String> {
        let mut ahead = vec![0u128; self.pools.len()];
        let mut reserved = vec![0u128; self.pools.len()];
        for i in 0..self.waiters.len() {
            let Some(w) = self.waiters.get(i) else { break };
            let demand = &w.request.demand;
            // A waiter whose caller left still holds its place until the next serving pass drops
            // it (callers normally leave through `abandon_wait`, which serves at once).
            let live = !w.reply.is_closed();
            if live && demand.iter().all(|&(p, bytes)| self.pools[p].fits_behind(ahead[p], bytes)) {
                return Err(format!("waiter {} fits but is still queued", w.ticket));
            }
            for &(p, bytes) in demand {
                ahead[p] += u128::from(bytes);
                reserved[p] += u128::from(bytes);
            }
        }
        for (p, pool) in self.pools.iter().enumerate() {
            if pool.reserved() != reserved[p] {
                return Err(format!(
                    "{}: {} bytes reserved, waiters ask {}",
                    pool.name(),
                    pool.reserved(),
                    reserved[p]
                ));
            }
        }
        Ok(())
    }
}

impl Ledger {
    /// The reclaim books: every offer is of a live lease, by one open stream, counted in its
    /// pool; every open ask names offered leases only and has one deadline; every lease asked
    /// is answered once; and nothing is left to ask (asks are made as soon as they can help).
    fn check_reclaim(&self) -> Result<(), String> {
        let r = &self.reclaim;
        let n = self.pools.len();
        let (mut offered, mut asking) = (vec![0u64; n], vec![0u64; n]);
        let (mut idle, mut open) = (vec![0usize; n], vec![0u64; n]);
        for (id, mark) in &r.marks {
            let Some(lease) = self.leases.get(id) else {
                return Err(format!("lease {id} is offered but not live"));
            };
            let p = lease.pool;
            offered[p] += lease.size;
            if !r.offers.get(&mark.stream).is_some_and(|o| o.leases.contains(id)) {
                return Err(format!("lease {id} is offered by stream {} that does not list it", mark.stream));
            }
            match mark.asked {
                None => {
                    idle[p] += 1;
                    if !r.idle.get(p).is_some_and(|s| s.contains(&(mark.order, *id))) {
                        return Err(format!("offered lease {id} is not in its pool's queue"));
                    }
                }
                Some(rid) => {
                    asking[p] += lease.size;
                    open[p] += 1;
                    let ask = r.asks.get(&rid).filter(|a| a.pool == p && a.stream == mark.stream);
                    if !ask.is_some_and(|a| a.leases.contains(id)) {
                        return Err(format!("lease {id} is asked by {rid}, which does not name it"));
                    }
                }
            }
        }
        if r.offers.values().map(|o| o.leases.len()).sum::<usize>() != r.marks.len()
            || r.offers
                .values()
                .any(|o| o.leases.len() > super::MAX_OFFERED || o.outbox.len() > super::MAX_OFFERED)
        {
            return Err("streams' offers out of step with the offered leases, or past their bound".into());
        }
        let asked: usize = r.asks.values().map(|a| a.leases.len()).sum();
        if asked != open.iter().sum::<u64>() as usize
            || r.asks.values().any(|a| a.leases.is_empty())
            || r.deadlines.len() != r.asks.len()
            || r.asks.iter().any(|(rid, a)| !r.deadlines.contains(&(a.deadline, *rid)))
        {
            return Err("open asks out of step with the asked leases or their deadlines".into());
        }
        for (p, pool) in self.pools.iter().enumerate() {
            let c = pool.stats().counters;
            if r.idle.get(p).map_or(0, |s| s.len()) != idle[p]
                || pool.reclaimable() != offered[p]
                || pool.reclaiming() != asking[p]
                || c.reclaim_asked != c.reclaim_returned + c.reclaim_declined + c.revoked + open[p]
            {
                return Err(format!(
                    "{}: reclaim books: {} offered ({} counted), {} asked ({} counted), {c:?}",
                    pool.name(),
                    offered[p],
                    pool.reclaimable(),
                    asking[p],
                    pool.reclaiming()
                ));
            }
        }
        match self.reclaim_wanted().first() {
            Some(&(p, want)) => {
                Err(format!("{}: {want} bytes could be asked back but were not", self.pools[p].name()))
            }
            None => Ok(()),
        }
    }
}
