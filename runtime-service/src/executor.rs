//! The seed's TaskExecutor: a concurrency limit, a bounded admission queue that sheds load when
//! full, and a registry of generations in flight so `Cancel` can reach them by request id.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Admission control and the in-flight registry.
#[derive(Debug)]
pub struct Executor {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
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

/// A place in the admission queue; gives it back on drop.
#[derive(Debug)]
pub struct QueueSlot {
    executor: Arc<Executor>,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.executor.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The outcome of [`Executor::admit`].
#[derive(Debug)]
pub enum Admission {
    /// A slot was free: run now.
    Running(OwnedSemaphorePermit),
    /// Wait in the queue for a slot.
    Queued(QueueSlot),
}

impl Executor {
    /// An executor running up to `max_concurrent` generations with `queue_capacity` waiting.
    pub fn new(max_concurrent: usize, queue_capacity: usize, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Executor {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            queued: AtomicUsize::new(0),
            queue_capacity,
            flights: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// Registers `id`; refuses an id already in flight.
    pub fn register(self: &Arc<Self>, id: String) -> Result<Ticket, Error> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.contains_key(&id) {
            return Err(Error::DuplicateRequest(id));
        }
        let flight = Arc::new(Flight {
            cancel: self.shutdown.child_token(),
            reason: OnceLock::new(),
            queued: AtomicBool::new(true),
        });
        flights.insert(id.clone(), flight.clone());
        Ok(Ticket { executor: self.clone(), id, flight })
    }

    /// Takes a slot if one is free, else a place in the queue; sheds the call if the queue is
    /// full. Synchronous, so the shedding answer is the call's own status.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Error> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Admission::Running(permit));
        }
        let taken = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
            (q < self.queue_capacity).then_some(q + 1)
        });
        match taken {
            Ok(_) => Ok(Admission::Queued(QueueSlot { executor: self.clone() })),
            Err(queued) => Err(Error::Overloaded { queued, limit: self.queue_capacity }),
        }
    }

    /// Waits in the queue for a slot until `deadline`, or until the flight is stopped.
    pub async fn wait(
        &self,
        slot: QueueSlot,
        flight: &Flight,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, Error> {
        let acquired = tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.map_err(|_| Error::ShuttingDown),
            () = flight.cancel.cancelled() => Err(flight.reason()),
            () = tokio::time::sleep_until(deadline) => {
                Err(Error::DeadlineExceeded(
                    "no generation slot freed up before the time-to-first-token limit or deadline".into(),
                ))
            }
        };
        drop(slot);
        flight.queued.store(false, Ordering::Release);
        acquired
    }

    /// Marks a flight as running (it got a slot without queueing).
    pub fn running(&self, flight: &Flight) {
        flight.queued.store(false, Ordering::Release);
    }

    /// Cancels generation `id`; returns whether it was still queued.
    pub fn cancel(&self, id: &str) -> Result<bool, Error> {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let flight = flights.get(id).ok_or_else(|| Error::RequestNotFound(id.to_owned()))?;
        flight.stop(Error::Cancelled);
        Ok(flight.queued.load(Ordering::Acquire))
    }

    /// Generations waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sheds_when_the_queue_is_full_and_serves_in_turn() {
        let executor = Executor::new(1, 1, CancellationToken::new());
        let Ok(Admission::Running(first)) = executor.admit() else { panic!("a free slot") };
        let Ok(Admission::Queued(slot)) = executor.admit() else { panic!("queued") };
        assert!(matches!(executor.admit(), Err(Error::Overloaded { queued: 1, limit: 1 })));

        let ticket = executor.register("b".into()).unwrap();
        let waiter = {
            let executor = executor.clone();
            let flight = ticket.flight().clone();
            tokio::spawn(async move {
                executor.wait(slot, &flight, Instant::now() + Duration::from_secs(5)).await.map(drop)
            })
        };
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(executor.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_reaches_a_queued_generation_and_ids_are_unique() {
        let executor = Executor::new(1, 4, CancellationToken::new());
        let Ok(Admission::Running(_busy)) = executor.admit() else { panic!() };
        let ticket = executor.register("gen-1".into()).unwrap();
        assert!(matches!(executor.register("gen-1".into()), Err(Error::DuplicateRequest(_))));
        let Ok(Admission::Queued(slot)) = executor.admit() else { panic!() };
        assert_eq!(executor.cancel("gen-1"), Ok(true), "still queued");
        let result = executor.wait(slot, ticket.flight(), Instant::now() + Duration::from_secs(5)).await;
        assert!(matches!(result, Err(Error::Cancelled)));
        drop(ticket);
        assert!(matches!(executor.cancel("gen-1"), Err(Error::RequestNotFound(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_generation_times_out_at_its_deadline() {
        let executor = Executor::new(1, 4, CancellationToken::new());
        let Ok(Admission::Running(_busy)) = executor.admit() else { panic!() };
        let ticket = executor.register("x".into()).unwrap();
        let Ok(Admission::Queued(slot)) = executor.admit() else { panic!() };
        let started = Instant::now();
        let result = executor.wait(slot, ticket.flight(), started + Duration::from_secs(2)).await;
        assert!(matches!(result, Err(Error::DeadlineExceeded(_))));
        assert_eq!(Instant::now() - started, Duration::from_secs(2));
        assert_eq!(executor.queued(), 0);
    }
}
