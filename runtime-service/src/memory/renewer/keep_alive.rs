//! The renewal task: one KeepAlive stream to memory-service, a round of renewals every third of
//! the TTL (and whenever the offer changes), and memory-service's ReclaimRequests passed to the
//! device loop.
//!
//! Apart from the [`Renewer`] handle because it is the only part that does I/O: the handle's
//! state (scopes, fence, epoch) is plain and synchronous, and this task is its one writer from
//! the network side.

use std::time::Duration;

use proto::memory::v1::{KeepAliveRequest, KeepAliveResponse, ReclaimRequest, ReclaimableSet};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{debug, warn};

use super::{MemoryClient, Renewer, lock};

/// Delay before renewing again after the stream broke or a round failed.
const RETRY: Duration = Duration::from_secs(1);

/// Scopes per KeepAlive message (memory-service's limit).
const SCOPES_PER_MESSAGE: usize = 64;

type Stream = (mpsc::Sender<KeepAliveRequest>, Streaming<KeepAliveResponse>);

/// Renews `renewer`'s scopes until `shutdown`, reporting on `health` whether memory-service
/// answers and passing its ReclaimRequests on to `reclaims`.
pub(super) async fn run(
    client: MemoryClient,
    renewer: Renewer,
    health: watch::Sender<bool>,
    reclaims: mpsc::Sender<ReclaimRequest>,
    shutdown: CancellationToken,
) {
    let mut offered = renewer.offered.subscribe();
    let (scopes, kick, interval) = (&renewer.scopes, &renewer.kick, renewer.ttl / 3);
    // Health and fence move together: a change of one republishes the other.
    let set_health = |ok: bool| {
        if health.send_if_modified(|h| std::mem::replace(h, ok) != ok) {
            renewer.publish_fence(&lock(scopes));
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream: Option<Stream> = None;
    loop {
        // Between rounds the open stream is watched too: memory-service answers only our
        // requests, so its end (memory-service stopped, crashed or restarted) is the loss signal,
        // seen at once instead of at the next tick.
        let idle = stream.is_none();
        let ended = async {
            match stream.as_mut() {
                Some((_, replies)) => !matches!(next_reply(replies, &reclaims).await, Ok(Some(_))),
                None => std::future::pending().await,
            }
        };
        let lost = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => false,
            ended = ended => ended,
            // No stream yet and a new scope: open it now (the round renews early, harmlessly).
            () = kick.notified(), if idle => false,
            // A new offer goes out with a round now: an offer withdrawn late could see a lease
            // in use again revoked.
            changed = offered.changed() => { if changed.is_err() { return; } false }
        };
        if lost {
            warn!("keep-alive stream to memory-service ended; renewing again shortly");
            stream = None;
            set_health(false);
            ticker.reset_after(RETRY.min(interval));
            continue;
        }
        let snapshot: Vec<(String, u64)> = lock(scopes).iter().map(|(s, e)| (s.clone(), e.epoch)).collect();
        if snapshot.is_empty() {
            continue;
        }
        let ok = tokio::select! {
            () = shutdown.cancelled() => return,
            ok = renew_all(&client, &mut stream, &snapshot, &renewer, &reclaims) => ok,
        };
        if !ok {
            stream = None; // reconnect at the next round, sooner than a full interval
            ticker.reset_after(RETRY.min(interval));
        }
        set_health(ok);
    }
}

/// One renewal round; false if memory-service could not be reached.
async fn renew_all(
    client: &MemoryClient,
    stream: &mut Option<Stream>,
    snapshot: &[(String, u64)],
    renewer: &Renewer,
    reclaims: &mpsc::Sender<ReclaimRequest>,
) -> bool {
    if stream.is_none() {
        let (tx, rx) = mpsc::channel(4);
        let opened = tokio::time::timeout(
            client.timeout,
            client.raw().keep_alive({
                let mut request = tonic::Request::new(ReceiverStream::new(rx));
                client.authorize(&mut request);
                request
            }),
        )
        .await;
        match opened {
            Ok(Ok(replies)) => *stream = Some((tx, replies.into_inner())),
            Ok(Err(status)) => {
                let code = serving::observe::code_name(status.code());
                warn!(code, message = status.message(), "cannot open keep-alive stream");
                return false;
            }
            Err(_) => {
                warn!("memory-service did not answer the keep-alive stream in time");
                return false;
            }
        }
    }
    let Some((tx, replies)) = stream.as_mut() else { return false };
    // Every round restates the offer (it replaces the last, and a new stream starts with none).
    let offer = renewer.offered.borrow().clone();
    let mut reclaimable = Some(ReclaimableSet { lease_ids: offer });
    for chunk in snapshot.chunks(SCOPES_PER_MESSAGE) {
        let request = KeepAliveRequest {
            lease_ids: vec![],
            scope_ids: chunk.iter().map(|(s, _)| s.clone()).collect(),
            reclaimable: reclaimable.take(),
        };
        // Before the send: the renewal counts from no later than memory-service received it.
        let sent = Instant::now();
        if tx.send(request).await.is_err() {
            return false;
        }
        let reply = match tokio::time::timeout(client.timeout, next_reply(replies, reclaims)).await {
            Ok(Ok(Some(reply))) => reply,
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                warn!("keep-alive stream to memory-service broke; reconnecting");
                return false;
            }
        };
        let mut scopes = lock(&renewer.scopes);
        for (scope, epoch) in chunk {
            let dead = reply.server_epoch != *epoch || reply.not_found.contains(scope);
            if dead && let Some(entry) = scopes.remove(scope) {
                warn!(%scope, "memory leases lost");
                entry.lost.cancel();
            } else if let Some(entry) = scopes.get_mut(scope) {
                entry.confirmed = entry.confirmed.max(sent);
            }
        }
        renewer.publish_fence(&scopes);
        debug!(renewed = reply.renewed.len(), "renewed leases");
    }
    true
}

