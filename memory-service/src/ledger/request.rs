//! The requests and answers of the ledger's allocation API.

use std::{sync::Arc, time::Duration};

use tokio::sync::oneshot;

use super::{Error, Lease, LeaseId, PoolId};

/// (pool, bytes) pairs.
pub(super) type PoolBytes = Vec<(PoolId, u64)>;

/// An Allocate call as the ledger sees it: validated, pools still named.
#[derive(Debug, Clone)]
pub struct AllocRequest {
    /// (pool name, bytes) per lease wanted, in order.
    pub items: Vec<(String, u64)>,
    /// Holder name.
    pub holder: Arc<str>,
    /// Scope, if any.
    pub scope: Option<Arc<str>>,
    /// TTL of the leases.
    pub ttl: Duration,
    /// Idempotency key, if any.
    pub request_id: Option<Arc<str>>,
}

/// A request with its pools resolved and its demand summed per pool.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub(super) items: Vec<(PoolId, u64)>,
    /// Bytes per distinct pool, in order of first mention.
    pub(super) demand: Vec<(PoolId, u64)>,
    pub(super) holder: Arc<str>,
    pub(super) scope: Option<Arc<str>>,
    pub(super) ttl: Duration,
    /// `holder` + request id: idempotency keys are per holder, so two holders cannot collide.
    pub(super) key: Option<Arc<str>>,
}

/// Leases granted by one Allocate, in request order.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The leases.
    pub leases: Vec<Lease>,
    /// True if an earlier call with the same request id granted them.
    pub replayed: bool,
}

/// The outcome of [`Ledger::allocate`] that is not an error.
#[derive(Debug)]
pub enum AllocateOutcome {
    /// Granted now.
    Granted(Grant),
    /// Queued: the grant arrives on `grant`, unless the caller abandons the wait first.
    Queued {
        /// Identifies the waiter for [`Ledger::abandon_wait`].
        ticket: u64,
        /// Receives the grant, or why it can no longer be granted (a lease bound was reached
        /// while it waited).
        grant: oneshot::Receiver<Result<Grant, Error>>,
    },
}

/// How one pool stands against a request (CanAllocate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFit {
    /// The pool.
    pub pool: Arc<str>,
    /// Bytes the request asks of it.
    pub requested: u64,
    /// Bytes available now.
    pub available: u64,
    /// Capacity.
    pub capacity: u64,
    /// Calls queued on it.
    pub waiters: u64,
    /// Bytes of its leases offered as reclaimable.
    pub reclaimable: u64,
}

/// Answer of [`Ledger::can_allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feasibility {
    /// An Allocate would be granted without waiting.
    pub now: bool,
    /// Every pool is large enough to ever hold the request.
    pub fits_capacity: bool,
    /// One entry per distinct pool.
    pub pools: Vec<PoolFit>,
}

/// What an Allocate granted under an idempotency key, so a retry gets the same leases.
#[derive(Debug)]
pub(super) struct Replay {
    pub(super) items: Vec<(PoolId, u64)>,
    pub(super) scope: Option<Arc<str>>,
    pub(super) ttl: Duration,
    pub(super) leases: Vec<LeaseId>,
}
