//! Unit tests of the ledger's policy, on explicit instants (no runtime, no clock).

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::*;

const TTL: Duration = Duration::from_secs(30);

fn ledger() -> Ledger {
    let mut ledger = Ledger::new(64);
    ledger.create_pool("kv-cache", 100).expect("fresh pool");
    ledger.create_pool("activations", 10).expect("fresh pool");
    ledger
}

fn request(items: &[(&str, u64)]) -> AllocRequest {
    AllocRequest {
        items: items.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
        holder: Arc::from("test"),
        scope: None,
        ttl: TTL,
        request_id: None,
    }
}

fn granted(admission: Result<AllocateOutcome, Error>) -> Grant {
    match admission {
        Ok(AllocateOutcome::Granted(grant)) => grant,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn queued(admission: Result<AllocateOutcome, Error>) -> (u64, oneshot::Receiver<Result<Grant, Error>>) {
    match admission {
        Ok(AllocateOutcome::Queued { ticket, grant }) => (ticket, grant),
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn used(ledger: &Ledger, pool: &str) -> u64 {
    ledger.pool_stats(pool).expect("known pool").used
}

#[test]
fn multi_pool_allocation_is_all_or_nothing() {
    let mut ledger = ledger();
    let now = Instant::now();
    let grant = granted(ledger.allocate(request(&[("kv-cache", 60), ("activations", 5)]), now, false));
    assert_eq!(grant.leases.len(), 2);
    assert_eq!((used(&ledger, "kv-cache"), used(&ledger, "activations")), (60, 5));

    // kv-cache has room, activations does not: neither is touched.
    let err = ledger.allocate(request(&[("kv-cache", 10), ("activations", 6)]), now, false).unwrap_err();
    assert!(
        matches!(err, Error::NoRoom { ref pool, requested: 6, available: 5, capacity: 10, .. } if pool == "activations"),
        "{err:?}"
    );
    assert_eq!((used(&ledger, "kv-cache"), used(&ledger, "activations")), (60, 5));
    ledger.check_invariants().unwrap();
}

#[test]
fn larger_than_capacity_fails_at_once_even_when_waiting_is_allowed() {
    let mut ledger = ledger();
    let err = ledger
        .allocate(request(&[("activations", 6), ("activations", 5)]), Instant::now(), true)
        .unwrap_err();
    assert_eq!(err, Error::ExceedsCapacity { pool: "activations".into(), requested: 11, capacity: 10 });
    assert_eq!(ledger.pool_stats("activations").unwrap().counters.rejected, 1);
}

#[test]
fn unknown_pool_and_zero_size_are_refused() {
    let mut ledger = ledger();
    let now = Instant::now();
    assert_eq!(
        ledger.allocate(request(&[("nope", 1)]), now, false).unwrap_err(),
        Error::PoolNotFound("nope".into())
    );
    assert!(matches!(
        ledger.allocate(request(&[("kv-cache", 0)]), now, false),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(ledger.allocate(request(&[]), now, false), Err(Error::InvalidArgument { .. })));
    assert!(matches!(
        ledger.allocate(request(&[("kv-cache", u64::MAX), ("kv-cache", 1)]), now, false),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(ledger.create_pool("kv-cache", 1).unwrap_err(), Error::PoolExists("kv-cache".into()));
}

#[test]
fn a_free_wakes_the_oldest_waiter_and_later_ones_cannot_barge() {
    let mut ledger = ledger();
    let now = Instant::now();
    let first = granted(ledger.allocate(request(&[("kv-cache", 90)]), now, false));
    let (_, mut big) = queued(ledger.allocate(request(&[("kv-cache", 50)]), now, true));
    // 10 bytes are free, but the big waiter is ahead: a small request queues behind it.
    let (_, mut small) = queued(ledger.allocate(request(&[("kv-cache", 5)]), now, true));
    assert!(!ledger.can_allocate(&[("kv-cache".into(), 5)], now).unwrap().now);
    assert_eq!(ledger.pool_stats("kv-cache").unwrap().waiters, 2);
    assert!(big.try_recv().is_err() && small.try_recv().is_err());

    ledger.free(first.leases[0].id, now).unwrap();
    assert_eq!(big.try_recv().expect("big granted").expect("a grant").leases[0].size, 50);
    assert_eq!(small.try_recv().expect("small granted").expect("a grant").leases[0].size, 5);
    assert_eq!(used(&ledger, "kv-cache"), 55);
    assert_eq!(ledger.pool_stats("kv-cache").unwrap().waiters, 0);
    ledger.check_invariants().unwrap();
}

#[test]
fn a_timed_out_wait_is_counted_and_holds_nothing() {
    let mut ledger = ledger();
    let now = Instant::now();
    let _hold = granted(ledger.allocate(request(&[("activations", 10)]), now, false));
    let (ticket, _rx) = queued(ledger.allocate(request(&[("activations", 1), ("kv-cache", 1)]), now, true));
    let err = ledger.abandon_wait(ticket, now, Duration::from_millis(500), true).expect("still queued");
    assert!(
        matches!(err, Error::NoRoom { timed_out: true, waited, .. } if waited == Duration::from_millis(500))
    );
    let stats = ledger.pool_stats("activations").unwrap();
    assert_eq!((stats.waiters, stats.counters.wait_timeouts), (0, 1));
    assert_eq!(used(&ledger, "kv-cache"), 0);
    assert!(ledger.abandon_wait(ticket, now, Duration::ZERO, true).is_none(), "second abandon finds nothing");
    ledger.check_invariants().unwrap();
}

#[test]
fn a_waiter_whose_caller_left_is_skipped_not_granted() {
    let mut ledger = ledger();
    let now = Instant::now();
    let hold = granted(ledger.allocate(request(&[("activations", 10)]), now, false));
    let (_, rx) = queued(ledger.allocate(request(&[("activations", 4)]), now, true));
    drop(rx);
    ledger.free(hold.leases[0].id, now).unwrap();
    assert_eq!(used(&ledger, "activations"), 0);
    assert_eq!(ledger.pool_stats("activations").unwrap().waiters, 0);
    ledger.check_invariants().unwrap();
}

#[test]
fn leases_die_at_their_deadline_even_before_reclamation() {
    let mut ledger = ledger();
    let t0 = Instant::now();
    let lease = granted(ledger.allocate(request(&[("kv-cache", 40)]), t0, false)).leases.remove(0);
    assert_eq!(lease.expires_at, t0 + TTL);
    assert_eq!(ledger.next_deadline(), Some(t0 + TTL));

    // Renewal just before the deadline moves it.
    let renewed = ledger.renew(lease.id, t0 + TTL - Duration::from_millis(1)).unwrap();
    assert_eq!(renewed.expires_at, t0 + TTL * 2 - Duration::from_millis(1));

    // At the deadline it is dead: no reaper ran, yet free says expired and the bytes are back.
    let deadline = renewed.expires_at;
    let err = ledger.free(lease.id, deadline).unwrap_err();
    assert_eq!(err, Error::LeaseExpired { id: lease.id.to_string(), ago: Duration::ZERO });
    assert_eq!(used(&ledger, "kv-cache"), 0);
    assert_eq!(ledger.pool_stats("kv-cache").unwrap().counters.expired, 1);
    assert_eq!(ledger.free(lease.id, deadline).unwrap_err(), Error::LeaseNotFound(lease.id.to_string()));
    ledger.check_invariants().unwrap();
}

#[test]
fn many_simultaneous_expiries_are_reclaimed_in_one_pass_and_wake_waiters() {
    let mut ledger = ledger();
    let t0 = Instant::now();
    for _ in 0..100 {
        granted(ledger.allocate(request(&[("kv-cache", 1)]), t0, false));
    }
    let (_, mut waiter) = queued(ledger.allocate(request(&[("kv-cache", 50)]), t0, true));
    assert_eq!(ledger.reap(t0 + TTL - Duration::from_millis(1)), 0);
    assert_eq!(ledger.reap(t0 + TTL), 100);
    assert_eq!(waiter.try_recv().expect("granted by expiry").expect("a grant").leases[0].size, 50);
    assert_eq!(used(&ledger, "kv-cache"), 50);
    ledger.check_invariants().unwrap();
}

#[test]
fn scopes_free_and_renew_together() {
    let mut ledger = ledger();
    let t0 = Instant::now();
    let mut scoped = request(&[("kv-cache", 30), ("activations", 3)]);
    scoped.scope = Some(Arc::from("gen-1"));
    granted(ledger.allocate(scoped.clone(), t0, false));
    granted(ledger.allocate(scoped, t0, false));
    granted(ledger.allocate(request(&[("kv-cache", 1)]), t0, false));

    let mut done = LeaseSet::default();
    let renewed = ledger.renew_scope("test", "gen-1", t0 + Duration::from_secs(10), &mut done);
    assert_eq!(renewed, (4, 4, Some(t0 + Duration::from_secs(10) + TTL)));
    // Named again in the same request: counted, not renewed twice.
    assert_eq!(ledger.renew_scope("test", "gen-1", t0 + Duration::from_secs(10), &mut done).1, 0);

    assert_eq!(ledger.free_scope("test", "gen-1", t0), (4, 66));
    assert_eq!(ledger.free_scope("test", "gen-1", t0), (0, 0));
    assert_eq!(used(&ledger, "kv-cache"), 1);
    ledger.check_invariants().unwrap();
}

#[test]
fn a_request_id_replays_the_same_leases() {
    let mut ledger = ledger();
    let now = Instant::now();
    let mut keyed = request(&[("kv-cache", 10)]);
    keyed.request_id = Some(Arc::from("req-1"));
    let first = granted(ledger.allocate(keyed.clone(), now, false));
    let again = granted(ledger.allocate(keyed.clone(), now, false));
    assert!(again.replayed && !first.replayed);
    assert_eq!(again.leases[0].id, first.leases[0].id);
    assert_eq!(used(&ledger, "kv-cache"), 10, "no double allocation");

    // Same key, other parameters: refused, not answered with the wrong leases.
    let mut changed = keyed.clone();
    changed.items[0].1 = 11;
    assert!(
        matches!(ledger.allocate(changed, now, false), Err(Error::InvalidArgument { ref violations }) if violations[0].0 == "request_id")
    );

    // Another holder may use the same key independently.
    let mut other = keyed.clone();
    other.holder = Arc::from("other");
    assert!(!granted(ledger.allocate(other, now, false)).replayed);
    ledger.check_invariants().unwrap();
}

#[test]
fn freeing_an_old_lease_keeps_the_replay_of_a_newer_grant_under_the_same_key() {
    let mut ledger = ledger();
    let now = Instant::now();
    let mut keyed = request(&[("kv-cache", 10), ("activations", 1)]);
    keyed.request_id = Some(Arc::from("req-3"));
    let old = granted(ledger.allocate(keyed.clone(), now, false));
    // Freeing one of its leases breaks the grant: the key allocates afresh.
    ledger.free(old.leases[0].id, now).expect("live lease");
    let newer = granted(ledger.allocate(keyed.clone(), now, false));
    assert!(!newer.replayed);
    // Freeing the other old lease must not forget the newer grant's replay.
    ledger.free(old.leases[1].id, now).expect("live lease");
    let again = granted(ledger.allocate(keyed, now, false));
    assert!(again.replayed, "a retry of the newer grant allocated anew");
    let ids = |grant: &Grant| grant.leases.iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&newer));
    assert_eq!(used(&ledger, "kv-cache"), 10, "no double allocation");
    ledger.check_invariants().unwrap();
}

#[test]
fn a_request_id_that_is_still_waiting_is_refused() {
    let mut ledger = ledger();
    let now = Instant::now();
    let _hold = granted(ledger.allocate(request(&[("activations", 10)]), now, false));
    let mut keyed = request(&[("activations", 1)]);
    keyed.request_id = Some(Arc::from("req-2"));
    let _queued = queued(ledger.allocate(keyed.clone(), now, true));
    assert_eq!(ledger.allocate(keyed, now, true).unwrap_err(), Error::RequestInProgress("req-2".into()));
}

#[test]
fn events_are_sequenced_and_describe_the_change() {
    let mut ledger = ledger();
    let (_, mut rx) = ledger.subscribe(None).expect("live");
    let now = Instant::now();
    let lease = granted(ledger.allocate(request(&[("kv-cache", 7)]), now, false)).leases.remove(0);
    ledger.free(lease.id, now).unwrap();
    let allocated = rx.try_recv().unwrap();
    let freed = rx.try_recv().unwrap();
    assert_eq!((allocated.kind, allocated.size, allocated.pool_used), (EventKind::Allocated, 7, 7));
    assert_eq!((freed.kind, freed.lease, freed.pool_used), (EventKind::Freed, Some(lease.id), 0));
    assert_eq!(freed.sequence, allocated.sequence + 1);
    // Two pools were created before anyone subscribed: numbering still counted them.
    assert_eq!(allocated.sequence, 3);
}

#[test]
fn close_waiters_releases_every_queued_call() {
    let mut ledger = ledger();
    let now = Instant::now();
    let _hold = granted(ledger.allocate(request(&[("activations", 10)]), now, false));
    let (_, mut rx) = queued(ledger.allocate(request(&[("activations", 1)]), now, true));
    ledger.close_waiters();
    assert!(matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
    ledger.check_invariants().unwrap();
}
