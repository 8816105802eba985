//! Property test: any sequence of ledger operations keeps the books exact, what the change
//! batches wrote restores to the same books at any point, and once everything is freed or
//! expired every pool is back to zero. Operations include offering leases as reclaimable on
//! streams, answering the asks (freeing, declining, or staying silent until revoked) and
//! streams ending.

use std::{sync::Arc, time::Duration};

use std::collections::HashMap;

use memory_service::ledger::{
    AllocRequest, AllocateOutcome, Batch, Grant, LeaseId, Ledger, Snapshot, StreamId,
};
use proptest::prelude::*;
use tokio::{sync::oneshot, time::Instant};

const POOLS: [&str; 3] = ["kv-cache", "activations", "uniforms"];

#[derive(Debug, Clone)]
enum Op {
    CreatePool {
        name: u8,
        capacity: u64,
    },
    Allocate {
        items: Vec<(u8, u64)>,
        scope: Option<u8>,
        ttl_ms: u64,
        wait: bool,
        key: Option<u8>,
    },
    Free {
        pick: usize,
    },
    FreeBogus,
    FreeScope {
        scope: u8,
    },
    Renew {
        pick: usize,
    },
    RenewScope {
        scope: u8,
    },
    Advance {
        ms: u64,
    },
    Abandon {
        pick: usize,
        timed_out: bool,
    },
    DropWaiter {
        pick: usize,
    },
    /// Take the change batch and apply it to the model store.
    Commit,
    /// Stream `stream` offers the picked leases (replacing its set; stale ids included).
    Offer {
        stream: u8,
        picks: Vec<usize>,
    },
    /// Stream `stream` reads its asks and frees what they name, or declines them all.
    Answer {
        stream: u8,
        free: bool,
    },
    /// Stream `stream` ends.
    CloseStream {
        stream: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0u8..6, 1u64..200).prop_map(|(name, capacity)| Op::CreatePool { name, capacity }),
        6 => (
            prop::collection::vec((0u8..4, 1u64..120), 1..4),
            prop::option::of(0u8..3),
            1u64..5_000,
            any::<bool>(),
            prop::option::of(0u8..4),
        )
            .prop_map(|(items, scope, ttl_ms, wait, key)| Op::Allocate { items, scope, ttl_ms, wait, key }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::FreeBogus),
        1 => (0u8..3).prop_map(|scope| Op::FreeScope { scope }),
        2 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        1 => (0u8..3).prop_map(|scope| Op::RenewScope { scope }),
        2 => (0u64..3_000).prop_map(|ms| Op::Advance { ms }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, timed_out)| Op::Abandon { pick, timed_out }),
        1 => any::<usize>().prop_map(|pick| Op::DropWaiter { pick }),
        2 => Just(Op::Commit),
        4 => (0u8..3, prop::collection::vec(any::<usize>(), 0..10)).prop_map(|(stream, picks)| Op::Offer { stream, picks }),
        3 => (0u8..3, any::<bool>()).prop_map(|(stream, free)| Op::Answer { stream, free }),
        1 => (0u8..3).prop_map(|stream| Op::CloseStream { stream }),
    ]
}

/// Operations skewed towards reclaiming: small leases in two pools that fill up, waits, long
/// TTLs, offers and answers, and time moving by fractions of the reclaim timeout.
fn reclaim_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            prop::collection::vec((0u8..2, 1u64..40), 1..3),
            prop::option::of(0u8..3),
            2_000u64..20_000,
            prop::bool::weighted(0.8),
        )
            .prop_map(|(items, scope, ttl_ms, wait)| Op::Allocate { items, scope, ttl_ms, wait, key: None }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (0u8..3).prop_map(|scope| Op::FreeScope { scope }),
        1 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        2 => (0u64..1_500).prop_map(|ms| Op::Advance { ms }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, timed_out)| Op::Abandon { pick, timed_out }),
        1 => any::<usize>().prop_map(|pick| Op::DropWaiter { pick }),
        1 => Just(Op::Commit),
        5 => (0u8..3, prop::collection::vec(any::<usize>(), 0..12)).prop_map(|(stream, picks)| Op::Offer { stream, picks }),
        4 => (0u8..3, any::<bool>()).prop_map(|(stream, free)| Op::Answer { stream, free }),
        1 => (0u8..3).prop_map(|stream| Op::CloseStream { stream }),
    ]
}

fn pool_name(i: u8) -> String {
    POOLS.get(usize::from(i)).map_or_else(|| format!("extra-{i}"), |p| p.to_string())
}

