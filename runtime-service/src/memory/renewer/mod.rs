//! One keep-alive stream per runtime renews every scope it holds (model uniforms, activations,
//! kv-cache slabs), and keeps the local lease timer that fences the device.
//!
//! The fence is Chubby's client lease timer: a lease renewed by a call sent at `t` lives at
//! memory-service until at least `t + ttl` (the server's deadline runs from when it received
//! the call), so the runtime may use its memory until `t + ttl` less a margin, with no word
//! from memory-service and whatever failure detection costs. The device runs a step only if it
//! ends before the earliest such time over every scope it holds.

mod keep_alive;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use proto::memory::v1::ReclaimRequest;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::MemoryClient;

/// Cancelled when a scope's leases are gone (expired, or memory-service restarted).
pub type Lost = CancellationToken;

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
        tokio::spawn(keep_alive::run(client, renewer.clone(), health_tx, reclaim_tx, shutdown));
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

#[cfg(test)]
mod tests {
    use super::*;

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
