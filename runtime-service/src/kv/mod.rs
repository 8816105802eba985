//! KV-cache slabs leased from memory-service ahead of need, off the step's critical path.
//!
//! The device loop owns the blocks; for each model it publishes how many free blocks it wants
//! (a low watermark while it has sequences, plus whatever a step could not get) and how many it
//! has. A leaser task per model turns the difference into slab leases (one kv-cache Allocate per
//! slab, renewed by the keep-alive stream) and hands them to the loop, which carves them into
//! blocks. Slab size adapts: it halves when memory-service has no room for a whole one (so a
//! kv-cache pool that holds only a few sequences still works) and grows back after each grant.
//!
//! This file is the link between the two ends (what the device wants and has, the slabs on
//! their way); the leaser task itself is in `leaser`.

mod leaser;

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

pub use self::leaser::{SlabShape, spawn};
use crate::{error::Error, memory::Reservation};

/// Leases failed in a row (memory-service unreachable) before the device stops waiting for slabs:
/// with the leaser's backoff, about a third of a second.
const FAILURES_BEFORE_GIVING_UP: u32 = 3;

/// What the device wants and has, in blocks.
#[derive(Debug, Default)]
struct Demand {
    want_free: u64,
    free: u64,
    /// Blocks the device holds, free or not (the slabs it absorbed and has not returned).
    held: u64,
    /// Granted by the leaser, not yet absorbed by the device.
    inflight: u64,
    /// The span of a sequence waiting for the blocks: the lease joins its trace, so one trace
    /// shows a generation waiting on memory-service. Kept only while blocks are missing, and
    /// taken by the leaser's next try: a span stays open while any clone of it lives, so a
    /// clone left here would hold the generation's trace open until the next request.
    cause: Option<tracing::Span>,
    /// Why the last lease failed, if memory-service is unreachable: the device fails sequences
    /// that wait for blocks rather than hold them to their deadline. Cleared by a grant, and when
    /// new demand arrives after a quiet spell (the leaser is about to try again).
    failure: Option<Error>,
    /// Leases failed in a row (a single connect error after a restart is not an outage).
    failures: u32,
    /// memory-service had no room for even one block: growing is not possible now, so the device
    /// preempts instead of waiting for a slab. Cleared by a grant.
    exhausted: bool,
    /// Blocks the whole kv-cache pool holds, once the leaser has asked (0 until then).
    capacity: u64,
    /// The lane holds nothing and cannot start: lease the whole of `want_free` in one call.
    whole: bool,
}

impl Demand {
    fn missing(&self) -> u64 {
        self.want_free.saturating_sub(self.free + self.inflight)
    }
}

/// A slab for the device: `blocks` blocks, and the lease that backs them (none in tests that
/// drive the device without memory-service).
#[derive(Debug)]
pub struct Grant {
    /// Blocks in the slab.
    pub blocks: u64,
    /// The kv-cache lease; dropping it frees it.
    pub lease: Option<Reservation>,
}

/// The device's end of one model's leaser.
#[derive(Debug)]
pub struct Link {
    demand: Arc<Mutex<Demand>>,
    notify: Arc<Notify>,
    grants: mpsc::Receiver<Grant>,
}

/// The leaser's end.
#[derive(Debug)]
pub struct LeaserEnd {
    demand: Arc<Mutex<Demand>>,
    notify: Arc<Notify>,
    grants: mpsc::Sender<Grant>,
    /// Wakes the device loop when a slab arrives (it may be idle for want of blocks).
    wake: Arc<Notify>,
}

impl LeaserEnd {
    /// Hands the device a slab of `blocks` with no lease behind it: drives the device without
    /// memory-service (unit tests, the simulator benchmarks).
    pub async fn give(&self, blocks: u64) {
        lock(&self.demand).inflight += blocks;
        if self.grants.send(Grant { blocks, lease: None }).await.is_ok() {
            self.wake.notify_one();
        }
    }

    /// Blocks the device wants beyond what it has and what is on its way.
    pub fn missing(&self) -> u64 {
        lock(&self.demand).missing()
    }