/// What the store would hold after the batches so far.
#[derive(Default)]
struct Store {
    snapshot: Snapshot,
    leases: HashMap<LeaseId, usize>,
}

impl Store {
    fn apply(&mut self, batch: Batch) {
        let s = &mut self.snapshot;
        s.epoch = Some(batch.epoch);
        for pool in batch.pools {
            match s.pools.iter_mut().find(|p| p.name == pool.name) {
                Some(stored) => *stored = pool,
                None => s.pools.push(pool),
            }
        }
        for lease in batch.leases {
            match self.leases.get(&lease.id).copied() {
                Some(i) => s.leases[i] = lease,
                None => {
                    self.leases.insert(lease.id, s.leases.len());
                    s.leases.push(lease);
                }
            }
        }
        for id in batch.gone {
            if let Some(i) = self.leases.remove(&id) {
                s.leases.swap_remove(i);
                if let Some(moved) = s.leases.get(i) {
                    self.leases.insert(moved.id, i);
                }
            }
        }
        for (key, replay) in batch.replays {
            s.replays.retain(|r| r.key != key);
            if let Some(replay) = replay {
                s.replays.push(replay);
            }
        }
    }
}

/// Restores what `store` holds and checks it is the books of `ledger` (committed just before).
fn check_restore(
    ledger: &Ledger,
    store: &Store,
    now: Instant,
    wall: std::time::SystemTime,
) -> Result<(), TestCaseError> {
    let mut restored = Ledger::new(16);
    restored.restore(store.snapshot.clone(), now, wall).map_err(|e| TestCaseError::fail(e.to_string()))?;
    restored.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(restored.epoch(), ledger.epoch());
    prop_assert_eq!(restored.live_leases(), ledger.live_leases());
    for pool in ledger.list_pools() {
        let back = restored.pool_stats(&pool.name).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Offers and asks are soft state: none survives a restart, and open asks count as declined.
        let mut counters = pool.counters;
        let c = &pool.counters;
        counters.reclaim_declined += c.reclaim_asked - c.reclaim_returned - c.reclaim_declined - c.revoked;
        prop_assert_eq!(
            (back.used, back.live_leases, back.counters),
            (pool.used, pool.live_leases, counters)
        );
        prop_assert_eq!((back.reclaimable, back.reclaiming), (0, 0));
    }
    Ok(())
}

/// Leases the test believes it holds, and calls still waiting.
#[derive(Default)]
struct Model {
    leases: Vec<LeaseId>,
    waiters: Vec<(u64, oneshot::Receiver<Result<Grant, memory_service::ledger::Error>>)>,
    /// Open streams, and what each last offered.
    streams: HashMap<u8, (StreamId, Vec<LeaseId>)>,
}

