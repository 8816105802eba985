//! Unit tests of reclaimable leases: what is asked, of whom, when; answers (free, decline,
//! silence, a stream's end); revocation at the deadline; and its commit with a store.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    tests_durable::{FakeStore, tracked_ledger},
    *,
};

const TTL: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = DEFAULT_RECLAIM_TIMEOUT;

fn request(items: &[(&str, u64)], holder: &str) -> AllocRequest {
    AllocRequest {
        items: items.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
        holder: Arc::from(holder),
        scope: None,
        ttl: TTL,
        request_id: None,
    }
}

/// A ledger with a kv-cache pool of 100 bytes, filled by holder "a" with ten 10-byte leases
/// (oldest first).
fn filled(now: Instant) -> (Ledger, Vec<LeaseId>) {
    let mut ledger = Ledger::new(64);
    ledger.create_pool("kv-cache", 100).unwrap();
    let leases = (0..10).map(|_| grant(&mut ledger, &[("kv-cache", 10)], "a", now)).collect();
    (ledger, leases)
}

fn grant(ledger: &mut Ledger, items: &[(&str, u64)], holder: &str, now: Instant) -> LeaseId {
    match ledger.allocate(request(items, holder), now, false) {
        Ok(AllocateOutcome::Granted(grant)) => grant.leases[0].id,
        other => panic!("expected a grant, got {other:?}"),
    }
}

type Waiting = oneshot::Receiver<Result<Grant, Error>>;

fn wait(ledger: &mut Ledger, bytes: u64, now: Instant) -> (u64, Waiting) {
    match ledger.allocate(request(&[("kv-cache", bytes)], "b"), now, true) {
        Ok(AllocateOutcome::Queued { ticket, grant }) => (ticket, grant),
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn stats(ledger: &Ledger) -> PoolStats {
    ledger.pool_stats("kv-cache").unwrap()
}

fn is_granted(rx: &mut Waiting) -> bool {
    matches!(rx.try_recv(), Ok(Ok(_)))
}

#[test]
fn a_waiter_asks_only_for_its_shortfall_earliest_offered_first() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let offer = ledger.open_offer();
    // Offered newest first on purpose: the order of offering is what counts.
    let mut offered: Vec<_> = leases.iter().rev().copied().collect();
    offered.truncate(8);
    assert_eq!(ledger.set_reclaimable(offer.id, &offered, t0).unwrap().offered, 8);
    assert_eq!((stats(&ledger).reclaimable, stats(&ledger).reclaiming), (80, 0));
    assert!(ledger.take_notices(offer.id, t0).is_empty(), "nobody waits: nothing asked");

    // 25 bytes lack: three 10-byte leases, the earliest offered (leases 9, 8, 7).
    let (_, mut b) = wait(&mut ledger, 25, t0);
    let notices = ledger.take_notices(offer.id, t0 + Duration::from_millis(5));
    assert_eq!(notices.len(), 1);
    let notice = &notices[0];
    assert_eq!(notice.leases, [leases[9], leases[8], leases[7]]);
    assert_eq!((notice.bytes, notice.needed), (30, 25));
    assert_eq!(notice.within, TIMEOUT - Duration::from_millis(5));
    assert_eq!(&*notice.pool, "kv-cache");
    let s = stats(&ledger);
    assert_eq!(
        (s.reclaimable, s.reclaiming, s.counters.reclaim_requests, s.counters.reclaim_asked),
        (80, 30, 1, 3)
    );
    ledger.check_invariants().unwrap();

    // The holder frees them: the waiter is granted as the bytes come back, and its cache shrank
    // by what the waiter needed, rounded up to whole leases.
    ledger.free(leases[9], t0).unwrap();
    ledger.free(leases[8], t0).unwrap();
    assert!(!is_granted(&mut b), "20 of 25 bytes back");
    ledger.free(leases[7], t0).unwrap();
    assert!(is_granted(&mut b));
    let s = stats(&ledger);
    assert_eq!((s.used, s.reclaimable, s.reclaiming, s.live_leases), (95, 50, 0, 8));
    assert_eq!((s.counters.reclaim_returned, s.counters.reclaimed_bytes, s.counters.revoked), (3, 30, 0));
    assert_eq!(ledger.offered(offer.id), 5);
    // The deadline passes with nothing left to revoke.
    assert_eq!(ledger.reap(t0 + TIMEOUT), 0);
    assert_eq!(ledger.next_deadline(), Some(t0 + TTL));
    ledger.check_invariants().unwrap();
}

#[test]
fn nothing_is_asked_when_reclaiming_cannot_serve_the_waiter() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let offer = ledger.open_offer();
    ledger.set_reclaimable(offer.id, &leases[..2], t0).unwrap();
    // 30 bytes lack, 20 are offered: evicting them would not serve the call.
    let (_, mut b) = wait(&mut ledger, 30, t0);
    assert!(ledger.take_notices(offer.id, t0).is_empty());
    assert_eq!(stats(&ledger).counters.reclaim_requests, 0);
    // Another lease freed: now 20 lack, and the offer covers them.
    ledger.free(leases[5], t0).unwrap();
    let notices = ledger.take_notices(offer.id, t0);
    assert_eq!(notices.iter().map(|n| n.leases.len()).sum::<usize>(), 2);
    ledger.free(leases[0], t0).unwrap();
    ledger.free(leases[1], t0).unwrap();
    assert!(is_granted(&mut b));
    ledger.check_invariants().unwrap();
}