/// The next answer to a request of ours on the keep-alive stream. memory-service may also send
/// unsolicited messages carrying a ReclaimRequest (`reclaim`), which answer no request: taken
/// for a renewal's answer, one would move the fence on a renewal memory-service never
/// confirmed, and pair every later answer with the wrong request. They go to the device loop
/// (`reclaims`), which gives the slabs back.
async fn next_reply<S>(
    replies: &mut S,
    reclaims: &mpsc::Sender<ReclaimRequest>,
) -> Result<Option<KeepAliveResponse>, tonic::Status>
where
    S: tokio_stream::Stream<Item = Result<KeepAliveResponse, tonic::Status>> + Unpin,
{
    use tokio_stream::StreamExt;
    loop {
        match replies.next().await {
            Some(Ok(KeepAliveResponse { reclaim: Some(request), .. })) => {
                debug!(pool = %request.pool, leases = request.lease_ids.len(), "memory-service asks for cache back");
                if reclaims.try_send(request).is_err() {
                    warn!("a reclaim request was dropped: the device has not read the earlier ones");
                }
            }
            other => return other.transpose(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::memory::v1::ReclaimRequest;

    use super::*;

    #[tokio::test]
    async fn an_unsolicited_reclaim_request_is_not_taken_for_an_answer() {
        let unsolicited = || KeepAliveResponse {
            reclaim: Some(ReclaimRequest::default()),
            server_epoch: 7,
            ..Default::default()
        };
        let answer =
            KeepAliveResponse { not_found: vec!["gen-1".into()], server_epoch: 7, ..Default::default() };
        let (tx, mut device) = mpsc::channel(4);
        let mut replies = tokio_stream::iter([Ok(unsolicited()), Ok(unsolicited()), Ok(answer.clone())]);
        assert_eq!(next_reply(&mut replies, &tx).await.unwrap(), Some(answer));
        assert_eq!(next_reply(&mut replies, &tx).await.unwrap(), None, "the stream ended");
        let mut replies = tokio_stream::iter([Ok(unsolicited()), Err(tonic::Status::unavailable("gone"))]);
        assert_eq!(next_reply(&mut replies, &tx).await.unwrap_err().code(), tonic::Code::Unavailable);
        // Each request went to the device instead.
        for _ in 0..3 {
            assert_eq!(device.try_recv().ok(), Some(ReclaimRequest::default()));
        }
    }
}
