//! Unit tests of the ledger's durability interface: batches carry exactly what changed, and a
//! restore from what the batches wrote gives back the same books, deadlines on the wall clock.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::*;

/// What a store would hold after applying batches, keyed as the real one.
#[derive(Default)]
pub(super) struct FakeStore {
    epoch: Option<u64>,
    events: u64,
    event_tail: Vec<Event>,
    pools: HashMap<Arc<str>, StoredPool>,
    leases: HashMap<LeaseId, StoredLease>,
    replays: HashMap<Arc<str>, StoredReplay>,
}

impl FakeStore {
    pub(super) fn apply(&mut self, batch: Batch) {
        self.epoch = Some(batch.epoch);
        self.events = batch.events;
        // The store keeps the latest `events_kept` events.
        self.event_tail.extend(batch.event_records.iter().map(|e| (**e).clone()));
        self.event_tail.sort_by_key(|e| e.sequence);
        self.event_tail.dedup_by_key(|e| e.sequence);
        let keep = (batch.events_kept as usize).max(1);
        let skip = self.event_tail.len().saturating_sub(keep);
        self.event_tail.drain(..skip);
        for pool in batch.pools {
            self.pools.insert(pool.name.clone(), pool);
        }
        for lease in batch.leases {
            self.leases.insert(lease.id, lease);
        }
        for id in batch.gone {
            self.leases.remove(&id);
        }
        for (key, replay) in batch.replays {
            match replay {
                Some(replay) => self.replays.insert(key, replay),
                None => self.replays.remove(&key),
            };
        }
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let mut pools: Vec<_> = self.pools.values().cloned().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            epoch: self.epoch,
            events: self.events,
            event_tail: self.event_tail.clone(),
            pools,
            leases: {
                let mut leases: Vec<_> = self.leases.values().cloned().collect();
                leases.sort_by_key(|l| l.id);
                leases
            },
            replays: self.replays.values().cloned().collect(),
        }
    }
}

fn request(items: &[(&str, u64)], scope: Option<&str>, ttl: Duration, key: Option<&str>) -> AllocRequest {
    AllocRequest {
        items: items.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
        holder: Arc::from("h"),
        scope: scope.map(Arc::from),
        ttl,
        request_id: key.map(Arc::from),
    }
}

