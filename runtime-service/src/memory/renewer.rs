//! One keep-alive stream per runtime renews every scope it holds (model uniforms, activations,
//! kv-cache slabs), and keeps the local lease timer that fences the device.
//!
//! The fence is Chubby's client lease timer: a lease renewed by a call sent at `t` lives at
//! memory-service until at least `t + ttl` (the server's deadline runs from when it received
//! the call), so the runtime may use its memory until `t + ttl` less a margin, with no word
//! from memory-service and whatever failure detection costs. The device runs a step only if it
//! ends before the earliest such time over every scope it holds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use proto::memory::v1::{KeepAliveRequest, KeepAliveResponse, ReclaimRequest, ReclaimableSet};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{debug, warn};

use super::MemoryClient;

/// Cancelled when a scope's leases are gone (expired, or memory-service restarted).
pub type Lost = CancellationToken;

/// Delay before renewing again after the stream broke or a round failed.
const RETRY: Duration = Duration::from_secs(1);

/// Scopes per KeepAlive message (memory-service's limit).
const SCOPES_PER_MESSAGE: usize = 64;

/// Leases offered as reclaimable at most (memory-service's limit per message).
const MAX_OFFERED: usize = 1024;

/// ReclaimRequests waiting for the device: memory-service has at most one outstanding per pool
/// per stream, so this is never reached in practice; past it, a request is dropped (the leases
/// it names are then revoked at its deadline, as for a holder that does not answer).
const RECLAIM_QUEUE: usize = 64;

#[derive(Debug)]
struct Entry {
    /// Server epoch the leases were granted in.
    epoch: u64,
    lost: Lost,
    /// When the call that last granted or renewed the leases was sent: they live at least
    /// until this plus the TTL.
    confirmed: Instant,
}

/// Until when the device may use the memory it holds: `None` while memory-service does not
/// answer (the memory is in doubt, no step runs).
pub type Fence = watch::Receiver<Option<Instant>>;

/// How far before a lease's earliest possible expiry the fence closes: a tenth of the TTL,
/// for clocks that run at slightly different rates on the two hosts and for the step that
/// ends right at the fence.
fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(1))
}

/// With no scope held, nothing is fenced: far enough ahead never to matter, near enough not to
/// overflow an `Instant`.
const UNFENCED: Duration = Duration::from_secs(86_400 * 365);

/// Renews registered scopes every `interval` over one KeepAlive stream, and reports whether
/// memory-service answered the last round. Scopes it finds dead are reported through their
/// [`Lost`] token and forgotten.
#[derive(Debug, Clone)]
pub struct Renewer {
    scopes: Arc<Mutex<HashMap<String, Entry>>>,
    healthy: watch::Receiver<bool>,
    /// Wakes the task when a scope is registered while no stream is open, so the stream (and
    /// with it the loss signal) exists as soon as there is something to lose.
    kick: Arc<tokio::sync::Notify>,
    /// The server epoch as last learned: what this runtime knows of memory-service (its pools)
    /// is good only while it stays the same.
    seen: Arc<Mutex<Seen>>,
    /// The local lease timer (see the module docs).
    fence: Arc<watch::Sender<Option<Instant>>>,
    ttl: Duration,
    /// Leases held only as a cache, offered to memory-service as reclaimable (oldest first).
    offered: Arc<watch::Sender<Vec<String>>>,
    /// memory-service's requests for offered leases, for the device loop (taken once).
    reclaims: Arc<Mutex<Option<mpsc::Receiver<ReclaimRequest>>>>,
}

/// memory-service's epoch as this runtime learned it.
#[derive(Debug, Default)]
struct Seen {
    /// 0 before the first answer.
    epoch: u64,
    /// How many times it changed: an answer to a call sent before the latest change may come
    /// from the previous process (still draining), so it cannot change it back.
    changes: u64,
}

impl Seen {
    /// Takes in an answer with `epoch` to the call of `ticket`; false if it is not trusted (it
    /// may come from before the latest change).
    fn learn(&mut self, ticket: EpochTicket, epoch: u64) -> bool {
        if self.epoch == epoch {
            return true;
        }
        if ticket.0 != self.changes {
            return false;
        }
        self.epoch = epoch;
        self.changes += 1;
        true
    }
}

/// Taken before a call whose answer carries an epoch, given back with that answer (see
/// [`Renewer::check_epoch`]).
#[derive(Debug, Clone, Copy)]
struct EpochTicket(u64);

impl Renewer {
    /// Starts the renewal task, renewing leases of `ttl` every third of it; it ends with
    /// `shutdown`.
    pub fn spawn(client: MemoryClient, ttl: Duration, shutdown: CancellationToken) -> Self {
        let scopes = Arc::new(Mutex::new(HashMap::new()));
        let (health_tx, healthy) = watch::channel(true);
        let kick = Arc::new(tokio::sync::Notify::new());
        let fence = Arc::new(watch::Sender::new(Some(Instant::now() + UNFENCED)));
        let (reclaim_tx, reclaim_rx) = mpsc::channel(RECLAIM_QUEUE);
        let renewer = Renewer {
            scopes,
            healthy,
            kick,
            seen: Arc::default(),
            fence,
            ttl,
            offered: Arc::new(watch::Sender::new(Vec::new())),
            reclaims: Arc::new(Mutex::new(Some(reclaim_rx))),
        };
        tokio::spawn(run(client, renewer.clone(), health_tx, reclaim_tx, shutdown));
        renewer
    }

