//! The event feed: every state change becomes an event with a sequence number under the ledger
//! lock, is retained for watchers that resume, and fans out through a broadcast ring that never
//! blocks the publisher.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio::sync::broadcast;

use super::{
    lease::{Lease, LeaseId},
    pool_account::Pool,
};

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
    /// A lease's holder was asked to give it back (ReclaimRequest).
    ReclaimRequested,
    /// A lease asked back was not given back in time, and was revoked.
    Revoked,
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

impl<'a> Change<'a> {
    /// A change to `lease`, drawn from `pool`, with the pool's use after it.
    pub fn of_lease(kind: EventKind, pool: &'a Pool, lease: &'a Lease) -> Self {
        Change {
            kind,
            pool: pool.name(),
            lease: Some(lease.id),
            size: lease.size,
            holder: Some(&lease.holder),
            scope: lease.scope.as_ref(),
            pool_used: pool.used(),
        }
    }
}

/// Sequences events, keeps the latest for watchers that resume, and broadcasts them. A
/// `broadcast` channel because it is a bounded ring: a slow receiver loses the oldest events (and
/// learns how many) instead of holding the publisher, which runs under the ledger lock and must
/// never wait.
///
/// With a store, an event is held back until the commit that carries its change is on disk, as
/// etcd emits only committed revisions: a watcher never sees a grant or a `pool_used` that a
/// crash could take back. Held events are numbered when a batch takes them
/// ([`EventBus::number_held`]), written with that batch, and released once it is on disk
/// ([`EventBus::release`]); a batch that fails gives its numbers back ([`EventBus::unnumber`]).
/// So the numbers watchers see are gapless, the store keeps the latest events, and after a
/// restart numbering goes on and a watcher resumes from the stored tail.
#[derive(Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    /// The latest sequence number released to watchers.
    last_sequence: u64,
    /// The latest events, oldest first, at most `capacity`: what a resuming watcher can replay.
    retained: VecDeque<Arc<Event>>,
    capacity: usize,
    /// Set with a store: events wait for the commit of their change.
    held: Option<Held>,
}

/// Events waiting for the commit of their change.
#[derive(Debug)]
struct Held {
    /// The ledger's change counter (see `Ledger::track_changes`): an event is a change of its
    /// own, numbered after the state change it reports.
    changes: Arc<AtomicU64>,
    /// (change number, event), in change order; `event.sequence` is 0 until a batch numbers it.
    pending: VecDeque<(u64, Arc<Event>)>,
    /// The latest sequence number given to a held event (at least `last_sequence`).
    numbered: u64,
}

/// What a new watcher starts with: the retained events it asked to replay, and a receiver of
/// the events released after them.
pub type Subscription = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// Why a watcher cannot resume where it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeGap {
    /// The sequence asked for has not been reached.
    Ahead { latest: u64 },
    /// Events after the sequence asked for are no longer retained.
    Gone { oldest: u64, latest: u64 },
}