    /// Blocks the device holds (absorbed and not returned), as of its last publication; with
    /// [`LeaserEnd::in_flight`], what a leaser without memory-service counts as taken.
    pub fn held(&self) -> u64 {
        lock(&self.demand).held
    }

    /// Blocks granted and not yet absorbed by the device.
    pub fn in_flight(&self) -> u64 {
        lock(&self.demand).inflight
    }

    /// Whether the device asks for a starved lane's whole need in one lease (see [`Link::set`]).
    pub fn whole(&self) -> bool {
        lock(&self.demand).whole
    }

    /// Waits until the device asks for blocks.
    pub async fn asked(&self) {
        self.notify.notified().await;
    }

    /// Reports a failed lease (as the leaser does when memory-service is unreachable).
    pub fn report_failure(&self, err: Error) {
        let mut demand = lock(&self.demand);
        demand.failure = Some(err);
        demand.failures += 1;
        drop(demand);
        self.wake.notify_one();
    }

    /// Reports that memory-service has no room (as the leaser does when even one block does not
    /// fit), so the device preempts instead of waiting for a slab.
    pub fn report_exhausted(&self) {
        lock(&self.demand).exhausted = true;
        self.wake.notify_one();
    }
}

fn lock(demand: &Mutex<Demand>) -> std::sync::MutexGuard<'_, Demand> {
    demand.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connected pair; grants wake the device through `wake`.
pub fn link(wake: Arc<Notify>) -> (Link, LeaserEnd) {
    let demand = Arc::new(Mutex::new(Demand::default()));
    let notify = Arc::new(Notify::new());
    // Grants are few and each is absorbed at the next step: a small buffer suffices.
    let (tx, rx) = mpsc::channel(8);
    (
        Link { demand: demand.clone(), notify: notify.clone(), grants: rx },
        LeaserEnd { demand, notify, grants: tx, wake },
    )
}

impl Link {
    /// Publishes the device's wish (`want_free`), its free and `held` blocks, and the span of a
    /// sequence waiting for it; wakes the leaser if blocks are missing.
    pub fn set(&self, want_free: u64, free: u64, held: u64, cause: Option<&tracing::Span>, whole: bool) {
        let missing = {
            let mut demand = lock(&self.demand);
            if demand.missing() == 0 && want_free > free + demand.inflight {
                // New demand after a quiet spell: an old failure says nothing about the next try.
                demand.failure = None;
                demand.failures = 0;
                demand.exhausted = false;
            }
            demand.want_free = want_free;
            demand.free = free;
            demand.held = held;
            demand.whole = whole;
            let missing = demand.missing();
            demand.cause = if missing > 0 { cause.cloned() } else { None };
            missing
        };
        if missing > 0 {
            self.notify.notify_one();
        }
    }

    /// Why leasing fails, while memory-service is unreachable.
    pub fn failure(&self) -> Option<Error> {
        let demand = lock(&self.demand);
        if demand.failures >= FAILURES_BEFORE_GIVING_UP { demand.failure.clone() } else { None }
    }

    /// Whether memory-service had no room at the last try.
    pub fn exhausted(&self) -> bool {
        lock(&self.demand).exhausted
    }

    /// Whether a new slab may still come: memory-service is reachable and had room at the last
    /// try. When not, the device preempts rather than waits.
    pub fn can_grow(&self) -> bool {
        let demand = lock(&self.demand);
        !demand.exhausted && demand.failures < FAILURES_BEFORE_GIVING_UP
    }

    /// Blocks the whole kv-cache pool holds (0 if not known yet).
    pub fn capacity(&self) -> u64 {
        lock(&self.demand).capacity
    }

    /// The next slab granted, if any. Its blocks count as free at once, so the leaser never
    /// sees them neither in flight nor free and leases them twice.
    pub fn try_grant(&mut self) -> Option<Grant> {
        let grant = self.grants.try_recv().ok()?;
        let mut demand = lock(&self.demand);
        demand.inflight = demand.inflight.saturating_sub(grant.blocks);
        demand.free += grant.blocks;
        Some(grant)
    }
}
