//! One pool's accounting: capacity, bytes in use, and the counters that `GetPoolStats` reports.

use std::sync::Arc;

/// Index of a pool in the ledger. Pools are never removed, so an index stays valid.
pub type PoolId = usize;

/// A named pool of simulated device memory. `available` is derived (`capacity - used`), so the
/// invariant `used + available == capacity` cannot drift; `used` is kept equal to the sum of live
/// lease sizes by the ledger, which is the only writer.
#[derive(Debug)]
pub struct Pool {
    name: Arc<str>,
    capacity: u64,
    used: u64,
    live_leases: u64,
    waiters: u64,
    /// Bytes the waiters ask of this pool: room a newcomer may not take (128-bit: a thousand
    /// waiters of 4 EiB each pass 64 bits).
    reserved: u128,
    peak_used: u64,
    counters: Counters,
    /// Bytes of leases offered as reclaimable, and of those the bytes asked back: soft state
    /// of KeepAlive streams, kept here so statistics read them with the rest.
    reclaimable: u64,
    reclaiming: u64,
}

/// Cumulative counters of a pool since it was created.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Leases granted.
    pub granted: u64,
    /// Leases released by Free or FreeScope.
    pub freed: u64,
    /// Leases released because their TTL ran out.
    pub expired: u64,
    /// Allocate calls that waited for this pool and gave up.
    pub wait_timeouts: u64,
    /// Allocate calls refused at once.
    pub rejected: u64,
    /// Bytes granted. 128 bits: cumulative totals of 4 EiB pools could pass 64 bits.
    pub granted_bytes: u128,
    /// Bytes returned by frees, expiries and revocations.
    pub released_bytes: u128,
    /// Leases revoked: asked back, and still held and offered at their deadline.
    pub revoked: u64,
    /// ReclaimRequests sent (one per stream and pool per ask).
    pub reclaim_requests: u64,
    /// Leases named in ReclaimRequests. Each is returned, declined, revoked or still asked.
    pub reclaim_asked: u64,
    /// Leases asked for that came back (freed or expired) before their deadline.
    pub reclaim_returned: u64,
    /// Leases asked for that their holder stopped offering (or whose stream ended).
    pub reclaim_declined: u64,
    /// Bytes of asked leases that came back, returned or revoked.
    pub reclaimed_bytes: u128,
}

/// A point-in-time copy of a pool's state, detached from the ledger lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Pool name.
    pub name: Arc<str>,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes held by live leases.
    pub used: u64,
    /// Bytes free.
    pub available: u64,
    /// Live leases.
    pub live_leases: u64,
    /// Allocate calls waiting on this pool.
    pub waiters: u64,
    /// Highest `used` seen.
    pub peak_used: u64,
    /// Bytes of leases offered as reclaimable.
    pub reclaimable: u64,
    /// Of those, bytes asked back and not yet returned, declined or revoked.
    pub reclaiming: u64,
    /// Cumulative counters.
    pub counters: Counters,
}

/// How a lease left its pool, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Free or FreeScope.
    Freed,
    /// TTL ran out.
    Expired,
    /// Asked back by a ReclaimRequest and not given back in time.
    Revoked,
}

