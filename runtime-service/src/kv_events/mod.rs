//! One model's prefix-cache events, numbered and kept for subscribers: routers that route by
//! which engine holds which prefix (the Shepherd Model Gateway's cache-aware policy, llm-d's
//! precise-prefix scorer, Dynamo's KV router) follow them, resume after a reconnect from the
//! last number they saw, and are told when that is no longer possible, never left with a gap.
//!
//! The device loop publishes each step's events as one batch. The hub keeps the latest batches
//! (the replay buffer) and a mirror of what is cached, so a subscriber starting from nothing gets
//! the current content first (one batch: cleared, then every cached block, parents first).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tokio_stream::{Stream, wrappers::WatchStream};

use crate::scheduler::{BlockHash, KvEvent};

mod stream;
mod watch_v1;

pub use self::{stream::BatchStream, watch_v1::convert as v1_batch};

/// Subscriptions open at once per runtime, both front doors together: each holds a replay
/// backlog while it drains.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One open subscription's place among [`MAX_SUBSCRIBERS`]; given back when dropped.
#[derive(Debug)]
pub struct SubscriberSlot(Arc<AtomicUsize>);

impl SubscriberSlot {
    /// A place among those counted by `open`; `None` if all are taken.
    pub fn take(open: &Arc<AtomicUsize>) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_SUBSCRIBERS).then_some(n + 1))
            .ok()?;
        Some(SubscriberSlot(open.clone()))
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A numbered batch of events: one device step's changes, or a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct KvBatch {
    /// Strictly increasing, without gaps, for the life of the process.
    pub sequence: u64,
    /// Seconds since the Unix epoch when it was published.
    pub timestamp: f64,
    /// The changes, in order.
    pub events: Vec<KvEvent>,
}

/// Why a subscription could not start where it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Batches after `after` are no longer all kept (or were another life's numbers).
    #[error(
        "KV event batches after {after} are no longer kept (the oldest kept is {oldest}, the latest \
         {latest}): subscribe from 0 to get the current cache content, then follow from there"
    )]
    TooOld { after: u64, oldest: u64, latest: u64 },
    /// `after` was never published (the latest is `latest`).
    #[error("KV event batch {after} was never published (the latest is {latest}); subscribe from 0")]
    Ahead { after: u64, latest: u64 },
}

/// A cached block as the mirror knows it: when it was stored (its place in the snapshot), its
/// parent and its tokens.
#[derive(Debug)]
struct Mirrored {
    order: u64,
    parent: Option<BlockHash>,
    ids: Box<[u32]>,
}

#[derive(Debug)]
struct State {
    /// The next batch's number.
    next: u64,
    retained: VecDeque<Arc<KvBatch>>,
    /// What is cached now, after the last batch.
    cached: HashMap<BlockHash, Mirrored>,
    order: BTreeMap<u64, BlockHash>,
    inserted: u64,
}

/// One model's KV event hub.
#[derive(Debug)]
pub struct KvEventHub {
    state: Mutex<State>,
    /// The latest published number, for subscribers to wait on.
    latest: watch::Sender<u64>,
    capacity: usize,
    block_tokens: u32,
}

