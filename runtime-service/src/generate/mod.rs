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
use tonic::Status;
use tracing::Instrument;

pub use self::handover::HandOver;
pub use self::plan::{
    MAX_PROMPT_BYTES, Plan, Violations, is_valid_request_id, new_request_id, request_id_rule,
};
pub use self::stream::GenerateStream;
use self::{
    limits::{END, TimeLimits},
    summary::token,
};
use crate::{
    core::{Emitted, Outcome, Report, SeqGuard, TOKEN_BUFFER},
    error::Error,
    executor::{Admission, Flight, Ticket},
    memory::Lost,
    state::Shared,
};

/// Why a stream whose client stopped reading was cut.
const STALLED_READER: &str = "the client did not read the stream within the idle-gap limit";

/// Tokens buffered between the generation and the client's HTTP/2 stream.
const STREAM_BUFFER: usize = 16;

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
    let (sink, stream) = stream::channel(STREAM_BUFFER);
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
    tokens: u32,
}

/// The device side of a generation, once handed over.
struct OnDevice {
    tokens: mpsc::Receiver<Emitted>,
    outcome: oneshot::Receiver<Outcome>,
    /// Dropped last: cancels the sequence on the device if the task ends early.
    guard: SeqGuard,
}

struct Generation {
    shared: Arc<Shared>,
    plan: Plan,
    ticket: Ticket,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
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
        let streamed =
            self.stream(&mut on_device, flight, &lost, &mut timings).instrument(decode.clone()).await;
        lost.cancel(); // ends the watcher tasks
        decode.record("tokens", timings.tokens);
        if let Some(first) = timings.first_token {
            decode.record("ttft_ms", (first - self.started).as_millis() as u64);
        }
        tracing::Span::current().record("completion_tokens", timings.tokens);
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

    /// Moves tokens from the device to the client until the device reports the end or something
    /// stops the generation. The stop conditions are futures created once and polled in every
    /// select: re-creating timers and cancellation waiters per token would cost more than the token.
    async fn stream(
        &self,
        on_device: &mut OnDevice,
        flight: &Flight,
        lost: &CancellationToken,
        timings: &mut Timings,
    ) -> Result<Report, Stop> {
        let cancelled = flight.cancelled().cancelled();
        let lost = lost.cancelled();
        let closed = self.tx.closed();
        // Whether memory-service confirms this runtime's leases; marked seen at each token, so
        // a change means an outage touched the current gap (see `no_token`).
        let mut memory = self.shared.renewer.healthy();
        memory.mark_unchanged();
        // A watchdog, not a per-token timer: it fires at a possibly stale deadline, then re-arms
        // to the current one (which only moves later as tokens arrive).
        let watchdog = sleep_until(self.limits.next_token(None).0);
        tokio::pin!(cancelled, lost, closed, watchdog);
        let metrics = &self.shared.metrics;
        let model = self.plan.model.spec.key.as_str();
        // Looked up once: a labelled series' lookup (hash and lock) per token would cost more
        // than the observation.
        let inter_token = metrics.inter_token.with_label_values(&[model]);
        let scale = self.shared.config.time_scale;
        loop {
            let next = tokio::select! {
                biased;
                next = on_device.tokens.recv() => next,
                () = &mut cancelled => return Err(flight.reason().into()),
                () = &mut lost => return Err(Error::MemoryLost.into()),
                () = &mut closed => return Err(Stop::ClientGone),
                () = &mut watchdog => {
                    let (until, why) = self.limits.next_token(timings.last_token);
                    if Instant::now() >= until {
                        let fenced = self.shared.renewer.is_fenced(Instant::now());
                        return Err(self.limits.no_token(until, why, &memory, fenced).into());
                    }
                    watchdog.as_mut().reset(until);
                    continue;
                }
            };
            let Some(emitted) = next else {
                // The device dropped the token channel: the outcome follows at once. Without one,
                // the device dropped the sequence: because it was cancelled (Cancel, deadline,
                // shutdown: the flight says which), or because the device stopped.
                return match (&mut on_device.outcome).await {
                    Ok(Ok(report)) => Ok(report),
                    Ok(Err(err)) => Err(err.into()),
                    Err(_) if flight.cancelled().is_cancelled() => Err(flight.reason().into()),
                    Err(_) => Err(Error::ShuttingDown.into()),
                };
            };
            // The device pauses a sequence whose buffer is full; tell it there is room again.
            if on_device.tokens.len() + 1 == TOKEN_BUFFER {
                on_device.guard.drained();
            }
            let now = Instant::now();
            memory.mark_unchanged();
            match timings.last_token {
                None => {
                    metrics
                        .ttft
                        .with_label_values(&[model])
                        .observe(scale.simulated_secs(now - self.started));
                    timings.first_token = Some(now);
                    // From the time-to-first-token deadline to the (usually earlier) idle deadline.
                    watchdog.as_mut().reset(self.limits.next_token(Some(now)).0);
                }
                Some(last) => inter_token.observe(scale.simulated_secs(now - last)),
            }
            timings.last_token = Some(now);
            timings.tokens += 1;
            let item = token(emitted, scale.to_simulated(now - self.started));
            // Fast path: room in the stream buffer. Otherwise the client is slower than the
            // device: wait for room (the device pauses the sequence meanwhile, keeping its KV
            // blocks), bounded by the idle-gap limit like any stall: a reader that stopped must
            // not pin device memory until the stream's end.
            let item = match self.tx.try_send(Ok(item)) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::ClientGone),
                Err(mpsc::error::TrySendError::Full(item)) => item,
            };
            let (until, _) = self.limits.next_token(Some(now));
            watchdog.as_mut().reset(until);
            tokio::select! {
                biased;
                () = &mut cancelled => return Err(flight.reason().into()),
                () = &mut lost => return Err(Error::MemoryLost.into()),
                () = &mut watchdog => {
                    let why = if until < self.limits.end { STALLED_READER } else { END };
                    return Err(Error::DeadlineExceeded(why.into()).into());
                }
                sent = self.tx.send(item) => sent.map_err(|_| Stop::ClientGone)?,
            }
            watchdog.as_mut().reset(self.limits.next_token(timings.last_token).0);
        }
    }
}