impl Model {
    /// Collects grants delivered to waiters since the last step.
    fn collect(&mut self) {
        self.waiters.retain_mut(|(_, rx)| match rx.try_recv() {
            Ok(Ok(grant)) => {
                self.leases.extend(grant.leases.iter().map(|l| l.id));
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
        });
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut ledger = Ledger::new(16);
    ledger.track_changes();
    let mut store = Store::default();
    let wall = std::time::SystemTime::now();
    for (i, name) in POOLS.iter().enumerate() {
        ledger.create_pool(name, 100 * (i as u64 + 1)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let mut now = Instant::now();
    let ledger_start = now;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::CreatePool { name, capacity } => {
                let _ = ledger.create_pool(&pool_name(name), capacity);
            }
            Op::Allocate { items, scope, ttl_ms, wait, key } => {
                let request = AllocRequest {
                    items: items.iter().map(|&(p, s)| (pool_name(p), s)).collect(),
                    holder: Arc::from("prop"),
                    scope: scope.map(|s| Arc::from(format!("scope-{s}"))),
                    ttl: Duration::from_millis(ttl_ms),
                    request_id: key.map(|k| Arc::from(format!("req-{k}"))),
                };
                match ledger.allocate(request, now, wait) {
                    Ok(AllocateOutcome::Granted(grant)) if !grant.replayed => {
                        model.leases.extend(grant.leases.iter().map(|l| l.id));
                    }
                    Ok(AllocateOutcome::Granted(_)) | Err(_) => {}
                    Ok(AllocateOutcome::Queued { ticket, grant }) => model.waiters.push((ticket, grant)),
                }
            }
            Op::Free { pick } if !model.leases.is_empty() => {
                let id = model.leases.swap_remove(pick % model.leases.len());
                let _ = ledger.free(id, now);
            }
            Op::FreeBogus => {
                prop_assert!(ledger.free(LeaseId::from_raw(u128::MAX), now).is_err());
            }
            Op::FreeScope { scope } => {
                ledger.free_scope("prop", &format!("scope-{scope}"), now);
            }
            Op::Renew { pick } if !model.leases.is_empty() => {
                let _ = ledger.renew(model.leases[pick % model.leases.len()], now);
            }
            Op::RenewScope { scope } => {
                ledger.renew_scope("prop", &format!("scope-{scope}"), now, &mut Default::default());
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(ms);
                ledger.reap(now);
            }
            Op::Abandon { pick, timed_out } if !model.waiters.is_empty() => {
                let (ticket, _rx) = model.waiters.swap_remove(pick % model.waiters.len());
                if ledger.abandon_wait(ticket, now, Duration::ZERO, timed_out).is_none() {
                    // Granted before it was abandoned: as the service's guard does, free it.
                    let mut rx = _rx;
                    if let Ok(Ok(grant)) = rx.try_recv() {
                        for lease in grant.leases {
                            let _ = ledger.free(lease.id, now);
                        }
                    }
                }
            }
            Op::Commit => store.apply(ledger.take_batch(now, wall + (now - ledger_start))),
            Op::DropWaiter { pick } if !model.waiters.is_empty() => {
                // A caller that vanished without abandoning: the ledger must skip it.
                model.waiters.swap_remove(pick % model.waiters.len());
            }
            Op::Offer { stream, picks } => {
                let id = match model.streams.get(&stream) {
                    Some(&(id, _)) => id,
                    None => ledger.open_offer().id,
                };
                // Picks past the live leases name a lease that is gone (or never was).
                let set: Vec<LeaseId> = picks
                    .iter()
                    .map(|&pick| {
                        model
                            .leases
                            .get(pick % (model.leases.len() + 2))
                            .copied()
                            .unwrap_or(LeaseId::from_raw(pick as u128))
                    })
                    .collect();
                let offered =
                    ledger.set_reclaimable(id, &set, now).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(offered.offered <= set.len());
                model.streams.insert(stream, (id, set));
            }
            Op::Answer { stream, free } => {
                if let Some((id, offered)) = model.streams.get_mut(&stream) {
                    let asked: Vec<LeaseId> =
                        ledger.take_notices(*id, now).into_iter().flat_map(|n| n.leases).collect();
                    if free {
                        for lease in &asked {
                            prop_assert!(ledger.free(*lease, now).is_ok(), "an asked lease is live");
                            model.leases.retain(|l| l != lease);
                        }
                    } else {
                        offered.retain(|l| !asked.contains(l));
                        let set = offered.clone();
                        ledger
                            .set_reclaimable(*id, &set, now)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
            }
            Op::CloseStream { stream } => {
                if let Some((id, _)) = model.streams.remove(&stream) {
                    ledger.close_offer(id, now);
                }
            }
            _ => {}
        }
        model.collect();
        ledger.check_invariants().map_err(TestCaseError::fail)?;
    }

    // What was committed restores to the books as they stand (the same instant on both clocks).
    let start = ledger_start;
    store.apply(ledger.take_batch(now, wall + (now - start)));
    check_restore(&ledger, &store, now, wall + (now - start))?;

    // Everything left either expires or is freed: every pool returns to zero.
    for (_, (id, _)) in model.streams.drain() {
        ledger.close_offer(id, now);
    }
    ledger.close_waiters();
    model.collect();
    now += Duration::from_secs(3600);
    ledger.reap(now);
    ledger.check_invariants().map_err(TestCaseError::fail)?;
    for pool in ledger.list_pools() {
        prop_assert_eq!(pool.used, 0, "pool {} not empty", pool.name);
        prop_assert_eq!(pool.live_leases, 0);
        let c = pool.counters;
        prop_assert_eq!(c.granted, c.freed + c.expired + c.revoked);
        prop_assert_eq!(c.reclaim_asked, c.reclaim_returned + c.reclaim_declined + c.revoked);
        prop_assert_eq!((pool.reclaimable, pool.reclaiming), (0, 0));
    }
    prop_assert_eq!(ledger.live_leases(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn books_balance_after_any_sequence(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }

    #[test]
    fn reclaims_balance_after_any_sequence(ops in prop::collection::vec(reclaim_op(), 1..120)) {
        run(ops)?;
    }
}
