//! Replays a [`Schedule`] against a runtime's engine, a live runtime-service's engine dialect
//! (`vllm.grpc.engine.VllmEngine`) or the offline simulator, timing every token on tokio's clock.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use proto::vllm::grpc::engine::{GetModelInfoResponse, vllm_engine_client::VllmEngineClient};
use runtime_service::offline::Offline;
use tokio::{
    task::JoinSet,
    time::{Instant, sleep_until, timeout},
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    door::Door,
    record::{Failure, RequestRecord},
    workload::{Pacing, PlannedRequest, Schedule},
};

/// The slowest time scale: a thousand times slower than real time. With the workload's bound on
/// arrival offsets (a week), paced instants stay far inside what `Instant` holds.
pub const MIN_TIME_SCALE: f64 = 1e-3;
/// The fastest: a million times faster than real time.
pub const MAX_TIME_SCALE: f64 = 1e6;

/// How a replay runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// How many times faster than real time the device runs (runtime-service's
    /// `--time-scale`): arrival offsets are divided by it and measured times multiplied by it, so
    /// records read in simulated time. 1.0 is real time; from [`MIN_TIME_SCALE`] to
    /// [`MAX_TIME_SCALE`].
    pub time_scale: f64,
    /// A request without GenerateComplete after this long (real time) is dropped and counted as
    /// failed; `None` waits as long as the server keeps the stream open.
    pub request_timeout: Option<Duration>,
    /// Request ids are this prefix followed by the planned index.
    pub request_id_prefix: String,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { time_scale: 1.0, request_timeout: None, request_id_prefix: "replay-".into() }
    }
}

/// A finished replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// One record per planned request, by index.
    pub records: Vec<RequestRecord>,
    /// Requests in flight at once, at most: a burst larger than the HTTP/2 connections can carry
    /// (`connections` × the server's `max_concurrent_streams`, 1024 by default) queues in the
    /// client, which shows here.
    pub max_in_flight: usize,
}

/// Why a replay could not start.
#[derive(Debug)]
pub enum DriveError {
    /// The target is not a URI, or no connection was asked for.
    InvalidTarget(String),
    /// Connecting failed.
    Connect(String),
    /// GetModelInfo failed.
    ModelInfo(tonic::Status),
    /// An option is out of range.
    InvalidOptions(String),
}

impl fmt::Display for DriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveError::InvalidTarget(why) => write!(f, "invalid target: {why}"),
            DriveError::Connect(why) => write!(f, "cannot connect: {why}"),
            DriveError::ModelInfo(status) => write!(f, "GetModelInfo failed: {status}"),
            DriveError::InvalidOptions(why) => write!(f, "invalid replay options: {why}"),
        }
    }
}

impl std::error::Error for DriveError {}

/// A runtime's engine: a runtime-service's engine dialect over one or more HTTP/2 connections
/// used in turn, or the offline simulator.
#[derive(Debug, Clone)]
pub struct Target {
    door: Door,
}