    /// Offers `leases` (held only as a cache, oldest first) as reclaimable, replacing the last
    /// offer; sent at once on the keep-alive stream if it changed.
    pub fn offer(&self, mut leases: Vec<String>) {
        leases.truncate(MAX_OFFERED);
        self.offered.send_if_modified(|offered| {
            let changed = *offered != leases;
            *offered = leases;
            changed
        });
    }

    /// memory-service's requests for offered leases; `None` after the first call.
    pub fn take_reclaims(&self) -> Option<mpsc::Receiver<ReclaimRequest>> {
        lock(&self.reclaims).take()
    }

    /// Starts renewing `scope`, whose leases were granted in `epoch` by a call sent at `sent`.
    pub fn register(&self, scope: String, epoch: u64, sent: Instant) -> Lost {
        let lost = Lost::new();
        let mut scopes = lock(&self.scopes);
        scopes.insert(scope, Entry { epoch, lost: lost.clone(), confirmed: sent });
        self.publish_fence(&scopes);
        drop(scopes);
        self.kick.notify_one();
        lost
    }

    /// Stops renewing `scope`.
    pub fn unregister(&self, scope: &str) {
        let mut scopes = lock(&self.scopes);
        if scopes.remove(scope).is_some() {
            self.publish_fence(&scopes);
        }
    }

    /// Whether the device may run no step at `now`: the local lease timer ran out, or
    /// memory-service does not answer.
    pub fn is_fenced(&self, now: Instant) -> bool {
        self.fence.borrow().is_none_or(|until| until <= now)
    }

    /// The device's fence: until when it may use the memory it holds (see the module docs).
    pub fn fence(&self) -> Fence {
        self.fence.subscribe()
    }

    /// Publishes the fence for `scopes`: the earliest time one of their leases could expire,
    /// less the margin; closed while memory-service does not answer.
    fn publish_fence(&self, scopes: &HashMap<String, Entry>) {
        let until = if !*self.healthy.borrow() {
            None
        } else {
            let earliest = scopes.values().map(|e| e.confirmed).min();
            Some(earliest.map_or_else(|| Instant::now() + UNFENCED, |at| at + self.ttl - margin(self.ttl)))
        };
        self.fence.send_if_modified(|fence| std::mem::replace(fence, until) != until);
    }

    /// Sends `call`, whose answer carries memory-service's epoch (read by `epoch_of`), and
    /// learns that epoch (see `check_epoch`). Its ticket is taken first, before anything is
    /// sent: a call's future does nothing until awaited.
    pub async fn learn_epoch<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        epoch_of: impl FnOnce(&T) -> u64,
    ) -> Result<T, E> {
        let ticket = self.ticket();
        let answer = call.await?;
        self.check_epoch(ticket, epoch_of(&answer));
        Ok(answer)
    }

    /// A ticket for a call about to be sent, whose answer will carry an epoch.
    fn ticket(&self) -> EpochTicket {
        EpochTicket(lock(&self.seen).changes)
    }

    /// memory-service answered the call of `ticket` with `epoch`. A new epoch means it
    /// restarted and lost every lease: every scope granted in another epoch is gone, and its
    /// holder is told now, before anyone relies on it. An answer to a call sent before the
    /// epoch last changed is not trusted to change it again (the previous process may still be
    /// answering while it drains); the next call will tell.
    fn check_epoch(&self, ticket: EpochTicket, epoch: u64) {
        if !lock(&self.seen).learn(ticket, epoch) {
            return;
        }
        let mut scopes = lock(&self.scopes);
        scopes.retain(|scope, entry| {
            let alive = entry.epoch == epoch;
            if !alive {
                warn!(%scope, "memory leases lost: memory-service restarted");
                entry.lost.cancel();
            }
            alive
        });
        self.publish_fence(&scopes);
    }

    /// memory-service's epoch as last learned (0 before the first answer).
    pub fn epoch(&self) -> u64 {
        lock(&self.seen).epoch
    }

    /// Whether memory-service answered the last keep-alive round (and the stream is not broken).
    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    /// `true` while memory-service answers keep-alives; changes are observable.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Stream = (mpsc::Sender<KeepAliveRequest>, Streaming<KeepAliveResponse>);

async fn run(
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

    #[test]
    fn an_answer_sent_before_the_epoch_changed_cannot_change_it_back() {
        let mut seen = Seen::default();
        let before = EpochTicket(seen.changes);
        assert!(seen.learn(before, 7), "the first answer is the epoch");
        let old_call = EpochTicket(seen.changes);
        assert!(
            seen.learn(EpochTicket(seen.changes), 9),
            "a restart, seen by a call sent after the last change"
        );
        assert_eq!(seen.epoch, 9);
        // The previous process, still draining, answers a call sent before the restart was seen.
        assert!(!seen.learn(old_call, 7), "not trusted");
        assert!(!seen.learn(before, 7));
        assert_eq!(seen.epoch, 9);
        // Any call's answer in the current epoch agrees, whenever it was sent.
        assert!(seen.learn(old_call, 9));
        // A later restart is learned from a call sent after the last change.
        assert!(seen.learn(EpochTicket(seen.changes), 11));
        assert_eq!((seen.epoch, seen.changes), (11, 3));
    }
}