#[test]
fn a_second_waiter_asks_only_for_what_open_asks_do_not_cover() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let (first, second) = (ledger.open_offer(), ledger.open_offer());
    ledger.set_reclaimable(first.id, &leases[..2], t0).unwrap();
    ledger.set_reclaimable(second.id, &leases[2..6], t0).unwrap();
    let _b1 = wait(&mut ledger, 15, t0);
    assert_eq!(ledger.take_notices(first.id, t0)[0].leases, [leases[0], leases[1]]);
    assert!(ledger.take_notices(second.id, t0).is_empty());
    // 20 more: 35 lack in all, 20 are asked, so 15 more of the earliest not asked (second's).
    let _b2 = wait(&mut ledger, 20, t0);
    assert!(ledger.take_notices(first.id, t0).is_empty(), "nothing asked twice");
    let notice = ledger.take_notices(second.id, t0).remove(0);
    assert_eq!((notice.leases, notice.needed), (vec![leases[2], leases[3]], 15));
    assert_eq!(stats(&ledger).reclaiming, 40);
    ledger.check_invariants().unwrap();
}

#[test]
fn a_decline_asks_another_holder_or_leaves_the_call_waiting() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let (first, second) = (ledger.open_offer(), ledger.open_offer());
    ledger.set_reclaimable(first.id, &leases[..2], t0).unwrap();
    let (_, mut b) = wait(&mut ledger, 10, t0);
    assert_eq!(ledger.take_notices(first.id, t0)[0].leases, [leases[0]]);
    ledger.set_reclaimable(second.id, &[leases[5]], t0).unwrap();

    // The first holder wants lease 0 back for itself: it stops offering it. Lease 1, which it
    // still offers, is asked for instead.
    ledger.set_reclaimable(first.id, &[leases[1]], t0).unwrap();
    assert_eq!(ledger.take_notices(first.id, t0)[0].leases, [leases[1]]);
    assert_eq!(stats(&ledger).counters.reclaim_declined, 1);
    // It declines that one too; the second holder is asked.
    ledger.set_reclaimable(first.id, &[], t0).unwrap();
    assert_eq!(ledger.take_notices(second.id, t0)[0].leases, [leases[5]]);
    // The second declines: nothing is left to ask, the call waits, and nothing is revoked.
    ledger.set_reclaimable(second.id, &[], t0).unwrap();
    assert_eq!(ledger.reap(t0 + TIMEOUT * 2), 0);
    assert!(!is_granted(&mut b));
    let s = stats(&ledger);
    assert_eq!(
        (s.live_leases, s.reclaimable, s.counters.reclaim_declined, s.counters.revoked),
        (10, 0, 3, 0)
    );
    ledger.check_invariants().unwrap();
}

#[test]
fn leases_not_given_back_in_time_are_revoked_and_the_waiter_granted() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let offer = ledger.open_offer();
    ledger.set_reclaimable(offer.id, &leases, t0).unwrap();
    let (_, mut b) = wait(&mut ledger, 20, t0);
    assert_eq!(ledger.next_deadline(), Some(t0 + TIMEOUT), "the reaper sleeps until the ask's deadline");
    let (_, mut rx) = ledger.subscribe(None).unwrap();

    // One is freed in time, the other not.
    ledger.free(leases[0], t0 + Duration::from_millis(10)).unwrap();
    assert_eq!(ledger.reap(t0 + TIMEOUT - Duration::from_millis(1)), 0);
    // At the deadline the lease is dead even before the reaper runs: a renewal reaps it first.
    let err = ledger.renew(leases[1], t0 + TIMEOUT).unwrap_err();
    assert_eq!(err, Error::LeaseNotFound(leases[1].to_string()));
    assert!(is_granted(&mut b));
    let s = stats(&ledger);
    assert_eq!((s.used, s.live_leases, s.reclaimable, s.reclaiming), (100, 9, 80, 0));
    let c = s.counters;
    assert_eq!((c.freed, c.expired, c.revoked, c.reclaim_returned, c.reclaimed_bytes), (1, 0, 1, 1, 20));
    let events: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| (e.kind, e.lease)).collect();
    assert_eq!(
        events,
        [
            (EventKind::Freed, Some(leases[0])),
            (EventKind::Revoked, Some(leases[1])),
            (EventKind::Allocated, events.get(2).and_then(|e| e.1)),
        ]
    );
    ledger.check_invariants().unwrap();
}