impl Target {
    /// Connects `connections` times to `uri` (e.g. `http://127.0.0.1:50052`). Several
    /// connections spread a large burst over more than one connection's stream limit.
    pub async fn connect(uri: &str, connections: usize) -> Result<Target, DriveError> {
        if connections == 0 {
            return Err(DriveError::InvalidTarget("at least one connection is needed".into()));
        }
        let endpoint = Endpoint::from_shared(uri.to_owned())
            .map_err(|e| DriveError::InvalidTarget(format!("{uri}: {e}")))?;
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(
                endpoint.connect().await.map_err(|e| DriveError::Connect(format!("{uri}: {}", chain(&e))))?,
            );
        }
        Target::from_channels(channels)
    }

    /// Uses channels the caller connected (an in-process server's, say).
    pub fn from_channels(channels: Vec<Channel>) -> Result<Target, DriveError> {
        if channels.is_empty() {
            return Err(DriveError::InvalidTarget("at least one channel is needed".into()));
        }
        Ok(Target { door: Door::Grpc(channels.into_iter().map(VllmEngineClient::new).collect()) })
    }

    /// The offline simulator's device, with no network: run the replay on tokio's paused clock
    /// and it takes as long as the host needs to price the steps.
    pub fn offline(offline: Arc<Offline>) -> Target {
        Target { door: Door::Offline(offline) }
    }

    /// The served model: `vocab_size` bounds the prompt token ids a plan may hold.
    pub async fn model_info(&self) -> Result<GetModelInfoResponse, DriveError> {
        self.door.model_info().await
    }

    /// Sends every request of `plan` as it paces them and waits for all to end. Failures are
    /// recorded in the run, never returned: only bad options stop a replay before it starts.
    pub async fn replay(
        &self,
        plan: impl Into<Arc<Schedule>>,
        options: &ReplayOptions,
    ) -> Result<Run, DriveError> {
        let scale = options.time_scale;
        if !(MIN_TIME_SCALE..=MAX_TIME_SCALE).contains(&scale) {
            return Err(DriveError::InvalidOptions(format!(
                "time scale {scale} is not between {MIN_TIME_SCALE} and {MAX_TIME_SCALE}"
            )));
        }
        let plan = plan.into();
        let shared = Arc::new(Shared {
            start: Instant::now(),
            options: options.clone(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let mut tasks = JoinSet::new();
        match plan.pacing() {
            Pacing::Open => {
                for (n, planned) in plan.requests().iter().enumerate() {
                    // Arrival pacing: the plan's instant, not a wait for anything to be ready.
                    sleep_until(shared.start + planned.at.div_f64(options.time_scale)).await;
                    let (door, plan, shared) = (self.door.clone(), plan.clone(), shared.clone());
                    tasks.spawn(async move { vec![send(&door, n, &plan.requests()[n], &shared).await] });
                }
            }
            Pacing::ClosedLoop { clients } => {
                let next = Arc::new(AtomicUsize::new(0));
                for c in 0..clients as usize {
                    let (door, plan, shared, next) =
                        (self.door.clone(), plan.clone(), shared.clone(), next.clone());
                    tasks.spawn(async move {
                        let mut records = Vec::new();
                        // Bounded by the plan: each turn takes a distinct index.
                        while let Some(planned) = plan.requests().get(next.fetch_add(1, Ordering::Relaxed)) {
                            records.push(send(&door, c, planned, &shared).await);
                        }
                        records
                    });
                }
            }
        }
        let mut records = Vec::with_capacity(plan.requests().len());
        let mut lost = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(done) => records.extend(done),
                Err(err) => lost = Some(err.to_string()),
            }
        }
        if let Some(why) = lost {
            // A panicked task took its records with it: report its requests rather than drop them.
            let mut seen = vec![false; plan.requests().len()];
            for record in &records {
                seen[record.index] = true;
            }
            for planned in plan.requests().iter().filter(|p| !seen[p.index]) {
                let mut record = RequestRecord::planned(planned);
                record.failure = Some(Failure::Lost(why.clone()));
                records.push(record);
            }
        }
        records.sort_by_key(|r| r.index);
        Ok(Run { records, max_in_flight: shared.max_in_flight.load(Ordering::Relaxed) })
    }
}

/// An error and its sources, "transport error: tcp connect error: Connection refused": tonic's
/// top-level message alone does not say what went wrong.
fn chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        // Layers that wrap without adding words repeat their cause's message.
        if parts.last() != Some(&part) {
            parts.push(part);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// What every request task reads.
#[derive(Debug)]
pub(crate) struct Shared {
    start: Instant,
    pub(crate) options: ReplayOptions,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Shared {
    /// Simulated time since the start.
    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed().mul_f64(self.options.time_scale)
    }
}

/// Counts a request in flight until dropped, on every exit path.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RequestRecord {
    fn planned(planned: &PlannedRequest) -> Self {
        RequestRecord {
            index: planned.index,
            class: planned.class,
            scheduled: planned.at,
            sent: Duration::ZERO,
            chunks: Vec::new(),
            ended: Duration::ZERO,
            prompt_tokens: planned.prompt.len() as u32,
            max_tokens: planned.max_tokens,
            output_tokens: 0,
            completion_tokens: None,
            cached_tokens: 0,
            finish_reason: None,
            failure: None,
        }
    }
}

/// Sends one request (the `n`th sent) and records its tokens.
async fn send(door: &Door, n: usize, planned: &PlannedRequest, shared: &Shared) -> RequestRecord {
    let mut record = RequestRecord::planned(planned);
    let _counted = InFlight::enter(shared);
    record.sent = shared.now();
    let exchange = door.exchange(n, planned, &mut record, shared);
    let outcome = match shared.options.request_timeout {
        Some(limit) => timeout(limit, exchange).await.unwrap_or(Err(Failure::Timeout)),
        None => exchange.await,
    };
    record.ended = shared.now();
    record.failure = outcome.err();
    record
}