impl KvEventHub {
    /// A hub keeping the latest `capacity` batches (at least 1), for blocks of `block_tokens`.
    /// Numbers start from the wall clock in microseconds: a restarted runtime never reuses a
    /// number its previous life published, so a subscriber resuming from one is told it is
    /// gone instead of silently skipping the new life's batches as duplicates.
    pub fn new(capacity: usize, block_tokens: u32) -> Self {
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64).max(1);
        KvEventHub {
            state: Mutex::new(State {
                next: start,
                retained: VecDeque::new(),
                cached: HashMap::new(),
                order: BTreeMap::new(),
                inserted: 0,
            }),
            latest: watch::Sender::new(start - 1),
            capacity: capacity.max(1),
            block_tokens,
        }
    }

    /// Tokens per block, as the events' blocks carry them.
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// Publishes one step's events as the next batch.
    pub fn publish(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for event in &events {
            state.apply(event);
        }
        let sequence = state.next;
        state.next += 1;
        state.retained.push_back(Arc::new(KvBatch { sequence, timestamp: now(), events }));
        while state.retained.len() > self.capacity {
            state.retained.pop_front();
        }
        drop(state);
        self.latest.send_replace(sequence);
    }

    /// Batches from `start` on: with 0, one snapshot of the current content (numbered as the
    /// latest batch) and every batch after it; otherwise every batch numbered `start` or later
    /// (a router resumes from the last number it saw and skips the one it has).
    pub fn subscribe(self: &Arc<Self>, start: u64) -> Result<KvSubscription, ResumeError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = state.next - 1;
        let first = state.retained.front().map_or(state.next, |b| b.sequence);
        let backlog: VecDeque<Arc<KvBatch>> = if start == 0 {
            VecDeque::from([Arc::new(state.snapshot(latest))])
        } else if start > latest + 1 {
            return Err(ResumeError::Ahead { after: start, latest });
        } else if start < first - 1 {
            return Err(ResumeError::TooOld { after: start, oldest: first, latest });
        } else {
            state.retained.iter().filter(|b| b.sequence >= start).cloned().collect()
        };
        let next = latest + 1;
        drop(state);
        Ok(KvSubscription {
            hub: self.clone(),
            backlog,
            next,
            changes: WatchStream::new(self.latest.subscribe()),
        })
    }

    /// Batches numbered `next` or later still kept; `Err` if `next` is no longer kept.
    fn since(&self, next: u64) -> Result<Vec<Arc<KvBatch>>, ResumeError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let first = state.retained.front().map_or(state.next, |b| b.sequence);
        if next < first {
            return Err(ResumeError::TooOld { after: next - 1, oldest: first, latest: state.next - 1 });
        }
        Ok(state.retained.iter().filter(|b| b.sequence >= next).cloned().collect())
    }
}

impl State {
    fn apply(&mut self, event: &KvEvent) {
        match event {
            KvEvent::Stored { hash, parent, ids } => {
                self.inserted += 1;
                let block = Mirrored { order: self.inserted, parent: *parent, ids: ids.clone() };
                if let Some(old) = self.cached.insert(*hash, block) {
                    self.order.remove(&old.order);
                }
                self.order.insert(self.inserted, *hash);
            }
            KvEvent::Removed(hashes) => {
                for hash in hashes {
                    if let Some(gone) = self.cached.remove(hash) {
                        self.order.remove(&gone.order);
                    }
                }
            }
            KvEvent::Cleared => {
                self.cached.clear();
                self.order.clear();
            }
        }
    }

    /// The current content as one batch: cleared, then each cached block in the order it was
    /// stored (a block's parent was stored before it).
    fn snapshot(&self, sequence: u64) -> KvBatch {
        let mut events = Vec::with_capacity(self.cached.len() + 1);
        events.push(KvEvent::Cleared);
        for hash in self.order.values() {
            let block = &self.cached[hash];
            events.push(KvEvent::Stored { hash: *hash, parent: block.parent, ids: block.ids.clone() });
        }
        KvBatch { sequence, timestamp: now(), events }
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A subscriber's batches: its backlog, then each batch as it is published. Ends with an error
/// if it falls so far behind that batches it has not read are no longer kept.
pub struct KvSubscription {
    hub: Arc<KvEventHub>,
    backlog: VecDeque<Arc<KvBatch>>,
    /// The number of the next live batch to read.
    next: u64,
    changes: WatchStream<u64>,
}

impl std::fmt::Debug for KvSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSubscription")
            .field("backlog", &self.backlog.len())
            .field("next", &self.next)
            .finish()
    }
}

impl Stream for KvSubscription {
    type Item = Result<Arc<KvBatch>, ResumeError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(batch) = self.backlog.pop_front() {
                return Poll::Ready(Some(Ok(batch)));
            }
            match Pin::new(&mut self.changes).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(latest)) if latest < self.next => continue,
                Poll::Ready(Some(_)) => {}
            }
            match self.hub.since(self.next) {
                Ok(batches) => {
                    if let Some(last) = batches.last() {
                        self.next = last.sequence + 1;
                    }
                    self.backlog.extend(batches);
                }
                Err(err) => return Poll::Ready(Some(Err(err))),
            }
        }
    }
}

#[cfg(test)]
mod tests;
