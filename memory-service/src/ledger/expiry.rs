//! Deadline-ordered index of live leases, so expiry touches only the leases that are due.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::lease::LeaseId;

/// Leases ordered by deadline. A `BTreeSet` rather than a binary heap: renewals and frees remove
/// the old entry in O(log n) instead of leaving stale entries behind, so the set always holds
/// exactly one entry per live lease and its size is a checkable invariant.
#[derive(Debug, Default)]
pub struct ExpiryQueue {
    deadlines: BTreeSet<(Instant, LeaseId)>,
}

impl ExpiryQueue {
    /// Tracks `id` as due at `at`. Returns true if this is now the earliest deadline, so a timer
    /// sleeping on the previous head must be woken.
    pub fn insert(&mut self, at: Instant, id: LeaseId) -> bool {
        self.deadlines.insert((at, id));
        self.deadlines.first() == Some(&(at, id))
    }

    /// Stops tracking `id`, which was due at `at`.
    pub fn remove(&mut self, at: Instant, id: LeaseId) {
        let removed = self.deadlines.remove(&(at, id));
        debug_assert!(removed, "expiry entry missing for a live lease");
    }

    /// The earliest deadline, if any lease is live.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest lease if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<LeaseId> {
        match self.deadlines.first() {
            Some(&(at, _)) if at <= now => self.deadlines.pop_first().map(|(_, id)| id),
            _ => None,
        }
    }

    /// Number of tracked leases.
    pub fn len(&self) -> usize {
        self.deadlines.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pops_only_what_is_due_in_deadline_order() {
        let t0 = Instant::now();
        let mut queue = ExpiryQueue::default();
        let (a, b, c) = (LeaseId::from_raw(1), LeaseId::from_raw(2), LeaseId::from_raw(3));
        assert!(queue.insert(t0 + Duration::from_secs(3), a));
        assert!(queue.insert(t0 + Duration::from_secs(1), b), "earlier deadline becomes the head");
        assert!(!queue.insert(t0 + Duration::from_secs(2), c));
        assert_eq!(queue.next_deadline(), Some(t0 + Duration::from_secs(1)));

        assert_eq!(queue.pop_due(t0), None);
        assert_eq!(queue.pop_due(t0 + Duration::from_secs(2)), Some(b));
        assert_eq!(queue.pop_due(t0 + Duration::from_secs(2)), Some(c));
        assert_eq!(queue.pop_due(t0 + Duration::from_secs(2)), None);

        queue.remove(t0 + Duration::from_secs(3), a);
        assert_eq!(queue.len(), 0);
    }
}