impl EventBus {
    /// A bus whose slowest watcher may fall `capacity` events behind before it lags, and that
    /// retains as many for watchers that resume.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (sender, _) = broadcast::channel(capacity);
        EventBus { sender, last_sequence: 0, retained: VecDeque::new(), capacity, held: None }
    }

    /// Holds every event until [`EventBus::release`] says its change (numbered by `changes`)
    /// is durable.
    pub fn hold_until_durable(&mut self, changes: Arc<AtomicU64>) {
        self.held = Some(Held { changes, pending: VecDeque::new(), numbered: self.last_sequence });
    }

    /// Numbering goes on after `sequence`, and `tail` (the stored latest events, oldest first)
    /// is retained for watchers that resume: a restore.
    pub fn continue_after(&mut self, sequence: u64, tail: Vec<Event>) {
        let last = tail.last().map_or(0, |e| e.sequence);
        self.last_sequence = self.last_sequence.max(sequence).max(last);
        let skip = tail.len().saturating_sub(self.capacity);
        self.retained = tail.into_iter().skip(skip).map(Arc::new).collect();
        if let Some(held) = &mut self.held {
            held.numbered = held.numbered.max(self.last_sequence);
        }
    }

    /// How many events are retained, and so kept by the store.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Numbers every held event not numbered yet, and returns every numbered held event (the
    /// ones a failed batch carried too) and the latest number: what a batch writes, and what
    /// its commit releases.
    pub fn number_held(&mut self) -> (Vec<Arc<Event>>, u64) {
        let Some(held) = &mut self.held else { return (Vec::new(), self.last_sequence) };
        for (_, event) in held.pending.iter_mut() {
            if event.sequence == 0 {
                held.numbered += 1;
                Arc::make_mut(event).sequence = held.numbered;
            }
        }
        (held.pending.iter().map(|(_, e)| e.clone()).collect(), held.numbered)
    }

    /// A batch's commit failed: its events' numbers are given back, so an event withdrawn
    /// meanwhile leaves no gap.
    pub fn unnumber(&mut self) {
        if let Some(held) = &mut self.held {
            for (_, event) in held.pending.iter_mut() {
                Arc::make_mut(event).sequence = 0;
            }
            held.numbered = self.last_sequence;
        }
    }

    /// A new receiver, seeing events released from now on, and the retained events after
    /// `after` (none for `None`). Under the ledger lock, so nothing falls between the two.
    pub fn subscribe(&self, after: Option<u64>) -> Result<Subscription, ResumeGap> {
        let receiver = self.sender.subscribe();
        let Some(after) = after else { return Ok((Vec::new(), receiver)) };
        let latest = self.last_sequence;
        if after > latest {
            return Err(ResumeGap::Ahead { latest });
        }
        let oldest = self.retained.front().map_or(latest + 1, |e| e.sequence);
        if after + 1 < oldest {
            return Err(ResumeGap::Gone { oldest, latest });
        }
        let skip = (after + 1 - oldest) as usize;
        Ok((self.retained.iter().skip(skip).cloned().collect(), receiver))
    }

    /// Records `change`: sent at once in memory, held until its commit with a store.
    pub fn publish(&mut self, change: Change<'_>) {
        let event = Event {
            sequence: 0,
            time: SystemTime::now(),
            kind: change.kind,
            pool: change.pool.clone(),
            lease: change.lease,
            size: change.size,
            holder: change.holder.cloned(),
            scope: change.scope.cloned(),
            pool_used: change.pool_used,
        };
        match &mut self.held {
            Some(held) => {
                // Only ever written under the ledger's lock (see `Ledger::bump`).
                let seq = held.changes.load(Ordering::Relaxed) + 1;
                held.changes.store(seq, Ordering::Release);
                held.pending.push_back((seq, Arc::new(event)));
            }
            None => {
                let mut event = event;
                self.last_sequence += 1;
                event.sequence = self.last_sequence;
                self.send(Arc::new(event));
            }
        }
    }

    /// Sends every held event numbered up to `through`: a batch carrying them is on disk.
    pub fn release(&mut self, through: u64) {
        while let Some(held) = &mut self.held
            && held.pending.front().is_some_and(|(_, e)| e.sequence != 0 && e.sequence <= through)
        {
            let Some((_, event)) = held.pending.pop_front() else { break };
            self.last_sequence = event.sequence;
            self.send(event);
        }
    }

    /// Drops the held events of `lease` if its grant was never numbered into a batch (its
    /// commit failed, or its caller left before a batch took it): watchers never hear of a
    /// lease that was not kept. A grant a batch already carries stays: if that batch is on
    /// disk, so was the grant. Returns whether they were dropped.
    pub fn withdraw(&mut self, lease: LeaseId) -> bool {
        let Some(held) = &mut self.held else { return false };
        let unnumbered = held
            .pending
            .iter()
            .any(|(_, e)| e.lease == Some(lease) && e.kind == EventKind::Allocated && e.sequence == 0);
        if unnumbered {
            held.pending.retain(|(_, e)| e.lease != Some(lease));
        }
        unnumbered
    }

    fn send(&mut self, event: Arc<Event>) {
        if self.retained.len() == self.capacity {
            self.retained.pop_front();
        }
        self.retained.push_back(event.clone());
        if self.sender.receiver_count() > 0 {
            // An error only means every receiver left between the check and the send.
            let _ = self.sender.send(event);
        }
    }
}
