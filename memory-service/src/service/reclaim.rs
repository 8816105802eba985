//! A KeepAlive stream's reclaimable offer: registered on the first `reclaimable` set it carries,
//! closed however the stream ends, and the ReclaimRequests it sends unsolicited.

use std::sync::Arc;

use proto::memory::v1 as pb;
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;

use super::Shared;
use crate::ledger::{OfferHandle, ReclaimNotice, StreamId};

/// A stream's offer in the ledger. Dropping it takes back every lease the stream offers (asks
/// for them are declined; the leases stay held): the stream is the only way to ask its holder,
/// so an offer must not outlive it, whatever path ends the task.
#[derive(Debug)]
pub(super) struct OfferGuard {
    shared: Arc<Shared>,
    handle: OfferHandle,
}

impl OfferGuard {
    /// Registers a new offer for the stream.
    pub(super) fn open(shared: &Arc<Shared>) -> Self {
        let handle = shared.ledger().open_offer();
        OfferGuard { shared: shared.clone(), handle }
    }

    /// The stream's id in the ledger.
    pub(super) fn id(&self) -> StreamId {
        self.handle.id
    }
}

impl Drop for OfferGuard {
    fn drop(&mut self) {
        self.shared.ledger().close_offer(self.handle.id, Instant::now());
        // Closing may ask other holders (events and counters nobody waits on).
        self.shared.durability().nudge();
    }
}

/// Resolves when asks wait to be sent on the stream of `offer`; never without an offer.
pub(super) async fn asked(offer: &Option<OfferGuard>) {
    match offer {
        Some(offer) => offer.handle.wake.notified().await,
        None => std::future::pending().await,
    }
}

/// The ReclaimRequests waiting for `offer`'s stream, as unsolicited responses.
pub(super) fn notices(shared: &Shared, offer: &OfferGuard) -> Vec<Result<pb::KeepAliveResponse, Status>> {
    let notices = shared.ledger().take_notices(offer.id(), Instant::now());
    notices
        .into_iter()
        .map(|notice| {
            Ok(pb::KeepAliveResponse {
                reclaim: Some(reclaim_request(notice)),
                server_epoch: shared.epoch,
                ..pb::KeepAliveResponse::default()
            })
        })
        .collect()
}

fn reclaim_request(notice: ReclaimNotice) -> pb::ReclaimRequest {
    pb::ReclaimRequest {
        reclaim_id: notice.id,
        pool: notice.pool.to_string(),
        lease_ids: notice.leases.iter().map(ToString::to_string).collect(),
        bytes: notice.bytes,
        needed_bytes: notice.needed,
        within: prost_types::Duration::try_from(notice.within).ok(),
    }
}

/// Sends `responses` on `tx`; false if the client went away or the server is shutting down.
pub(super) async fn send_all(
    tx: &mpsc::Sender<Result<pb::KeepAliveResponse, Status>>,
    responses: Vec<Result<pb::KeepAliveResponse, Status>>,
    shutdown: &mut std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
) -> bool {
    for response in responses {
        let sent = tokio::select! {
            sent = tx.send(response) => sent.is_ok(),
            () = shutdown.as_mut() => false,
        };
        if !sent {
            return false;
        }
    }
    true
}
