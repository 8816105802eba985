//! One Generate call: admission, model load, memory reservation with retries, then the pipeline
//! streamed to the client under time limits, and the memory returned on every path.

mod plan;
mod reserve;

use std::{sync::Arc, time::Duration};

use proto::runtime::v1::{self as pb, generate_response::Item};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc},
    time::{Instant, sleep_until},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

pub use self::plan::Plan;
use crate::{
    engine::Decoder,
    error::Error,
    executor::{Admission, Flight, Ticket},
    memory::{Lost, Reservation},
    pipeline::{self, Emitted, Pipeline},
    state::Shared,
};

/// The response half of a Generate call.
pub type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

/// Why a stream cut at its end limit was cut.
const END: &str = "the stream reached its deadline or lifetime limit";

/// Tokens buffered between the generation and the client's HTTP/2 stream.
const STREAM_BUFFER: usize = 16;

/// Validates and admits `request`, then streams it from a tracked task. Validation, a duplicate
/// request id and load shedding are answered here, as the call's own status.
pub fn start(
    shared: &Arc<Shared>,
    request: pb::GenerateRequest,
    grpc_timeout: Option<Duration>,
) -> Result<GenerateStream, Error> {
    let started = Instant::now();
    let plan = Plan::new(&shared.models, request)?;
    let ticket = shared.executor.register(plan.request_id.clone())?;
    let admission = shared.executor.admit()?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let limits = Limits::new(&shared.config, started, grpc_timeout);
    // A child of the call's server span, so queue wait, model load, memory reservation (and the
    // memory-service calls it makes), decoding and release all land in the caller's trace.
    let span = tracing::info_span!(
        "generate",
        request_id = %plan.request_id,
        model = %plan.model.spec.key,
        prompt_tokens = plan.prompt_tokens,
        max_tokens = plan.max_tokens,
        mode = ?plan.mode,
        completion_tokens = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let task = Generation { shared: shared.clone(), plan, ticket, tx, limits, started };
    // Tracked: shutdown waits for every generation to end and return its memory.
    shared.tracker.spawn(task.run(admission).instrument(span));
    Ok(ReceiverStream::new(rx))
}

/// The time limits of one call.
#[derive(Debug, Clone, Copy)]
struct Limits {
    first_token: Instant,
    idle: Duration,
    end: Instant,
}

impl Limits {
    fn new(config: &crate::config::Config, started: Instant, grpc_timeout: Option<Duration>) -> Self {
        let lifetime = started + config.max_stream_lifetime;
        let end = grpc_timeout.map_or(lifetime, |d| lifetime.min(started + d));
        Limits { first_token: (started + config.ttft_timeout).min(end), idle: config.idle_timeout, end }
    }

    /// The deadline for the next token, and what to say if it passes.
    fn next_token(&self, last: Option<Instant>) -> (Instant, &'static str) {
        match last {
            None => (self.first_token, "no first token within the time-to-first-token limit or deadline"),
            Some(last) if last + self.idle < self.end => {
                (last + self.idle, "no token within the idle-gap limit")
            }
            Some(_) => (self.end, END),
        }
    }
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
    queue_wait: Duration,
    memory_wait: Duration,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

struct Generation {
    shared: Arc<Shared>,
    plan: Plan,
    ticket: Ticket,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    limits: Limits,
    started: Instant,
}

impl Generation {
    async fn run(self, admission: Admission) {
        let metrics = &self.shared.metrics;
        let mut held: Option<Reservation> = None;
        let result = self.generate(admission, &mut held).await;
        // Every path returns the memory, and does so before the client hears the outcome, so a
        // caller told "done" or "failed" already sees the pools back where they were.
        if let Some(reservation) = held.take() {
            reservation.release().instrument(tracing::info_span!("memory.release")).await;
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Stop::ClientGone | Stop::Failed(Error::Cancelled)) => "cancelled",
            Err(Stop::Failed(Error::DeadlineExceeded(_))) => "deadline",
            Err(Stop::Failed(_)) => "error",
        };
        metrics.requests.with_label_values(&[outcome]).inc();
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
        // Bounded like every other send: a client that stopped reading must not keep this task
        // (and its request id, and shutdown) waiting.
        // Biased: the send goes first, so a client with room in its buffer always gets the
        // outcome, shutdown or not; only a full buffer makes the other branches matter.
        tokio::select! {
            biased;
            _ = self.tx.send(outcome) => {}
            () = sleep_until(self.limits.end) => {}
            () = self.shared.shutdown.cancelled() => {}
        }
    }

    async fn generate(
        &self,
        admission: Admission,
        held: &mut Option<Reservation>,
    ) -> Result<pb::Summary, Stop> {
        let flight = self.ticket.flight();
        let mut timings = Timings::default();
        // Everything before the first token, abandoned as soon as the client hangs up: a caller
        // that left must not keep a queue place, load a model or take memory.
        let admitted = self.admit(admission, flight, &mut timings);
        let (_permit, reservation) = tokio::select! {
            admitted = admitted => admitted?,
            () = self.tx.closed() => return Err(Stop::ClientGone),
        };
        let lost = reservation.lost().clone();
        *held = Some(reservation);
        // Streaming from here on (admitted, loaded, memory held); the guard covers every exit.
        let _active = ActiveStream::new(&self.shared.metrics.active_streams);

        let spec = self.plan.pipeline_spec(self.shared.config.pipeline_depth as usize);
        let decoder =
            Decoder::new(self.plan.model.engine, &self.plan.prompt, self.plan.seed, self.plan.sampling);
        let mut pipeline = Pipeline::new(spec.clone(), decoder);
        // One span for the whole decode, not one per token; its fields summarise the stream.
        let decode = tracing::info_span!(
            "decode",
            tokens = tracing::field::Empty,
            ttft_ms = tracing::field::Empty,
            gpu_idle_ms = tracing::field::Empty,
        );
        let streamed =
            self.stream(&mut pipeline, flight, &lost, &mut timings).instrument(decode.clone()).await;
        let stats = pipeline.stats();
        decode.record("tokens", stats.tokens);
        decode.record("gpu_idle_ms", stats.gpu_idle.as_millis() as u64);
        if let Some(first) = timings.first_token {
            decode.record("ttft_ms", (first - self.started).as_millis() as u64);
        }
        self.record_pipeline(&stats);
        tracing::Span::current().record("completion_tokens", stats.tokens);
        streamed?;
        Ok(self.summary(&spec, &stats, &timings))
    }

    fn record_pipeline(&self, stats: &pipeline::Stats) {
        let pipeline = &self.shared.metrics.pipeline;
        for (stage, state, d) in [
            ("cpu", "busy", stats.cpu_busy),
            ("gpu", "busy", stats.gpu_busy),
            ("gpu", "waiting_for_cpu", stats.gpu_idle),
            ("cpu", "waiting_for_gpu", stats.cpu_stalled),
        ] {
            pipeline.with_label_values(&[stage, state]).inc_by(d.as_secs_f64());
        }
    }

    /// Waits for a slot, loads the model and reserves the generation's memory.
    async fn admit(
        &self,
        admission: Admission,
        flight: &Flight,
        timings: &mut Timings,
    ) -> Result<(OwnedSemaphorePermit, Reservation), Stop> {
        let executor = &self.shared.executor;
        let permit = match admission {
            Admission::Running(permit) => {
                executor.running(flight);
                permit
            }
            Admission::Queued(slot) => {
                let wait = executor.wait(slot, flight, self.limits.first_token);
                wait.instrument(tracing::info_span!("queue.wait")).await?
            }
        };
        timings.queue_wait = Instant::now() - self.started;

        let loader = self.shared.loader();
        let load = self.plan.model.ensure_loaded(&loader).instrument(tracing::info_span!("model.load"));
        tokio::select! {
            loaded = load => loaded?,
            () = flight.cancelled().cancelled() => return Err(flight.reason().into()),
            () = sleep_until(self.limits.first_token) => {
                let why = "the model did not load before the time-to-first-token limit";
                return Err(Error::DeadlineExceeded(why.into()).into());
            }
        }
        let memory_started = Instant::now();
        let reserve = reserve::reserve(&self.shared, &self.plan, flight, self.limits.first_token);
        let reserved = reserve.instrument(tracing::info_span!("memory.reserve")).await;
        // Observed whatever the outcome: the slow, failed reservations are the interesting ones.
        timings.memory_wait = Instant::now() - memory_started;
        self.shared.metrics.memory_wait.observe(timings.memory_wait.as_secs_f64());
        let reservation = reserved?;
        Ok((permit, reservation))
    }

    /// Moves tokens from the pipeline to the client until the pipeline ends or something stops
    /// the generation. The stop conditions are futures created once and polled in every select:
    /// re-creating timers and cancellation waiters per token would cost more than the token.
    async fn stream(
        &self,
        pipeline: &mut Pipeline,
        flight: &Flight,
        lost: &Lost,
        timings: &mut Timings,
    ) -> Result<(), Stop> {
        let cancelled = flight.cancelled().cancelled();
        let lost = lost.cancelled();
        let closed = self.tx.closed();
        // A watchdog, not a per-token timer: it fires at a possibly stale deadline, then re-arms
        // to the current one (which only moves later as tokens arrive).
        let watchdog = sleep_until(self.limits.next_token(None).0);
        tokio::pin!(cancelled, lost, closed, watchdog);
        loop {
            // The pipeline first: the stop conditions are checked whenever it waits (every token
            // of a real profile), and polling them before every ready token cost a lock each.
            // The `next` future lives across watchdog re-arms: dropping it mid-step would lose
            // the token it already took from the CPU stage.
            let next = pipeline.next();
            tokio::pin!(next);
            let next = loop {
                tokio::select! {
                    biased;
                    next = &mut next => break next,
                    () = &mut cancelled => return Err(flight.reason().into()),
                    () = &mut lost => return Err(Error::MemoryLost.into()),
                    () = &mut closed => return Err(Stop::ClientGone),
                    () = &mut watchdog => {
                        let (until, why) = self.limits.next_token(timings.last_token);
                        if Instant::now() >= until {
                            return Err(Error::DeadlineExceeded(why.into()).into());
                        }
                        watchdog.as_mut().reset(until);
                    }
                }
            };
            let Some(emitted) = next else { return Ok(()) };
            let now = Instant::now();
            let metrics = &self.shared.metrics;
            match timings.last_token {
                None => {
                    metrics.ttft.observe((now - self.started).as_secs_f64());
                    timings.first_token = Some(now);
                    // From the time-to-first-token deadline to the (usually earlier) idle deadline.
                    watchdog.as_mut().reset(self.limits.next_token(Some(now)).0);
                }
                Some(last) => metrics.inter_token.observe((now - last).as_secs_f64()),
            }
            timings.last_token = Some(now);
            let item = token(emitted, now - self.started);
            // Fast path: room in the stream buffer. Otherwise the client is slower than the
            // generation: wait for room (backpressure), bounded by the stream's end.
            let item = match self.tx.try_send(Ok(item)) {
                Ok(()) => {
                    metrics.tokens.inc();
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::ClientGone),
                Err(mpsc::error::TrySendError::Full(item)) => item,
            };
            watchdog.as_mut().reset(self.limits.end);
            tokio::select! {
                biased;
                () = &mut cancelled => return Err(flight.reason().into()),
                () = &mut lost => return Err(Error::MemoryLost.into()),
                () = &mut watchdog => {
                    return Err(Error::DeadlineExceeded(END.into()).into());
                }
                sent = self.tx.send(item) => sent.map_err(|_| Stop::ClientGone)?,
            }
            metrics.tokens.inc();
            watchdog.as_mut().reset(self.limits.next_token(timings.last_token).0);
        }
    }

    fn summary(&self, spec: &pipeline::Spec, stats: &pipeline::Stats, timings: &Timings) -> pb::Summary {
        let duration = |d: Duration| prost_types::Duration::try_from(d).ok();
        let (first, last) =
            (timings.first_token.unwrap_or(self.started), timings.last_token.unwrap_or(self.started));
        let decode = (last - first).as_secs_f64();
        let tokens_per_second =
            if stats.tokens >= 2 && decode > 0.0 { f64::from(stats.tokens - 1) / decode } else { 0.0 };
        pb::Summary {
            finish_reason: if stats.stopped { pb::FinishReason::Stop } else { pb::FinishReason::Length }
                .into(),
            prompt_tokens: self.plan.prompt_tokens,
            completion_tokens: stats.tokens,
            time_to_first_token: duration(first - self.started),
            total_time: duration(last - self.started),
            tokens_per_second,
            cpu_busy: duration(stats.cpu_busy),
            gpu_busy: duration(stats.gpu_busy),
            gpu_idle_waiting_for_cpu: duration(stats.gpu_idle),
            memory_wait: duration(timings.memory_wait),
            queue_wait: duration(timings.queue_wait),
            pipeline_mode: match spec.mode {
                pipeline::Mode::Pipelined => pb::PipelineMode::Pipelined,
                pipeline::Mode::Sequential => pb::PipelineMode::Sequential,
            }
            .into(),
            pipeline_depth: spec.depth as u32,
            kv_cache_bytes: self.plan.kv_bytes(),
            activation_bytes: self.plan.activation_bytes(spec.depth),
            request_id: self.plan.request_id.clone(),
        }
    }
}

fn token(emitted: Emitted, elapsed: Duration) -> pb::GenerateResponse {
    pb::GenerateResponse {
        item: Some(Item::Token(pb::Token {
            index: emitted.index,
            text: emitted.token.text,
            token_id: emitted.token.id,
            elapsed: prost_types::Duration::try_from(elapsed).ok(),
            gpu_time: prost_types::Duration::try_from(emitted.gpu_time).ok(),
        })),
    }
}
