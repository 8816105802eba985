//! Cached KV that memory-service may take back: slabs whose blocks no sequence references hold
//! only a cache, so they are offered to memory-service as reclaimable; when it asks for some
//! (another tenant waits for memory), their cached blocks are evicted and the slabs freed.

use proto::memory::v1::ReclaimRequest;
use tokio::{sync::mpsc, task::JoinSet};
use tracing::info;

use super::lane::Lane;
use crate::memory::Renewer;
use crate::scheduler::SlabId;

/// The device loop's side of reclaiming: where offers go and requests come from.
#[derive(Debug)]
pub struct Reclaim {
    /// Carries the offer on its keep-alive stream.
    pub renewer: Renewer,
    /// memory-service's requests, as the renewer receives them.
    pub requests: mpsc::Receiver<ReclaimRequest>,
    /// Frees of slabs given back, in flight. Until they land the offer is not restated: an
    /// offer without a lease memory-service asked for reads as "declined" if it arrives before
    /// the lease's free.
    pub freeing: JoinSet<()>,
    /// The cache-only slabs (by lane) last offered: the offer is rebuilt only when they change,
    /// not at every device step. A slab's number is never reused, so equal sets mean equal
    /// offers.
    pub offered: Vec<(usize, SlabId)>,
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        // A free in flight at shutdown finishes on its own (its lease would otherwise linger
        // until its TTL).
        self.freeing.detach_all();
    }
}

impl Reclaim {
    /// Offers every slab of `lanes` that holds only cache (oldest first within a lane), once the
    /// frees of those given back have landed.
    pub(super) fn offer(&mut self, lanes: &[Lane]) {
        while self.freeing.try_join_next().is_some() {}
        if !self.freeing.is_empty() {
            return;
        }
        let slabs: Vec<(usize, SlabId)> = lanes
            .iter()
            .enumerate()
            .flat_map(|(i, lane)| lane.cache_only_slabs().map(move |s| (i, s)))
            .collect();
        if slabs != self.offered {
            self.renewer.offer(lanes.iter().flat_map(Lane::offered).collect());
            self.offered = slabs;
        }
    }

    /// Gives back what memory-service asked for since the last call: each named lease whose slab
    /// still holds only cache. One referenced again since it was offered is kept (the next offer
    /// leaves it out, which tells memory-service).
    pub(super) fn serve(&mut self, lanes: &mut [Lane], first: Option<ReclaimRequest>) {
        let mut next = first.or_else(|| self.requests.try_recv().ok());
        while let Some(request) = next {
            let (mut slabs, mut blocks) = (0, 0);
            for lease in &request.lease_ids {
                if let Some((freed, reservation)) = lanes.iter_mut().find_map(|lane| lane.reclaim(lease)) {
                    slabs += 1;
                    blocks += freed;
                    if let Some(reservation) = reservation {
                        self.freeing.spawn(reservation.release());
                    }
                }
            }
            info!(
                pool = %request.pool,
                asked = request.lease_ids.len(),
                slabs,
                blocks,
                "gave cached KV back to memory-service for a waiting tenant"
            );
            next = self.requests.try_recv().ok();
        }
    }
}
