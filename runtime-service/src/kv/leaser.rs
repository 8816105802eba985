//! The leaser task: one per model, it turns the blocks the device is missing into kv-cache slab
//! leases and sends them over the [`Link`](super::Link). The slab size adapts here (halved when
//! memory-service has no room, doubled back after each grant), with backoff while it is
//! unreachable.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::{Grant, LeaserEnd, lock};
use crate::{
    error::Error,
    memory::{Ask, KV_CACHE, Loader, Reservation, unique_scope},
};

/// First delay before leasing again after a failure; doubles up to a second.
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// How one model's slabs are leased.
#[derive(Debug, Clone)]
pub struct SlabShape {
    /// The model (names the slab scopes).
    pub model: String,
    /// Bytes of one block.
    pub block_bytes: u64,
    /// Largest slab, in blocks.
    pub slab_blocks: u64,
}

/// Starts the leaser task of one model; it ends with `shutdown` or when the device drops its
/// [`Link`](super::Link).
pub fn spawn(end: LeaserEnd, plan: SlabShape, loader: Loader, shutdown: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = lease(end, plan, loader) => {}
        }
    });
}

async fn lease(end: LeaserEnd, plan: SlabShape, loader: Loader) {
    // The largest slab: the plan's, and never more than a sixteenth of the whole pool, so
    // several runtimes (and a pool sized for only a few sequences) share it in useful pieces.
    let mut cap = plan.slab_blocks.max(1);
    let mut size = cap;
    // The server epoch the pool's capacity (and so `cap`) was read in: read again in a new one.
    let mut capped_in = None;
    let mut pool_bytes = 0;
    let mut backoff = RETRY_FIRST;
    loop {
        let (missing, cause, whole) = {
            let mut demand = lock(&end.demand);
            (demand.missing(), demand.cause.take(), demand.whole)
        };
        if missing == 0 {
            if end.grants.is_closed() {
                return;
            }
            backoff = RETRY_FIRST; // the next outage starts from a short retry again
            end.notify.notified().await;
            continue;
        }
        let span = match &cause {
            Some(cause) if !cause.is_none() => {
                tracing::info_span!(parent: cause, "kv.lease", model = %plan.model, blocks = size)
            }
            _ if serving::telemetry::exporting() => {
                tracing::info_span!("kv.lease", model = %plan.model, blocks = size)
            }
            _ => tracing::Span::none(),
        };
        // Not kept through a retry's backoff: the lease span holds what it needs of it.
        drop(cause);
        let result = async {
            if capped_in != Some(loader.renewer.epoch()) {
                let capacity =
                    loader.renewer.learn_epoch(loader.client.pool_capacity(KV_CACHE), |c| c.epoch).await?;
                pool_bytes = capacity.bytes;
                cap = plan.slab_blocks.min(capacity.bytes / plan.block_bytes / 16).max(1);
                size = size.min(cap);
                capped_in = Some(capacity.epoch);
            }
            // The device's own memory bounds the kv-cache too (weights load and leave): the pool,
            // or the device beside its weights and activations, whichever is less. A full device
            // is no room, as a full pool is: smaller slabs, then preemption, never a failure.
            let device = &loader.device_memory;
            lock(&end.demand).capacity = pool_bytes.min(device.kv_room()) / plan.block_bytes;
            let free = device.free() / plan.block_bytes;
            if free == 0 || (whole && missing > free) {
                return Err(Error::MemoryExhausted {
                    detail: format!("the device {} has no room for more kv-cache", device.name()),
                    attempts: 1,
                    waited: Duration::ZERO,
                });
            }
            size = size.min(free);
            // A lane that holds nothing and cannot start its first sequence asks for that
            // sequence's whole need in one call and waits for it server-side (first come, first
            // served): taking it piece by piece would hold some while waiting for the rest, and
            // two lanes doing so could wait for each other for ever.
            let (blocks, max_wait) = if whole {
                (missing, loader.max_wait)
            } else if size == 1 && lock(&end.demand).exhausted {
                // At one block the pool is full: wait server-side for someone else's free.
                (1, loader.max_wait)
            } else {
                // No server-side wait while the size can still shrink: halve on refusal.
                (size, Duration::ZERO)
            };
            let ask = Ask {
                items: vec![(KV_CACHE, blocks * plan.block_bytes)],
                scope: unique_scope(&loader.instance, "kv", &plan.model),
                ttl: loader.ttl,
                max_wait,
            };
            Reservation::acquire(&loader, &ask).await.map(|reservation| (blocks, reservation))
        }
        .instrument(span)
        .await;
        match result {
            Ok((blocks, reservation)) => {
                {
                    let mut demand = lock(&end.demand);
                    demand.inflight += blocks;
                    demand.failure = None;
                    demand.failures = 0;
                    demand.exhausted = false;
                }
                debug!(model = %plan.model, blocks, "kv slab leased");
                if end.grants.send(Grant { blocks, lease: Some(reservation) }).await.is_err() {
                    return; // the device is gone; the lease was dropped, hence freed
                }
                end.wake.notify_one();
                size = (size * 2).min(cap);
                backoff = RETRY_FIRST;
                continue;
            }
            Err(Error::MemoryExhausted { .. }) if size > 1 && !whole => {
                size /= 2;
                continue;
            }
            Err(Error::MemoryExhausted { .. }) => {
                let mut demand = lock(&end.demand);
                if !demand.exhausted {
                    // The pool is full: tell the device now, then wait server-side for room.
                    demand.exhausted = true;
                    drop(demand);
                    end.wake.notify_one();
                    continue;
                }
                // No room within the wait: others hold the pool; try again.
            }
            Err(err) => {
                warn!(model = %plan.model, cause = %err, retry_in = ?backoff, "cannot lease kv-cache");
                capped_in = None; // memory-service may have restarted with other pools
                let mut demand = lock(&end.demand);
                demand.failure = Some(err);
                demand.failures += 1;
                drop(demand);
                end.wake.notify_one();
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
