//! Allocate: grant now, or wait server-side (event-driven, bounded) for room.

use std::{sync::Arc, time::Duration};

use proto::memory::v1 as pb;
use tokio::{sync::oneshot, time::Instant};
use tonic::Request;
use tracing::Instrument;

use super::{Access, Shared, convert, convert::Clock};
use crate::ledger::{AllocateOutcome, Error, Grant};

/// Runs one Allocate call.
pub(super) async fn allocate(
    shared: &Arc<Shared>,
    request: Request<pb::AllocateRequest>,
) -> Result<pb::AllocateResponse, Error> {
    let deadline = serving::deadline::grpc_timeout(request.metadata());
    let access = Access::of(&request);
    let undelivered = request.extensions().get::<serving::observe::Undelivered>().cloned();
    let mut message = request.into_inner();
    message.holder = access.holder(std::mem::take(&mut message.holder))?;
    let (req, asked_wait) = convert::allocate(message, shared.config())?;
    let max_wait = deadline.map_or(asked_wait, |d| asked_wait.min(before_deadline(d)));
    let started = Instant::now();
    // Spans only where a trace is being recorded (see `serving::telemetry::traced`).
    let span = if !serving::telemetry::traced() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "memory.allocate",
            holder = %req.holder,
            scope = req.scope.as_deref().unwrap_or_default(),
            items = req.items.len(),
            bytes = req.items.iter().map(|(_, size)| *size).fold(0u64, u64::saturating_add),
            pools = %req.items.iter().map(|(pool, _)| pool.as_str()).collect::<Vec<_>>().join(","),
            max_wait_ms = max_wait.as_millis() as u64,
            lease_ids = tracing::field::Empty,
        )
    };

    shared.durability().check()?;
    let admission = shared.ledger().allocate(req, started, !max_wait.is_zero())?;
    let grant = match admission {
        AllocateOutcome::Granted(grant) => grant,
        AllocateOutcome::Queued { ticket, grant } => {
            // Queuing may have asked holders for reclaimable leases: their events and counters
            // go to the store with the next commit, which nobody else may wake soon.
            shared.durability().nudge();
            let wait_span = if span.is_none() {
                tracing::Span::none()
            } else {
                tracing::info_span!(parent: &span, "memory.wait", waited_ms = tracing::field::Empty, outcome = tracing::field::Empty)
            };
            let mut guard = WaitGuard { shared, ticket, started, grant: Some(grant), observed: false };
            let result = guard.wait(max_wait).instrument(wait_span.clone()).await;
            let outcome = match &result {
                Ok(_) => "granted",
                Err(Error::NoRoom { .. }) => "timed_out",
                Err(Error::LimitReached { .. }) => "refused",
                Err(_) => "shutdown",
            };
            let waited = Instant::now() - started;
            guard.observed = true;
            wait_span.record("waited_ms", waited.as_millis() as u64);
            wait_span.record("outcome", outcome);
            shared.metrics().wait.with_label_values(&[outcome]).observe(waited.as_secs_f64());
            result?
        }
    };
    // A grant whose answer never leaves (the caller reset the call or went away, the commit wait
    // included) goes straight back, rather than sitting unused until its TTL. Registered before
    // the commit wait: a caller that resets during it drops this future at the await, and nothing
    // after the await would run. A replay is not undone: the same leases were answered before
    // and may be in use.
    let leases: Vec<_> = grant.leases.iter().map(|l| l.id).collect();
    if let Some(undelivered) = undelivered
        && !grant.replayed
    {
        let owner = shared.clone();
        let leases = leases.clone();
        undelivered.on_undelivered(move || {
            let freed = owner.ledger().withdraw(&leases, Instant::now());
            if freed > 0 {
                owner.durability().nudge();
                tracing::info!(freed, "an Allocate answer never reached its caller: its leases are freed");
            }
        });
    }
    // Durable before it is answered. If the store fails, the grant is taken back: the caller is
    // told UNAVAILABLE, and nothing it was not told of may hold memory (nor reach a watcher).
    if let Err(err) = shared.durable().await {
        if !grant.replayed {
            shared.ledger().withdraw(&leases, Instant::now());
        }
        return Err(err);
    }
    if !span.is_none() {
        let ids: Vec<String> = leases.iter().map(|id| id.to_string()).collect();
        span.record("lease_ids", tracing::field::display(ids.join(",")));
    }
    let clock = Clock::now();
    let leases = {
        let ledger = shared.ledger();
        grant.leases.iter().map(|l| convert::lease(l, ledger.pool_name(l.pool), &clock)).collect()
    };
    Ok(pb::AllocateResponse {
        leases,
        waited: prost_types::Duration::try_from(clock.instant() - started).ok(),
        replayed: grant.replayed,
        server_epoch: shared.epoch,
    })
}