fn granted(admission: Result<AllocateOutcome, Error>) -> Grant {
    match admission {
        Ok(AllocateOutcome::Granted(grant)) => grant,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// A ledger that tracks changes, with a kv-cache pool of 1,000 bytes.
pub(super) fn tracked_ledger() -> Ledger {
    let mut ledger = Ledger::new(16);
    ledger.track_changes();
    ledger.create_pool("kv-cache", 1000).unwrap();
    ledger
}

/// Grants 10 bytes of kv-cache for `ttl` at `now`; the lease's id.
pub(super) fn grant(ledger: &mut Ledger, ttl: Duration, now: Instant) -> LeaseId {
    granted(ledger.allocate(request(&[("kv-cache", 10)], None, ttl, None), now, false)).leases[0].id
}

#[test]
fn a_restore_gives_back_the_books_with_remaining_time_and_expires_what_ran_out() {
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let mut ledger = tracked_ledger();
    ledger.create_pool("activations", 100).unwrap();
    let long = Duration::from_secs(60);
    let keep = granted(ledger.allocate(
        request(&[("kv-cache", 300), ("activations", 10)], Some("s"), long, Some("r1")),
        t0,
        false,
    ));
    let short =
        granted(ledger.allocate(request(&[("kv-cache", 50)], None, Duration::from_secs(1), None), t0, false));
    let gone = granted(ledger.allocate(request(&[("kv-cache", 200)], Some("s"), long, None), t0, false));
    ledger.free(gone.leases[0].id, t0).unwrap();
    let seq = ledger.change_seq();
    let mut store = FakeStore::default();
    let batch = ledger.take_batch(t0, wall0);
    assert_eq!(batch.seq, seq);
    store.apply(batch);
    // Nothing changed since: the next batch is empty.
    assert!(ledger.take_batch(t0, wall0).is_empty());
    // A renewal is one lease written again.
    let t1 = t0 + Duration::from_millis(500);
    ledger.renew(keep.leases[0].id, t1).unwrap();
    let batch = ledger.take_batch(t1, wall0 + Duration::from_millis(500));
    assert_eq!((batch.leases.len(), batch.pools.len()), (1, 0));
    store.apply(batch);

    // The server is down for 30 s: the 1 s lease ran out, the others have time left.
    let (t2, wall2) = (Instant::now(), wall0 + Duration::from_secs(40));
    let mut restored = Ledger::new(16);
    restored.track_changes();
    let outcome = restored.restore(store.snapshot(), t2, wall2).unwrap();
    assert_eq!(outcome, Restored { live: 2, expired: 1, dropped: 0, reconciled: 0 });
    assert_eq!(restored.epoch(), ledger.epoch());
    let kv = restored.pool_stats("kv-cache").unwrap();
    assert_eq!((kv.used, kv.live_leases), (300, 1));
    assert_eq!(kv.counters.granted, 3);
    assert_eq!((kv.counters.freed, kv.counters.expired), (1, 1));
    // 60 s TTL renewed at +0.5 s and not renewed by +40 s: 20.5 s left, on the new monotonic
    // clock (the activations lease, granted at 0, has 20 s).
    assert_eq!(restored.next_deadline(), Some(t2 + Duration::from_secs(20)));
    // The idempotency record came back: a retry replays the same leases.
    let retry = request(&[("kv-cache", 300), ("activations", 10)], Some("s"), long, Some("r1"));
    let replay = granted(restored.allocate(retry, t2, false));
    assert!(replay.replayed);
    assert_eq!(replay.leases[0].id, keep.leases[0].id);
    restored.reap(t2 + Duration::from_millis(20_100));
    assert!(restored.renew(keep.leases[0].id, t2 + Duration::from_millis(20_200)).is_ok());
    let t3 = t2 + Duration::from_millis(20_200);
    assert!(matches!(restored.free(short.leases[0].id, t3), Err(Error::LeaseNotFound(_))));
    assert!(matches!(restored.free(gone.leases[0].id, t3), Err(Error::LeaseNotFound(_))));
    // The scope came back: the renewed kv-cache lease is in it; the activations lease (not
    // renewed) expired at its restored deadline.
    assert_eq!(restored.free_scope("h", "s", t3), (1, 300));
    restored.check_invariants().unwrap();
}

#[test]
fn a_failed_commit_is_retaken_whole_by_the_next_batch() {
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let mut ledger = tracked_ledger();
    let long = Duration::from_secs(60);
    let (kept, freed, later) =
        (grant(&mut ledger, long, t0), grant(&mut ledger, long, t0), grant(&mut ledger, long, t0));
    let _ = ledger.take_batch(t0, wall0);
    // The failed batch carries a removal and a renewal.
    ledger.free(freed, t0).unwrap();
    ledger.renew(later, t0).unwrap();
    ledger.renew(kept, t0).unwrap();
    let lost = ledger.take_batch(t0, wall0);
    assert_eq!((lost.leases.len(), lost.gone.len()), (2, 1));
    // While it was failing, one of its renewed leases was freed: the retry only removes it.
    ledger.free(later, t0).unwrap();
    ledger.retake(&lost);
    let again = ledger.take_batch(t0, wall0);
    let written: Vec<_> = again.leases.iter().map(|l| l.id).collect();
    assert_eq!(written, vec![kept]);
    let mut gone = again.gone.clone();
    gone.sort();
    let mut expected = vec![freed, later];
    expected.sort();
    assert_eq!(gone, expected, "both removals are written again");
    assert_eq!(again.pools.len(), 1);
}

#[test]
fn a_lease_granted_and_gone_between_two_batches_is_only_removed() {
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let mut ledger = tracked_ledger();
    let _ = ledger.take_batch(t0, wall0);
    let freed = grant(&mut ledger, Duration::from_secs(60), t0);
    let expired = grant(&mut ledger, Duration::from_secs(1), t0);
    let kept = grant(&mut ledger, Duration::from_secs(60), t0);
    ledger.free(freed, t0).unwrap();
    assert_eq!(ledger.reap(t0 + Duration::from_secs(2)), 1);
    let batch = ledger.take_batch(t0, wall0);
    let written: Vec<_> = batch.leases.iter().map(|l| l.id).collect();
    assert_eq!(written, vec![kept], "only the live lease is written");
    assert_eq!(batch.gone, vec![freed, expired], "the others are removed, in order");
    assert_eq!(batch.pools.len(), 1);
}

/// A store holding what a ledger wrote after granting one lease of `ttl` (returned).
fn one_lease_stored(t0: Instant, wall0: SystemTime, ttl: Duration) -> (LeaseId, FakeStore) {
    let mut ledger = tracked_ledger();
    let kept = grant(&mut ledger, ttl, t0);
    let mut store = FakeStore::default();
    store.apply(ledger.take_batch(t0, wall0));
    (kept, store)
}

#[test]
fn stored_leases_and_records_that_cannot_be_accounted_for_are_dropped_and_deleted_by_the_next_commit() {
    let (t0, wall0, long) = (Instant::now(), SystemTime::now(), Duration::from_secs(60));
    let (kept, mut store) = one_lease_stored(t0, wall0, long);
    // A damaged store: one lease of a pool it does not hold, and one that fits the pool but not
    // what is left of it once the kept lease is back (the snapshot lists leases by id, and
    // this one's id is the highest).
    let template = store.leases[&kept].clone();
    let orphan =
        StoredLease { id: LeaseId::from_raw(7), pool: Arc::from("no-such-pool"), ..template.clone() };
    let oversize = StoredLease { id: LeaseId::from_raw(u128::MAX), size: 995, ..template };
    store.leases.insert(orphan.id, orphan.clone());
    store.leases.insert(oversize.id, oversize.clone());
    // And the idempotency record of the orphan's grant, which can never be replayed.
    let record = StoredReplay {
        key: Arc::from("h/r-orphan"),
        items: vec![(Arc::from("no-such-pool"), 10)],
        scope: None,
        ttl: long,
        leases: vec![orphan.id],
    };
    store.replays.insert(record.key.clone(), record.clone());

    let mut restored = Ledger::new(16);
    restored.track_changes();
    let outcome = restored.restore(store.snapshot(), t0, wall0).unwrap();
    assert_eq!(outcome, Restored { live: 1, expired: 0, dropped: 2, reconciled: 0 });
    let kv = restored.pool_stats("kv-cache").unwrap();
    assert_eq!((kv.used, kv.live_leases), (10, 1), "only the lease that fits is accounted");
    restored.check_invariants().unwrap();
    // The first commit after the restore deletes them; a second restart finds them gone.
    let batch = restored.take_batch(t0, wall0);
    let mut gone = batch.gone.clone();
    gone.sort();
    assert_eq!(gone, vec![orphan.id, oversize.id]);
    assert_eq!(batch.replays, vec![(record.key.clone(), None)], "the record is deleted too");
    store.apply(batch);
    let mut again = Ledger::new(16);
    again.track_changes();
    assert_eq!(
        again.restore(store.snapshot(), t0, wall0).unwrap(),
        Restored { live: 1, expired: 0, dropped: 0, reconciled: 0 }
    );
}

#[test]
fn stored_counters_that_do_not_add_up_with_the_leases_restored_are_made_to_and_written_back() {
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let (kept, mut store) = one_lease_stored(t0, wall0, Duration::from_secs(60));
    let counted = store.pools[&Arc::from("kv-cache") as &Arc<str>].counters;

    // A lease the counters count but that does not fit (so the restore drops it): counted as
    // expired, its bytes as released.
    let oversize = StoredLease { id: LeaseId::from_raw(u128::MAX), size: 995, ..store.leases[&kept].clone() };
    store.leases.insert(oversize.id, oversize);
    let pool = store.pools.get_mut("kv-cache").unwrap();
    pool.counters.granted += 1;
    pool.counters.granted_bytes += 995;
    let mut restored = Ledger::new(16);
    restored.track_changes();
    let outcome = restored.restore(store.snapshot(), t0, wall0).unwrap();
    assert_eq!(outcome, Restored { live: 1, expired: 0, dropped: 1, reconciled: 1 });
    restored.check_invariants().unwrap();
    let c = restored.pool_stats("kv-cache").unwrap().counters;
    assert_eq!((c.granted, c.expired, c.released_bytes), (counted.granted + 1, counted.expired + 1, 995));
    // The next commit writes the corrected counters, so the next restart finds them adding up.
    let batch = restored.take_batch(t0, wall0);
    assert_eq!(batch.pools.len(), 1);
    assert_eq!(batch.pools[0].counters, c);
    store.apply(batch);
    let mut again = Ledger::new(16);
    again.track_changes();
    assert_eq!(again.restore(store.snapshot(), t0, wall0).unwrap().reconciled, 0);

    // Counters that count fewer grants than the leases held (and absurd ones, which must not
    // overflow): the grants are raised to what is held.
    let pool = store.pools.get_mut("kv-cache").unwrap();
    pool.counters = Counters { freed: u64::MAX, released_bytes: u128::MAX, ..Counters::default() };
    let mut damaged = Ledger::new(16);
    damaged.track_changes();
    assert_eq!(damaged.restore(store.snapshot(), t0, wall0).unwrap().reconciled, 1);
    let c = damaged.pool_stats("kv-cache").unwrap().counters;
    assert_eq!((c.granted, c.granted_bytes), (u64::MAX, u128::MAX), "saturated, not wrapped");
}
