//! Unit tests of events with a store: a watcher hears only of committed changes, numbering goes
//! on across a restore, and a resuming watcher replays what it missed or is told it cannot.

use std::time::{Duration, SystemTime};

use tokio::{sync::broadcast::error::TryRecvError, time::Instant};

use super::{
    tests_durable::{FakeStore, grant, tracked_ledger},
    *,
};

/// A tracked ledger whose pool creation is committed, and a watcher from then on.
fn watched_after_creation(t0: Instant) -> (Ledger, tokio::sync::broadcast::Receiver<Arc<Event>>) {
    let mut ledger = tracked_ledger();
    let created = ledger.take_batch(t0, SystemTime::now());
    ledger.release_events(created.events);
    let (_, rx) = ledger.subscribe(None).expect("live");
    (ledger, rx)
}

fn kinds(events: &[Arc<Event>]) -> Vec<(u64, EventKind)> {
    events.iter().map(|e| (e.sequence, e.kind)).collect()
}

#[test]
fn events_wait_for_the_commit_of_their_change_and_are_numbered_in_release_order() {
    let t0 = Instant::now();
    let mut ledger = tracked_ledger();
    let (_, mut rx) = ledger.subscribe(None).expect("live");
    let lease = grant(&mut ledger, Duration::from_secs(60), t0);
    // Granted in memory, not yet committed: no watcher hears of it.
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
    let batch = ledger.take_batch(t0, SystemTime::now());
    // POOL_CREATED and ALLOCATED will be 1 and 2 once released.
    assert_eq!(batch.events, 2);
    // A renewal after the batch was taken is not covered by its commit.
    ledger.renew(lease, t0 + Duration::from_millis(1)).unwrap();
    ledger.release_events(batch.events);
    let first = rx.try_recv().unwrap();
    let second = rx.try_recv().unwrap();
    assert_eq!(
        [(first.sequence, first.kind), (second.sequence, second.kind)],
        [(1, EventKind::PoolCreated), (2, EventKind::Allocated)]
    );
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty, "the renewal is not committed");
    let batch = ledger.take_batch(t0, SystemTime::now());
    ledger.release_events(batch.events);
    assert_eq!((rx.try_recv().unwrap().sequence, batch.events), (3, 3));
}

#[test]
fn a_withdrawn_grant_whose_commit_failed_never_reaches_a_watcher() {
    let t0 = Instant::now();
    let (mut ledger, mut rx) = watched_after_creation(t0);
    let lease = grant(&mut ledger, Duration::from_secs(60), t0);
    let failed = ledger.take_batch(t0, SystemTime::now());
    ledger.retake(&failed);
    // The commit failed: the Allocate takes its grant back.
    assert_eq!(ledger.withdraw(&[lease], t0), 1);
    let kept = grant(&mut ledger, Duration::from_secs(60), t0);
    let batch = ledger.take_batch(t0, SystemTime::now());
    ledger.release_events(batch.events);
    let event = rx.try_recv().unwrap();
    assert_eq!((event.kind, event.lease, event.sequence), (EventKind::Allocated, Some(kept), 2));
    assert_eq!(event.pool_used, 10, "the withdrawn grant's bytes are not in use");
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty, "no FREED for a lease nobody saw");
    assert_eq!(ledger.pool_stats("kv-cache").unwrap().used, 10);
}