/// How long a wait may last under a gRPC deadline `d`: a little less than `d`, so the caller gets
/// RESOURCE_EXHAUSTED with its retry hint (and the timeout is counted and published) instead of a
/// bare DEADLINE_EXCEEDED from tonic's own timer, which started earlier than ours.
fn before_deadline(d: Duration) -> Duration {
    let margin = (d / 10).clamp(Duration::from_millis(1), Duration::from_millis(50));
    d.saturating_sub(margin)
}

/// Owns a queued Allocate. However the call ends — granted, timed out, shut down, or dropped
/// because the client cancelled — the guard leaves the ledger as if the call never waited, or
/// hands over a grant; a grant that raced a cancellation is freed in `Drop`.
struct WaitGuard<'a> {
    shared: &'a Arc<Shared>,
    ticket: u64,
    started: Instant,
    /// `None` once the outcome has been taken.
    grant: Option<oneshot::Receiver<Result<Grant, Error>>>,
    /// The wait histogram already has this wait (an ended wait is observed once, by its caller).
    observed: bool,
}

impl WaitGuard<'_> {
    async fn wait(&mut self, max_wait: Duration) -> Result<Grant, Error> {
        let Some(receiver) = self.grant.as_mut() else { return Err(Error::ShuttingDown) };
        let outcome = tokio::select! {
            granted = receiver => Some(granted.unwrap_or(Err(Error::ShuttingDown))),
            () = tokio::time::sleep(max_wait) => None,
            () = self.shared.shutdown().cancelled() => Some(Err(Error::ShuttingDown)),
        };
        match outcome {
            Some(result) => {
                // The ledger answered (a grant, or a refusal it already cleaned up after).
                if !matches!(result, Err(Error::ShuttingDown)) {
                    self.grant = None;
                }
                result
            }
            None => self.time_out(),
        }
    }

    /// The wait ran out: leave the queue, unless a grant arrived first, which then wins.
    fn time_out(&mut self) -> Result<Grant, Error> {
        let now = Instant::now();
        let refused = self.shared.ledger().abandon_wait(self.ticket, now, now - self.started, true);
        let mut receiver = self.grant.take().ok_or(Error::ShuttingDown)?;
        match refused {
            Some(err) => Err(err),
            None => receiver.try_recv().unwrap_or(Err(Error::ShuttingDown)),
        }
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut receiver) = self.grant.take() else { return };
        let now = Instant::now();
        // Still holding the receiver and not observed: the caller left mid-wait.
        if !self.observed {
            let waited = (now - self.started).as_secs_f64();
            self.shared.metrics().wait.with_label_values(&["cancelled"]).observe(waited);
        }
        let mut ledger = self.shared.ledger();
        if ledger.abandon_wait(self.ticket, now, now - self.started, false).is_none() {
            // Granted while the caller was leaving: nobody will use these leases.
            if let Ok(Ok(grant)) = receiver.try_recv() {
                let leases: Vec<_> = grant.leases.iter().map(|l| l.id).collect();
                ledger.withdraw(&leases, now);
            }
        }
        drop(ledger);
        // Leaving serves those behind, which may ask holders for reclaimable leases.
        self.shared.durability().nudge();
    }
}
