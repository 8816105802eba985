//! The seed's TaskExecutor: a bound on the generations admitted (a full batch plus a bounded
//! queue; beyond it load is shed), and a registry of generations in flight so `Cancel` can reach
//! them by request id. The device decides who runs; this decides who may wait for it.
//!
//! Request ids are namespaced per identity, as memory-service namespaces scopes and idempotency
//! keys per holder: two identities may use the same id at once, and another identity's id is
//! invisible (Cancel answers NOT_FOUND exactly as for an id nobody uses), so an id is neither an
//! existence oracle nor something a tenant can take from another first.

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
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    shutdown: CancellationToken,
}

/// A request id within its identity's namespace (`None`: authentication off, one namespace).
type Key = (Option<Arc<str>>, String);

/// One generation in flight, as Cancel sees it.
#[derive(Debug)]
pub struct Flight {
    cancel: CancellationToken,
    reason: OnceLock<Error>,
    queued: AtomicBool,
    /// Cancelled when the flight is dropped. Its holders are the generation's task (through
    /// its ticket and the registry) and, while the sequence is on the device, the device's
    /// record of it, which it drops right after freeing the sequence's blocks: so once this
    /// fires, the blocks are back. Abort waits on it.
    released: CancellationToken,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.released.cancel();
    }
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
    key: Key,
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
        if flights.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
            flights.remove(&self.key);
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

    /// Registers `id` in the namespace of `owner`, the identity that started it (`None` with
    /// authentication off); refuses an id that identity already has in flight.
    pub fn register(self: &Arc<Self>, id: String, owner: Option<Arc<str>>) -> Result<Ticket, Error> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let key = (owner, id);
        if flights.contains_key(&key) {
            return Err(Error::DuplicateRequest(key.1));
        }
        let flight = Arc::new(Flight {
            cancel: self.shutdown.child_token(),
            reason: OnceLock::new(),
            queued: AtomicBool::new(true),
            released: CancellationToken::new(),
        });
        flights.insert(key.clone(), flight.clone());
        Ok(Ticket { executor: self.clone(), key, flight })
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

    /// Stops every generation of `caller` (or anyone's, for an `admin`) named in `ids`, as
    /// Cancel does, and returns tokens cancelled once each one's resources are back (see
    /// `Flight::released`). Ids with no generation in flight are skipped: vLLM's Abort ignores
    /// them too, since a request may end between a gateway's decision to abort and the call.
    pub fn abort<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        caller: Option<&str>,
        admin: bool,
    ) -> Vec<CancellationToken> {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let mut released = Vec::new();
        for id in ids {
            let found =
                flights.iter().filter(|((owner, key), _)| key == id && (admin || owner.as_deref() == caller));
            for (_, flight) in found {
                flight.stop(Error::Cancelled);
                released.push(flight.released.clone());
            }
        }
        released
    }

    /// Cancels generation `id` of `caller` (the identity asking, `None` with authentication
    /// off); returns whether it was still queued. Another identity's generation is not found,
    /// word for word as an id nobody uses. An `admin` stops every identity's generation with
    /// this id (its own included); then "queued" means all of them were.
    pub fn cancel(&self, id: &str, caller: Option<&str>, admin: bool) -> Result<bool, Error> {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = flights
            .iter()
            .filter(|((owner, key), _)| key == id && (admin || owner.as_deref() == caller))
            .map(|(_, flight)| flight)
            .peekable();
        if found.peek().is_none() {
            return Err(Error::RequestNotFound(serving::echo::echo(id)));
        }
        let mut queued = true;
        for flight in found {
            flight.stop(Error::Cancelled);
            queued &= flight.queued.load(Ordering::Acquire);
        }
        Ok(queued)
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
        let owned = executor.register("gen-2".into(), Some("alice".into())).expect("registered");
        assert_eq!(
            executor.cancel("gen-2", Some("bob"), false),
            executor.cancel("gen-2", Some("carol"), false),
            "another identity's id is not found, like an unknown one"
        );
        assert!(executor.cancel("gen-2", Some("alice"), false).is_ok());
        assert!(owned.flight().cancelled().is_cancelled());
    }

    #[test]
    fn request_ids_are_per_identity_and_an_admin_reaches_all() {
        let executor = Executor::new(4, 4, CancellationToken::new());
        let alice = executor.register("same".into(), Some("alice".into())).expect("alice's");
        let bob = executor.register("same".into(), Some("bob".into())).expect("bob's, at the same time");
        assert!(matches!(
            executor.register("same".into(), Some("alice".into())),
            Err(Error::DuplicateRequest(_))
        ));
        let mine = executor.register("same".into(), None).expect("the open namespace is a third one");
        assert!(matches!(executor.cancel("same", Some("carol"), false), Err(Error::RequestNotFound(_))));
        assert_eq!(executor.cancel("same", Some("bob"), false), Ok(true));
        assert!(bob.flight().cancelled().is_cancelled());
        assert!(!alice.flight().cancelled().is_cancelled(), "bob's Cancel reached alice");
        assert!(!mine.flight().cancelled().is_cancelled());
        alice.flight().mark_running();
        assert_eq!(executor.cancel("same", Some("ops"), true), Ok(false), "alice's was running");
        assert!(alice.flight().cancelled().is_cancelled());
        drop(bob);
        assert!(executor.register("same".into(), Some("bob".into())).is_ok(), "freed at the end");
    }
}