#[test]
fn numbering_goes_on_after_a_restore_and_a_watcher_resumes_with_the_restores_expiries() {
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let mut ledger = tracked_ledger();
    let short = grant(&mut ledger, Duration::from_secs(1), t0);
    let mut store = FakeStore::default();
    let batch = ledger.take_batch(t0, wall0);
    ledger.release_events(batch.events);
    store.apply(batch);
    // What a watcher saw last before the crash.
    let (seen, _) = ledger.subscribe(Some(0)).expect("from the start");
    let last_seen = seen.last().expect("events").sequence;
    assert_eq!(kinds(&seen), [(1, EventKind::PoolCreated), (2, EventKind::Allocated)]);

    // Down for 10 s: the lease ran out.
    let (t1, wall1) = (Instant::now(), wall0 + Duration::from_secs(10));
    let mut restored = Ledger::new(16);
    restored.track_changes();
    restored.restore(store.snapshot(), t1, wall1).unwrap();
    // Its EXPIRED is held until the restore's changes are committed, then retained for
    // watchers that resume.
    assert_eq!(restored.subscribe(Some(last_seen)).expect("resumable").0.len(), 0);
    assert_eq!(restored.subscribe(Some(0)).expect("the stored tail").0.len(), 2);
    let batch = restored.take_batch(t1, wall1);
    assert_eq!(batch.events, 3);
    restored.release_events(batch.events);
    let (replay, _) = restored.subscribe(Some(last_seen)).expect("resumable");
    assert_eq!(kinds(&replay), [(3, EventKind::Expired)]);
    assert_eq!(replay[0].lease, Some(short));
    // The stored tail came back too: a watcher further behind replays the previous life's
    // events first.
    let (replay, _) = restored.subscribe(Some(1)).expect("resumable from the stored tail");
    assert_eq!(kinds(&replay), [(2, EventKind::Allocated), (3, EventKind::Expired)]);
    // Asking for more than there is is refused.
    assert_eq!(restored.subscribe(Some(4)).unwrap_err(), ResumeGap::Ahead { latest: 3 });
}

#[test]
fn a_resuming_watcher_gets_the_retained_events_after_its_sequence_and_only_those() {
    let t0 = Instant::now();
    // In memory: events go out at once, and the last 16 are retained.
    let mut ledger = Ledger::new(16);
    ledger.create_pool("kv-cache", 1000).unwrap();
    for _ in 0..20 {
        grant(&mut ledger, Duration::from_secs(60), t0);
    }
    let (replay, _) = ledger.subscribe(Some(15)).expect("retained");
    assert_eq!(replay.iter().map(|e| e.sequence).collect::<Vec<_>>(), [16, 17, 18, 19, 20, 21]);
    assert_eq!(ledger.subscribe(Some(21)).expect("up to date").0.len(), 0);
    assert_eq!(ledger.subscribe(Some(3)).unwrap_err(), ResumeGap::Gone { oldest: 6, latest: 21 });
}

#[test]
fn a_grant_withdrawn_while_its_batch_is_being_written_keeps_its_number() {
    let t0 = Instant::now();
    let (mut ledger, mut rx) = watched_after_creation(t0);
    let lease = grant(&mut ledger, Duration::from_secs(60), t0);
    // The batch carrying the grant is being written when its caller leaves.
    let in_flight = ledger.take_batch(t0, SystemTime::now());
    assert_eq!(in_flight.events, 2);
    assert_eq!(ledger.withdraw(&[lease], t0), 1);
    // That batch is on disk: the grant was kept, then freed. Both are events, gapless.
    ledger.release_events(in_flight.events);
    let next = ledger.take_batch(t0, SystemTime::now());
    ledger.release_events(next.events);
    let seen: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| (e.sequence, e.kind)).collect();
    assert_eq!(seen, [(2, EventKind::Allocated), (3, EventKind::Freed)]);
    assert_eq!(next.events, 3);
}

#[test]
fn a_batch_carries_its_events_for_the_store_and_a_failed_one_gives_their_numbers_back() {
    let t0 = Instant::now();
    let mut ledger = tracked_ledger();
    grant(&mut ledger, Duration::from_secs(60), t0);
    let failed = ledger.take_batch(t0, SystemTime::now());
    assert_eq!(failed.event_records.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    ledger.retake(&failed);
    grant(&mut ledger, Duration::from_secs(60), t0);
    // The retry carries the failed batch's events again, under the same numbers, and the new one.
    let retry = ledger.take_batch(t0, SystemTime::now());
    assert_eq!(retry.event_records.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!((retry.events, retry.events_kept), (3, 16));
}
