//! One Generate call: admission, model load, hand-over to the device, then the device's tokens
//! streamed to the client under time limits. The sequence's KV blocks live on the device, which
//! frees them the moment the sequence ends, whichever way it ends.

mod admit;
mod handover;
mod limits;
mod plan;
mod stream;
mod summary;

use std::{sync::Arc, time::Duration};

use proto::runtime::v1::{self as pb, generate_response::Item};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::handover::HandOver;
use self::limits::{END, Health, TimeLimits};
pub use self::plan::{
    MAX_PROMPT_BYTES, Plan, Violations, is_valid_request_id, new_request_id, request_id_rule,
};
pub use self::stream::GenerateStream;
use crate::{
    core::{Emitted, Outcome, Report, SeqGuard},
    error::Error,
    executor::{Admission, Flight, Ticket},
    memory::Lost,
    state::Shared,
};

/// Why a stream whose client stopped reading was cut.
const STALLED_READER: &str = "the client did not read the stream within the idle-gap limit";

/// Admits `plan` (validated by its front door), then streams it from a tracked task. A duplicate
/// request id and load shedding are answered here, as the call's own status.
pub fn start(
    shared: &Arc<Shared>,
    plan: Plan,
    grpc_timeout: Option<Duration>,
    owner: Option<Arc<str>>,
) -> Result<GenerateStream, Error> {
    let started = Instant::now();
    let ticket = shared.executor.register(plan.request_id.clone(), owner)?;
    let admission = shared.executor.admit()?;
    let (sink, stream) = stream::channel(shared.device.room_signal(), started, shared.config.time_scale);
    let limits = TimeLimits::new(&shared.config, started, grpc_timeout);
    // A child of the call's server span, so model load (and the memory-service calls it makes)
    // and decoding land in the caller's trace; none where no trace is recorded.
    let span = if !serving::telemetry::traced() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "generate",
            request_id = %plan.request_id,
            model = %plan.model.spec.key,
            prompt_tokens = plan.prompt_tokens,
            max_tokens = plan.max_tokens,
            completion_tokens = tracing::field::Empty,
            outcome = tracing::field::Empty,
        )
    };
    let task = Generation { shared: shared.clone(), plan, ticket, tx: sink.tokens, limits, started };
    // Tracked: a drain waits for every generation to end and return its memory.
    shared.generations.spawn(task.run(admission, sink.outcome).instrument(span));
    Ok(stream)
}

/// Counts a generation in `runtime_active_streams` while it lives.
struct ActiveStream<'a>(&'a prometheus::IntGauge);

impl<'a> ActiveStream<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        ActiveStream(gauge)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a generation ended without a summary.
enum Stop {
    /// The client went away: nobody to tell.
    ClientGone,
    /// Tell the client why.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

/// Timings gathered along the way, for the summary.
#[derive(Debug, Default)]
struct Timings {
    memory_wait: Duration,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// The device side of a generation, once handed over. Its tokens go straight to the client's
/// stream; the generation sees only how far the device got (through the guard) and the outcome.
struct OnDevice {
    outcome: oneshot::Receiver<Outcome>,
    /// Whether the outcome came: the device has let go of the sequence.
    released: bool,
    /// Dropped last: cancels the sequence on the device if the task ends early.
    guard: SeqGuard,
}

struct Generation {
    shared: Arc<Shared>,
    plan: Plan,
    ticket: Ticket,
    /// A clone of the device's sender to the client's stream: to notice a client that hung up,
    /// and to hand the device its own clone. The stream ends once both are dropped.
    tx: mpsc::Sender<Emitted>,
    limits: TimeLimits,
    started: Instant,
}

impl Generation {
    async fn run(self, admission: Admission, last: oneshot::Sender<stream::Message>) {
        let metrics = &self.shared.metrics;
        let result = self.generate().await;
        drop(admission);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Stop::ClientGone | Stop::Failed(Error::Cancelled)) => "cancelled",
            Err(Stop::Failed(Error::DeadlineExceeded(_))) => "deadline",
            Err(Stop::Failed(_)) => "error",
        };
        metrics.requests.with_label_values(&[&self.plan.model.spec.key, outcome]).inc();
        tracing::Span::current().record("outcome", outcome);
        let hint = self.shared.config.retry_hint;
        let outcome = match result {
            Ok(summary) => Ok(pb::GenerateResponse { item: Some(Item::Summary(summary)) }),
            Err(Stop::Failed(err)) => {
                tracing::debug!(request_id = %self.plan.request_id, cause = %err, "generation failed");
                Err(err.to_status(hint))
            }
            Err(Stop::ClientGone) => return,
        };
        // Its own slot, after the buffered tokens: never blocks, and never lost to a full buffer
        // (a client gone in the meantime just never reads it).
        let _ = last.send(outcome);
    }

