//! The offline kv-cache pool: one leaser task per model grants slabs from a local budget at
//! once, as memory-service's pool would with this engine as its only tenant. What a lane holds
//! is what it last published ([`LeaserEnd::held`]) plus its grants on the way, so the slabs it
//! returns come back to the pool.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::kv::{LeaserEnd, SlabShape};

/// The pool and every lane's end: a grant to one lane leaves less for the others.
struct Pool {
    bytes: u64,
    lanes: Vec<(Arc<LeaserEnd>, SlabShape)>,
}

impl Pool {
    /// Bytes no lane holds or has on its way.
    fn free_bytes(&self) -> u64 {
        let taken: u64 =
            self.lanes.iter().map(|(end, shape)| (end.held() + end.in_flight()) * shape.block_bytes).sum();
        self.bytes.saturating_sub(taken)
    }
}

/// Starts one leaser per lane over a pool of `bytes`; they end with `shutdown`.
pub(super) fn spawn(
    lanes: Vec<(LeaserEnd, SlabShape)>,
    bytes: u64,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let lanes: Vec<_> = lanes.into_iter().map(|(end, shape)| (Arc::new(end), shape)).collect();
    let ends: Vec<_> = lanes.iter().map(|(end, _)| end.clone()).collect();
    let pool = Arc::new(Mutex::new(Pool { bytes, lanes }));
    for (lane, end) in ends.into_iter().enumerate() {
        let (pool, shutdown) = (pool.clone(), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = lease(&pool, lane, &end) => {}
            }
        });
    }
}

/// Grants lane `lane` what it misses, a slab at a time (its whole need at once when it asks
/// so), while the pool has room; reports the pool exhausted when it has none, and waits for the
/// lane's next wish (it publishes after each step, and returns slabs when starved).
async fn lease(pool: &Mutex<Pool>, lane: usize, end: &LeaserEnd) {
    let mut refused = false;
    loop {
        // A wish published since the last look left a permit: this returns at once then.
        if refused || end.missing() == 0 {
            end.asked().await;
        }
        let pool = pool.lock().await;
        let shape = &pool.lanes[lane].1;
        let missing = end.missing();
        if missing == 0 {
            refused = false;
            continue;
        }
        // Slabs of the service's size: never more than a sixteenth of the pool (kv::leaser).
        let cap = shape.slab_blocks.min(pool.bytes / shape.block_bytes / 16).max(1);
        let wanted = if end.whole() { missing } else { cap };
        let blocks = wanted.min(pool.free_bytes() / shape.block_bytes);
        refused = blocks == 0;
        if refused {
            end.report_exhausted();
        } else {
            // Under the pool's lock: the grant counts as taken before another lane looks.
            end.give(blocks).await;
        }
    }
}
