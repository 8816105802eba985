//! The event feed: every state change gets a sequence number under the ledger lock, then fans
//! out through a broadcast ring that never blocks the publisher.

use std::{sync::Arc, time::SystemTime};

use tokio::sync::broadcast;

use super::lease::LeaseId;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A lease was granted.
    Allocated,
    /// A lease was freed (Free, FreeScope).
    Freed,
    /// A lease's TTL ran out.
    Expired,
    /// A pool was created.
    PoolCreated,
    /// An Allocate gave up waiting.
    WaitTimedOut,
    /// A lease was renewed.
    Renewed,
    /// An Allocate was refused at once.
    Rejected,
}

/// One state change, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Strictly increasing, from 1.
    pub sequence: u64,
    /// Wall-clock time of the change.
    pub time: SystemTime,
    /// What happened.
    pub kind: EventKind,
    /// Pool concerned.
    pub pool: Arc<str>,
    /// Lease concerned, for lease events.
    pub lease: Option<LeaseId>,
    /// Lease size, pool capacity (PoolCreated) or bytes asked (WaitTimedOut, Rejected).
    pub size: u64,
    /// Holder of the lease or call.
    pub holder: Option<Arc<str>>,
    /// Scope of the lease or call.
    pub scope: Option<Arc<str>>,
    /// The pool's used bytes after the change.
    pub pool_used: u64,
}

/// The fields of an event the ledger fills in; the bus adds sequence and time.
#[derive(Debug)]
pub struct Change<'a> {
    pub kind: EventKind,
    pub pool: &'a Arc<str>,
    pub lease: Option<LeaseId>,
    pub size: u64,
    pub holder: Option<&'a Arc<str>>,
    pub scope: Option<&'a Arc<str>>,
    pub pool_used: u64,
}

/// Sequences events and broadcasts them. A `broadcast` channel because it is a bounded ring: a
/// slow receiver loses the oldest events (and learns how many) instead of holding the publisher,
/// which runs under the ledger lock and must never wait.
#[derive(Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    last_sequence: u64,
}

impl EventBus {
    /// A bus whose slowest watcher may fall `capacity` events behind before it lags.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        EventBus { sender, last_sequence: 0 }
    }

    /// A new receiver, seeing events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }

    /// Sequences `change` and sends it to every watcher. With no watcher the number is still
    /// taken (so numbering is the same whoever watches) but nothing is built.
    pub fn publish(&mut self, change: Change<'_>) {
        self.last_sequence += 1;
        if self.sender.receiver_count() == 0 {
            return;
        }
        let event = Event {
            sequence: self.last_sequence,
            time: SystemTime::now(),
            kind: change.kind,
            pool: change.pool.clone(),
            lease: change.lease,
            size: change.size,
            holder: change.holder.cloned(),
            scope: change.scope.cloned(),
            pool_used: change.pool_used,
        };
        // An error only means every receiver left between the check and the send.
        let _ = self.sender.send(Arc::new(event));
    }
}