impl Pool {
    pub(crate) fn new(name: Arc<str>, capacity: u64) -> Self {
        Pool {
            name,
            capacity,
            used: 0,
            live_leases: 0,
            waiters: 0,
            reserved: 0,
            peak_used: 0,
            counters: Counters::default(),
            reclaimable: 0,
            reclaiming: 0,
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held by live leases.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        self.capacity - self.used
    }

    /// Allocate calls queued on this pool.
    pub fn waiters(&self) -> u64 {
        self.waiters
    }

    pub(crate) fn take(&mut self, size: u64) {
        debug_assert!(size <= self.available(), "ledger granted past capacity");
        self.used += size;
        self.live_leases += 1;
        self.peak_used = self.peak_used.max(self.used);
        self.counters.granted += 1;
        self.counters.granted_bytes += u128::from(size);
    }

    pub(crate) fn give_back(&mut self, size: u64, how: Release) {
        debug_assert!(size <= self.used && self.live_leases > 0, "ledger released twice");
        self.used -= size;
        self.live_leases -= 1;
        self.counters.released_bytes += u128::from(size);
        match how {
            Release::Freed => self.counters.freed += 1,
            Release::Expired => self.counters.expired += 1,
            Release::Revoked => self.counters.revoked += 1,
        }
    }

    /// Bytes of leases offered as reclaimable.
    pub fn reclaimable(&self) -> u64 {
        self.reclaimable
    }

    /// Bytes asked back and not yet answered.
    pub fn reclaiming(&self) -> u64 {
        self.reclaiming
    }

    /// A lease of `size` bytes joins (`true`) or leaves the reclaimable bytes. Never more than
    /// `used`, since only live leases are offered.
    pub(crate) fn offer(&mut self, size: u64, offered: bool) {
        if offered {
            self.reclaimable += size;
        } else {
            debug_assert!(size <= self.reclaimable, "reclaimable bytes left twice");
            self.reclaimable = self.reclaimable.saturating_sub(size);
        }
    }

    /// A lease of `size` bytes is asked back (`true`), or its ask ended.
    pub(crate) fn ask(&mut self, size: u64, asked: bool) {
        if asked {
            self.reclaiming += size;
        } else {
            debug_assert!(size <= self.reclaiming, "reclaiming bytes left twice");
            self.reclaiming = self.reclaiming.saturating_sub(size);
        }
    }

    /// The counters, to count reclaims (the reclaim module is their only other writer).
    pub(crate) fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Bytes the queued waiters ask of this pool.
    pub fn reserved(&self) -> u128 {
        self.reserved
    }

    /// Whether `bytes` more fit with `ahead` bytes promised to earlier waiters.
    pub fn fits_behind(&self, ahead: u128, bytes: u64) -> bool {
        ahead + u128::from(bytes) <= u128::from(self.available())
    }

    pub(crate) fn add_waiter(&mut self, bytes: u64) {
        self.reserved += u128::from(bytes);
        self.waiters += 1;
    }

    pub(crate) fn remove_waiter(&mut self, bytes: u64) {
        self.reserved -= u128::from(bytes);
        self.waiters -= 1;
    }

    pub(crate) fn count_wait_timeout(&mut self) {
        self.counters.wait_timeouts += 1;
    }

    /// Sets the counters and peak read back from a store (restore only).
    pub(crate) fn restore_counters(&mut self, peak_used: u64, counters: Counters) {
        self.peak_used = peak_used.max(self.used);
        self.counters = counters;
    }

    /// Makes the counters add up with the leases held (every lease granted is freed, expired,
    /// revoked or live; every byte granted is released or used), after a restore from a store where they
    /// do not: only a damaged or hand-edited one, say with a lease the restore dropped. Leases
    /// counted as granted but not held are counted as expired (their memory came back without
    /// a Free); leases held but never counted are counted as granted. Returns whether anything
    /// changed. Saturating: stored counters are not trusted not to overflow.
    pub(crate) fn reconcile_counters(&mut self) -> bool {
        let before = self.counters;
        let c = &mut self.counters;
        let accounted =
            c.freed.saturating_add(c.expired).saturating_add(c.revoked).saturating_add(self.live_leases);
        match c.granted.checked_sub(accounted) {
            Some(missing) => c.expired += missing,
            None => c.granted = accounted,
        }
        let bytes = c.released_bytes.saturating_add(u128::from(self.used));
        match c.granted_bytes.checked_sub(bytes) {
            Some(missing) => c.released_bytes += missing,
            None => c.granted_bytes = bytes,
        }
        self.counters != before
    }

    /// Counts the asks still open in restored counters as declined: asks are soft state of
    /// KeepAlive streams, which a restart ends, so none is open after it (the normal case after
    /// a restart during a reclaim, not damage). Returns whether anything changed.
    pub(crate) fn close_restored_asks(&mut self) -> bool {
        let c = &mut self.counters;
        let answered = c.reclaim_returned.saturating_add(c.reclaim_declined).saturating_add(c.revoked);
        match c.reclaim_asked.checked_sub(answered) {
            Some(0) => false,
            Some(open) => {
                c.reclaim_declined += open;
                true
            }
            // More answered than asked: a damaged store; asked is made to add up.
            None => {
                c.reclaim_asked = answered;
                true
            }
        }
    }

    pub(crate) fn count_rejected(&mut self) {
        self.counters.rejected += 1;
    }

    /// A detached copy for reporting.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            name: self.name.clone(),
            capacity: self.capacity,
            used: self.used,
            available: self.available(),
            live_leases: self.live_leases,
            waiters: self.waiters,
            peak_used: self.peak_used,
            reclaimable: self.reclaimable,
            reclaiming: self.reclaiming,
            counters: self.counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_give_back_keep_the_books() {
        let mut pool = Pool::new("kv-cache".into(), 100);
        pool.take(60);
        pool.take(40);
        assert_eq!((pool.used(), pool.available()), (100, 0));
        pool.give_back(60, Release::Freed);
        pool.give_back(40, Release::Expired);
        let stats = pool.stats();
        assert_eq!((stats.used, stats.available, stats.live_leases), (0, 100, 0));
        assert_eq!(stats.peak_used, 100);
        assert_eq!(stats.counters.granted, 2);
        assert_eq!((stats.counters.freed, stats.counters.expired), (1, 1));
        assert_eq!(stats.counters.granted_bytes, stats.counters.released_bytes);
    }
}
