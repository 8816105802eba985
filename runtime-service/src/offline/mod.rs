//! The offline simulator: the device a configuration describes (the same scheduler, KV pool and
//! roofline as the service, built by the same code) driven in-process, with no network, no
//! memory-service and no gRPC. A request goes through the engine dialect's own checks
//! ([`translate`]), the same admission, fit check, front-end delay and hand-over as a live
//! Generate, and its tokens are taken straight off the device.
//!
//! On tokio's paused clock every step time passes at once, so a sweep of thousands of requests
//! takes as long as the host needs to schedule and price their steps. The kv-cache pool is local:
//! a leaser per model grants slabs from it at once, as a memory-service with this engine as its
//! only tenant would (returned slabs come back to it).
//!
//! What it leaves out, by design: time limits (a replay lifts them anyway), memory-service
//! outages, reclaim of the prefix cache by other tenants, and the per-token cost of a stream.
//!
//! [`translate`]: crate::dialect::request::translate

mod leaser;

use std::{sync::Arc, time::Duration};

use proto::vllm::grpc::engine as vllm;
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Config, ConfigError},
    core::{Device, DeviceSettings, Emitted, Report, Signals, TOKEN_BUFFER},
    error::Error,
    executor::Executor,
    metrics::Metrics,
    models::{Model, Models},
};

/// A leased memory that never expires: offline, nothing fences the device.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A running offline device.
#[derive(Debug)]
pub struct Offline {
    config: Config,
    models: Models,
    engine_model: Arc<Model>,
    device: Device,
    executor: Arc<Executor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    pool_bytes: u64,
    room: u64,
    metrics: Metrics,
    /// Kept so the device's memory fence never reads as closed.
    _fence: watch::Sender<Option<Instant>>,
}

impl Offline {
    /// Starts the device `config` describes, its models loaded, with a kv-cache pool of
    /// `pool_bytes` (default: all the room its weights and activations leave). Must run inside
    /// a tokio runtime; on a paused clock it runs faster than real time.
    pub fn start(config: Config, pool_bytes: Option<u64>) -> Result<Self, ConfigError> {
        config.validate()?;
        let metrics = Metrics::for_config(&config).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let models = Models::new(&config);
        let engine_model = models.engine_model(&config)?;
        let weights: u64 = config.models.iter().map(|m| m.arch.weight_bytes()).sum();
        let standing = weights.saturating_add(config.activation_bytes());
        let room = config.device.usable_bytes().checked_sub(standing).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "the models' weights and activations ({standing} bytes) exceed device {}'s usable memory",
                config.device.name
            ))
        })?;
        let pool_bytes = pool_bytes.unwrap_or(room);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut lanes = Vec::with_capacity(config.models.len());
        let mut leasers = Vec::with_capacity(config.models.len());
        for parts in crate::core::lanes(&config, &wake) {
            leasers.push((parts.leaser, parts.slabs));
            lanes.push((parts.lane, parts.link));
        }
        leaser::spawn(leasers, pool_bytes, &shutdown, &tracker);
        let (fence, memory) = watch::channel(Some(Instant::now() + FOREVER));
        let device = Device::spawn(
            DeviceSettings::of(&config),
            lanes,
            crate::core::inbox_capacity(&config),
            wake,
            metrics.clone(),
            Signals { shutdown: shutdown.clone(), memory, reclaim: None },
            &tracker,
        );
        let executor = Executor::new(config.max_batch_size, config.queue_capacity, shutdown.clone());
        Ok(Offline {
            config,
            models,
            engine_model,
            device,
            executor,
            shutdown,
            tracker,
            pool_bytes,
            room,
            metrics,
            _fence: fence,
        })
    }

    /// The model the engine dialect serves (its vocabulary bounds a workload's token ids).
    pub fn engine_model(&self) -> &Arc<Model> {
        &self.engine_model
    }

    /// GetModelInfo's answer, as the engine dialect gives it.
    pub fn model_info(&self) -> vllm::GetModelInfoResponse {
        crate::dialect::info::model_info(&self.engine_model)
    }

    /// The configured models.
    pub fn models(&self) -> &Models {
        &self.models
    }

    /// The device's metrics (`vllm:*`, `runtime_*`), as the service would export them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs one engine-dialect request to its end, calling `on_token` as each token leaves the
    /// device (read the clock there to time it). The errors are the live service's: invalid
    /// requests, a duplicate id, overload, a sequence that can never fit.
    pub async fn generate(
        &self,
        request: vllm::GenerateRequest,
        mut on_token: impl FnMut(&Emitted),
    ) -> Result<Report, Error> {
        let received = Instant::now();
        let plan = crate::dialect::request::translate(&self.engine_model, request)?.plan;
        let ticket = self.executor.register(plan.request_id.clone(), None)?;
        let _admission = self.executor.admit()?;
        let config = &self.config;
        plan.check_fits(config.kv_block_tokens, self.pool_bytes, &config.device.name, self.room)?;
        // The serving front end's own time, as a live Generate pays it (see generate::admit).
        tokio::time::sleep(config.frontend_delay()).await;
        let (tokens_tx, mut tokens) = tokio::sync::mpsc::channel(TOKEN_BUFFER);
        let handover = plan.hand_over(received, ticket.flight(), tokens_tx);
        let guard = self.device.submit(handover.submission)?;
        let room = self.device.room_signal();
        while let Some(emitted) = tokens.recv().await {
            room.took(&tokens);
            on_token(&emitted);
        }
        let outcome = match handover.outcome.await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::ShuttingDown),
        };
        drop(guard);
        outcome
    }

    /// Stops the device and its leasers and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
