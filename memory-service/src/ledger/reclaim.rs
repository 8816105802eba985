//! Reclaimable leases: the books of what each KeepAlive stream offers as a cache (marks, offers,
//! open asks) and the types the service layer sees of them.
//!
//! Offers are soft state of a stream, never stored: a holder that restarts, or whose stream
//! breaks, offers nothing until it says so again, and its leases stay held meanwhile. This file
//! holds that state and its types; the ledger's operations on offers are in `offers`, and asking
//! for offered leases back, and revoking those not given back in time, is in `reclaim_ask`.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{LeaseId, LeaseMap, LeaseSet, PoolId};

/// Most leases one stream may offer: as many as one KeepAlive message may name, so a whole set
/// always fits in one message.
pub const MAX_OFFERED: usize = 1024;

/// How long a holder has to answer a ReclaimRequest unless configured otherwise.
pub const DEFAULT_RECLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// Identifies a KeepAlive stream that offers leases.
pub type StreamId = u64;
/// Identifies one ReclaimRequest.
pub type ReclaimId = u64;

/// An offered lease.
#[derive(Debug)]
pub(super) struct Mark {
    /// The stream that offers it (and hears the ask).
    pub(super) stream: StreamId,
    /// When it was offered, as a ledger-wide counter: the earliest offered is asked first.
    pub(super) order: u64,
    /// The ask that names it, if it was asked back.
    pub(super) asked: Option<ReclaimId>,
}

/// One stream's offer.
#[derive(Debug)]
pub(super) struct Offer {
    /// The leases it offers, at most [`MAX_OFFERED`].
    pub(super) leases: LeaseSet,
    /// Asks not yet sent on the stream, oldest first; at most one per open ask of this stream,
    /// so at most [`MAX_OFFERED`].
    pub(super) outbox: VecDeque<ReclaimId>,
    /// Wakes the stream's task when the outbox fills: the ledger never waits on a stream.
    wake: Arc<Notify>,
}

/// One ReclaimRequest still open: some lease it names is still held, offered and not revoked.
#[derive(Debug)]
pub(super) struct Ask {
    pub(super) pool: PoolId,
    pub(super) stream: StreamId,
    /// The leases still asked for, earliest offered first.
    pub(super) leases: Vec<LeaseId>,
    /// Bytes of the waiters' shortfall they were picked to cover.
    pub(super) needed: u64,
    pub(super) asked_at: Instant,
    pub(super) deadline: Instant,
}

/// The ledger's reclaim state. Every lease is offered by at most one stream and named by at
/// most one open ask, so marks bound everything else here (see `check_reclaim`).
#[derive(Debug)]
pub(super) struct Reclaim {
    pub(super) marks: LeaseMap<Mark>,
    pub(super) offers: HashMap<StreamId, Offer>,
    /// Per pool, the offered leases not asked for, by (order, id): the next to ask is first.
    pub(super) idle: Vec<BTreeSet<(u64, LeaseId)>>,
    pub(super) asks: HashMap<ReclaimId, Ask>,
    /// Open asks by deadline, so revocation touches only what is due (like expiry).
    pub(super) deadlines: BTreeSet<(Instant, ReclaimId)>,
    next_order: u64,
    next_stream: StreamId,
    pub(super) next_ask: ReclaimId,
    pub(super) timeout: Duration,
}

impl Default for Reclaim {
    fn default() -> Self {
        Reclaim {
            marks: LeaseMap::default(),
            offers: HashMap::new(),
            idle: Vec::new(),
            asks: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_order: 0,
            next_stream: 0,
            next_ask: 0,
            timeout: DEFAULT_RECLAIM_TIMEOUT,
        }
    }
}

impl Reclaim {
    /// The idle set of pool `p`, grown on first use (pools are created at any time).
    pub(super) fn idle_mut(&mut self, p: PoolId) -> &mut BTreeSet<(u64, LeaseId)> {
        if self.idle.len() <= p {
            self.idle.resize_with(p + 1, BTreeSet::new);
        }
        &mut self.idle[p]
    }

    /// Takes `id` out of ask `rid`; an ask left with no lease is closed.
    pub(super) fn leave_ask(&mut self, rid: ReclaimId, id: LeaseId) {
        let Some(ask) = self.asks.get_mut(&rid) else { return };
        ask.leases.retain(|&l| l != id);
        if ask.leases.is_empty() {
            let (deadline, stream) = (ask.deadline, ask.stream);
            self.asks.remove(&rid);
            self.deadlines.remove(&(deadline, rid));
            // Not sent yet: nothing left to ask for, so nothing to send.
            if let Some(offer) = self.offers.get_mut(&stream) {
                offer.outbox.retain(|&r| r != rid);
            }
        }
    }

    /// Registers a new stream, offering nothing yet.
    pub(super) fn open(&mut self) -> OfferHandle {
        self.next_stream += 1;
        let id = self.next_stream;
        let wake = Arc::new(Notify::new());
        let offer = Offer { leases: LeaseSet::default(), outbox: VecDeque::new(), wake: wake.clone() };
        self.offers.insert(id, offer);
        OfferHandle { id, wake }
    }

    /// Adds lease `id` of pool `p` (offered by no stream) to `stream`'s offer, last in order.
    /// False if `stream` offers nothing any more.
    pub(super) fn mark(&mut self, stream: StreamId, id: LeaseId, p: PoolId) -> bool {
        let Some(offer) = self.offers.get_mut(&stream) else { return false };
        offer.leases.insert(id);
        self.next_order += 1;
        let order = self.next_order;
        self.marks.insert(id, Mark { stream, order, asked: None });
        self.idle_mut(p).insert((order, id));
        true
    }

    /// Queues ask `rid` on `stream` and wakes its task.
    pub(super) fn post(&mut self, stream: StreamId, rid: ReclaimId) {
        if let Some(offer) = self.offers.get_mut(&stream) {
            offer.outbox.push_back(rid);
            offer.wake.notify_one();
        }
    }
}

/// A ReclaimRequest to send on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimNotice {
    /// The ask's id.
    pub id: ReclaimId,
    /// The pool.
    pub pool: Arc<str>,
    /// The leases still asked for, earliest offered first.
    pub leases: Vec<LeaseId>,
    /// Their total size.
    pub bytes: u64,
    /// Bytes of the shortfall they cover (at most `bytes`).
    pub needed: u64,
    /// Time left before they are revoked.
    pub within: Duration,
}

/// What a new reclaimable set left offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    /// Leases the stream offers now.
    pub offered: usize,
    /// Ids in the set that name no live lease (ignored), each once.
    pub not_found: Vec<LeaseId>,
}

/// A stream's way to hear its asks: its id, and the notification that says some are waiting.
#[derive(Debug, Clone)]
pub struct OfferHandle {
    /// The stream's id in the ledger.
    pub id: StreamId,
    /// Notified when asks wait in the stream's outbox ([`Ledger::take_notices`](super::Ledger::take_notices)).
    pub wake: Arc<Notify>,
}
