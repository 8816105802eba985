//! The seed's TaskExecutor: a bound on the generations admitted (a full batch plus a bounded
//! queue; beyond it load is shed), and a registry of generations in flight so `Cancel` can reach
//! them by request id. The device decides who runs; this decides who may wait for it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Admission control and the in-flight registry.
#[derive(Debug)]
pub struct Executor {
    admitted: AtomicUsize,
    limit: usize,
    queue_capacity: usize,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    shutdown: CancellationToken,
}

/// One generation in flight, as Cancel sees it.
#[derive(Debug)]
pub struct Flight {
    cancel: CancellationToken,
    reason: OnceLock<Error>,
    queued: AtomicBool,
    /// Who started it (authentication on).
    owner: Option<Arc<str>>,
}

impl Flight {
    /// Cancelled by Cancel, by lost memory, or by shutdown.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Stops the generation with `reason` (the first reason wins).
    pub fn stop(&self, reason: Error) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }

    /// Marks it as running on the device (no longer queued).
    pub fn mark_running(&self) {
        self.queued.store(false, Ordering::Release);
    }

    /// Why the generation was stopped; shutdown if nobody said.
    pub fn reason(&self) -> Error {
        self.reason.get().cloned().unwrap_or(Error::ShuttingDown)
    }
}

/// Registration of a request id; unregisters on drop.
#[derive(Debug)]
pub struct Ticket {
    executor: Arc<Executor>,
    id: String,
    flight: Arc<Flight>,
}

impl Ticket {
    /// The generation's cancellation state.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut flights = self.executor.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(&self.id).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
            flights.remove(&self.id);
        }
    }
}

/// A generation's place among the admitted; given back on drop.
#[derive(Debug)]
pub struct Admission {
    executor: Arc<Executor>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.executor.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Executor {
    /// An executor admitting a batch of `max_batch` plus `queue_capacity` waiting.
    pub fn new(max_batch: usize, queue_capacity: usize, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Executor {
            admitted: AtomicUsize::new(0),
            limit: max_batch.saturating_add(queue_capacity),
            queue_capacity,
            flights: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// Registers `id`; refuses an id already in flight.
    /// `owner` is the identity that started it (authentication on), the only one besides an
    /// admin that may cancel it.
    pub fn register(self: &Arc<Self>, id: String, owner: Option<Arc<str>>) -> Result<Ticket, Error> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.contains_key(&id) {
            return Err(Error::DuplicateRequest(id));
        }
        let flight = Arc::new(Flight {
            cancel: self.shutdown.child_token(),
            reason: OnceLock::new(),
            queued: AtomicBool::new(true),
            owner,
        });
        flights.insert(id.clone(), flight.clone());
        Ok(Ticket { executor: self.clone(), id, flight })
    }

    /// Admits a generation, or sheds it when the batch and the queue are full. Synchronous, so
    /// the shedding answer is the call's own status.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Error> {
        let taken = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1));
        match taken {
            Ok(_) => Ok(Admission { executor: self.clone() }),
            Err(_) => Err(Error::Overloaded { queued: self.queue_capacity, limit: self.queue_capacity }),
        }
    }

    /// Generations admitted and not yet ended.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Cancels generation `id`; returns whether it was still queued.
    /// `caller` is the identity asking, `None` with authentication off; `admin` may cancel any.
    pub fn cancel(&self, id: &str, caller: Option<&str>, admin: bool) -> Result<bool, Error> {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let flight = flights.get(id).ok_or_else(|| Error::RequestNotFound(serving::echo::echo(id)))?;
        if let Some(caller) = caller
            && !admin
            && flight.owner.as_deref() != Some(caller)
        {
            return Err(Error::PermissionDenied(format!(
                "generation {:?} was started by another identity",
                serving::echo::echo(id)
            )));
        }
        flight.stop(Error::Cancelled);
        Ok(flight.queued.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_beyond_a_full_batch_and_queue_and_cancel_reaches_registered_work() {
        let executor = Executor::new(1, 1, CancellationToken::new());
        let first = executor.admit().expect("batch slot");
        let _second = executor.admit().expect("queue slot");
        assert!(matches!(executor.admit(), Err(Error::Overloaded { queued: 1, limit: 1 })));
        drop(first);
        assert!(executor.admit().is_ok(), "a place freed up");

        let ticket = executor.register("gen-1".into(), None).expect("registered");
        assert!(matches!(executor.register("gen-1".into(), None), Err(Error::DuplicateRequest(_))));
        assert_eq!(executor.cancel("gen-1", None, false), Ok(true), "still queued");
        assert!(ticket.flight().cancelled().is_cancelled());
        assert_eq!(ticket.flight().reason(), Error::Cancelled);
        ticket.flight().mark_running();
        assert_eq!(executor.cancel("gen-1", None, false), Ok(false));
        drop(ticket);
        assert!(matches!(executor.cancel("gen-1", None, false), Err(Error::RequestNotFound(_))));

        // With identities, only the owner (or an admin) may cancel.
        let _owned = executor.register("gen-2".into(), Some("alice".into())).expect("registered");
        assert!(matches!(executor.cancel("gen-2", Some("bob"), false), Err(Error::PermissionDenied(_))));
        assert!(executor.cancel("gen-2", Some("ops"), true).is_ok());
        assert!(executor.cancel("gen-2", Some("alice"), false).is_ok());
    }
}