#[test]
fn a_stream_that_ends_takes_its_offer_with_it() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let offer = ledger.open_offer();
    ledger.set_reclaimable(offer.id, &leases[..4], t0).unwrap();
    let (_, mut b) = wait(&mut ledger, 10, t0);
    ledger.close_offer(offer.id, t0);
    let s = stats(&ledger);
    assert_eq!((s.reclaimable, s.reclaiming, s.counters.reclaim_declined), (0, 0, 1));
    assert_eq!(ledger.reap(t0 + TIMEOUT), 0, "nothing is revoked");
    assert_eq!(ledger.next_deadline(), Some(t0 + TTL));
    assert!(!is_granted(&mut b));
    assert!(ledger.set_reclaimable(offer.id, &leases[..1], t0).is_err(), "a closed stream offers nothing");
    ledger.check_invariants().unwrap();
}

#[test]
fn a_set_is_bounded_ignores_the_dead_and_moves_leases_between_streams() {
    let t0 = Instant::now();
    let (mut ledger, leases) = filled(t0);
    let (first, second) = (ledger.open_offer(), ledger.open_offer());
    let too_many = vec![leases[0]; MAX_OFFERED + 1];
    assert!(matches!(ledger.set_reclaimable(first.id, &too_many, t0), Err(Error::InvalidArgument { .. })));
    ledger.free(leases[9], t0).unwrap();
    let bogus = LeaseId::from_raw(7);
    let set = [leases[0], leases[1], leases[0], leases[9], bogus];
    let offered = ledger.set_reclaimable(first.id, &set, t0).unwrap();
    assert_eq!(offered, Offered { offered: 2, not_found: vec![leases[9], bogus] });
    // A lease is offered by one stream: the last to name it.
    assert_eq!(ledger.set_reclaimable(second.id, &[leases[1]], t0).unwrap().offered, 1);
    assert_eq!((ledger.offered(first.id), stats(&ledger).reclaimable), (1, 20));
    // Expiry takes a lease out of its offer.
    ledger.renew(leases[0], t0 + TTL - Duration::from_millis(1)).unwrap();
    ledger.reap(t0 + TTL);
    assert_eq!((ledger.offered(first.id), ledger.offered(second.id), stats(&ledger).reclaimable), (1, 0, 10));
    ledger.check_invariants().unwrap();
}

#[test]
fn a_revocation_is_committed_like_an_expiry_and_a_restore_closes_open_asks() {
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let mut ledger = tracked_ledger();
    let leases: Vec<_> = (0..4).map(|_| grant(&mut ledger, &[("kv-cache", 250)], "a", t0)).collect();
    let mut store = FakeStore::default();
    let committed = ledger.take_batch(t0, wall);
    ledger.release_events(committed.events);
    store.apply(committed);
    let (_, mut rx) = ledger.subscribe(None).unwrap();

    let offer = ledger.open_offer();
    ledger.set_reclaimable(offer.id, &leases, t0).unwrap();
    let (_, _b) = wait(&mut ledger, 300, t0);
    // The asks are counted and announced, but watchers hear of them once committed.
    assert!(rx.try_recv().is_err());
    let asked = ledger.take_batch(t0, wall);
    assert_eq!(asked.pools.len(), 1, "the reclaim counters are stored");
    ledger.release_events(asked.events);
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::ReclaimRequested, EventKind::ReclaimRequested]);
    store.apply(asked);

    // A restart now: no stream survives it, so the open asks count as declined.
    let mut restored = Ledger::new(16);
    restored.restore(store.snapshot(), t0, wall).unwrap();
    let c = restored.pool_stats("kv-cache").unwrap().counters;
    assert_eq!(
        (c.reclaim_asked, c.reclaim_declined, restored.pool_stats("kv-cache").unwrap().reclaimable),
        (2, 2, 0)
    );
    restored.check_invariants().unwrap();

    // Without a restart, the deadline revokes both: gone from the store, EVENTs after commit.
    let at = t0 + TIMEOUT;
    assert_eq!(ledger.reap(at), 2);
    let revoked = ledger.take_batch(at, wall + TIMEOUT);
    assert_eq!(revoked.gone.len(), 2);
    assert!(rx.try_recv().is_err());
    ledger.release_events(revoked.events);
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Revoked, EventKind::Revoked, EventKind::Allocated]);
    store.apply(revoked);
    let mut restored = Ledger::new(16);
    restored.restore(store.snapshot(), at, wall + TIMEOUT).unwrap();
    let s = restored.pool_stats("kv-cache").unwrap();
    assert_eq!((s.live_leases, s.counters.revoked, s.counters.reclaim_declined), (3, 2, 0));
    restored.check_invariants().unwrap();
}
