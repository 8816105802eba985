//! The queue of Allocate calls waiting for room, in arrival order.

use std::collections::VecDeque;

use tokio::sync::oneshot;

use super::{Error, Grant, PoolId, Resolved};

/// An Allocate call parked until its items fit. The ledger grants it by sending on `reply`; the
/// waiting call owns the receiving end (see `WaitGuard` in the service layer).
#[derive(Debug)]
pub struct Waiter {
    /// Arrival number, unique per ledger.
    pub ticket: u64,
    /// What it asks for, pools resolved.
    pub request: Resolved,
    /// Where the grant goes.
    pub reply: oneshot::Sender<Result<Grant, Error>>,
}

/// Waiters in arrival order. A `VecDeque` scanned linearly: waiters are few (bounded by
/// concurrent calls), and a scan in arrival order is exactly what per-pool FIFO needs.
#[derive(Debug, Default)]
pub struct WaitQueue {
    queue: VecDeque<Waiter>,
    next_ticket: u64,
}

impl WaitQueue {
    /// Appends a waiter and returns its ticket.
    pub fn push(&mut self, request: Resolved, reply: oneshot::Sender<Result<Grant, Error>>) -> u64 {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.queue.push_back(Waiter { ticket, request, reply });
        ticket
    }

    /// Removes the waiter with `ticket`, if it is still queued.
    pub fn remove(&mut self, ticket: u64) -> Option<Waiter> {
        let index = self.queue.iter().position(|w| w.ticket == ticket)?;
        self.queue.remove(index)
    }

    /// Removes the waiter at `index` (as seen through [`WaitQueue::get`]).
    pub fn remove_at(&mut self, index: usize) -> Option<Waiter> {
        self.queue.remove(index)
    }

    /// The waiter at `index`, in arrival order.
    pub fn get(&self, index: usize) -> Option<&Waiter> {
        self.queue.get(index)
    }

    /// True if a waiter carries this idempotency key.
    pub fn has_key(&self, key: &str) -> bool {
        self.queue.iter().any(|w| w.request.key.as_deref() == Some(key))
    }

    /// Bytes that waiters ahead of `ticket` (every waiter, for `None`) ask of pool `pool`.
    pub fn ahead_of(&self, pool: PoolId, ticket: Option<u64>) -> u128 {
        self.queue
            .iter()
            .take_while(|w| ticket.is_none_or(|t| w.ticket < t))
            .flat_map(|w| w.request.demand.iter())
            .filter(|&&(p, _)| p == pool)
            .map(|&(_, bytes)| u128::from(bytes))
            .sum()
    }

    /// Takes every waiter out (shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = Waiter> + '_ {
        self.queue.drain(..)
    }

    /// Number of waiters.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if nobody waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