    async fn generate(&self) -> Result<pb::Summary, Stop> {
        let flight = self.ticket.flight();
        let mut timings = Timings::default();
        // Everything before the hand-over, abandoned as soon as the client hangs up: a caller
        // that left must not load a model or queue on the device.
        let admitted = self.admit(flight, &mut timings);
        let mut on_device = tokio::select! {
            admitted = admitted => admitted?,
            () = self.tx.closed() => return Err(Stop::ClientGone),
        };
        let _active = ActiveStream::new(&self.shared.metrics.active_streams);
        // One span for the whole decode, not one per token; its fields summarise the stream.
        let decode = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "decode",
                tokens = tracing::field::Empty,
                ttft_ms = tracing::field::Empty,
                preemptions = tracing::field::Empty,
            )
        };
        let lost = self.memory_lost();
        let streamed = self.stream(&mut on_device, flight, &lost).instrument(decode.clone()).await;
        lost.cancel(); // ends the watcher tasks
        if !on_device.released {
            // Stopped here (Cancel, a limit, lost memory, a client gone): the device lets go of
            // the sequence at its next sweep (after the step running, if any), its blocks back
            // in the pool, and drops its ends of the channels then (a device that stops drops
            // them too). The client's stream cannot end before: the device's token sender holds
            // it open. Waiting here as well keeps the call's admission place until then.
            on_device.guard.abort();
            let _ = (&mut on_device.outcome).await;
        }
        let guard = &on_device.guard;
        (timings.first_token, timings.last_token) = (guard.first_token(), guard.last_token());
        decode.record("tokens", guard.tokens());
        if let Some(first) = timings.first_token {
            decode.record("ttft_ms", (first - self.started).as_millis() as u64);
        }
        tracing::Span::current().record("completion_tokens", guard.tokens());
        let report = streamed?;
        decode.record("preemptions", report.preemptions);
        drop(on_device.guard);
        Ok(self.summary(&report, &timings))
    }

    /// Cancelled if the model's weights or the device's activations are lost (memory-service
    /// restarted, or the leases expired): the sequence cannot go on.
    fn memory_lost(&self) -> CancellationToken {
        let lost = CancellationToken::new();
        let signals: Vec<Lost> = [self.plan.model.lost_signal(), self.shared.activations.lost_signal()]
            .into_iter()
            .flatten()
            .collect();
        for signal in signals {
            let lost = lost.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = signal.cancelled() => lost.cancel(),
                    () = lost.cancelled() => {}
                }
            });
        }
        lost
    }

    /// Watches the sequence on the device until it reports the end or something stops the
    /// generation: a Cancel, lost memory, a client gone, or a time limit. The device sends the
    /// tokens to the client itself; this task wakes only for those events and for a watchdog,
    /// never per token. The stop conditions are futures created once and polled in every select.
    async fn stream(
        &self,
        on_device: &mut OnDevice,
        flight: &Flight,
        lost: &CancellationToken,
    ) -> Result<Report, Stop> {
        let cancelled = flight.cancelled().cancelled();
        let lost = lost.cancelled();
        let closed = self.tx.closed();
        // Whether memory-service confirms this runtime's leases, and when that last changed: an
        // outage that touched the gap since the last token changes what a cut stream is told
        // (see `no_token`). Changes are rare (an outage's start and end): watched, not polled.
        let mut memory = Health::new(self.shared.renewer.healthy());
        // A watchdog, not a per-token timer: it wakes at the next deadline the progress seen so
        // far allows, or an idle gap from now if sooner, and re-arms from what the device did.
        let watchdog = sleep_until(self.limits.recheck(None, Instant::now()));
        tokio::pin!(cancelled, lost, closed, watchdog);
        loop {
            tokio::select! {
                biased;
                // The device drops its token sender first, so the client reads every token before
                // the outcome. Without one, the device dropped the sequence: because its client
                // hung up, because it was cancelled (Cancel, deadline, shutdown: the flight says
                // which), or because the device stopped.
                outcome = &mut on_device.outcome => {
                    on_device.released = true;
                    return match outcome {
                        Ok(Ok(report)) => Ok(report),
                        Ok(Err(err)) => Err(err.into()),
                        Err(_) if self.tx.is_closed() => Err(Stop::ClientGone),
                        Err(_) if flight.cancelled().is_cancelled() => Err(flight.reason().into()),
                        Err(_) => Err(Error::ShuttingDown.into()),
                    };
                }
                () = &mut cancelled => return Err(flight.reason().into()),
                () = &mut lost => return Err(Error::MemoryLost.into()),
                () = &mut closed => return Err(Stop::ClientGone),
                () = memory.changed() => continue,
                () = &mut watchdog => {}
            }
            let now = Instant::now();
            let last = on_device.guard.last_token();
            let (until, why) = self.limits.next_token(last);
            if now < until {
                watchdog.as_mut().reset(self.limits.recheck(last, now));
                continue;
            }
            // A full buffer: the device paused the sequence for its reader, who stopped reading.
            // A reader that stopped must not pin device memory until the stream's end.
            if self.tx.capacity() == 0 {
                let why = if until < self.limits.end { STALLED_READER } else { END };
                return Err(Error::DeadlineExceeded(why.into()).into());
            }
            // Also an outage: renewals still answer but too late, so the local lease timer holds
            // the device's steps though health has not turned yet.
            let outage = memory.touched(last) || self.shared.renewer.is_fenced(now);
            return Err(self.limits.no_token(until, why, outage).into());
        }
    }
}
