//! The gRPC shell: `runtime.v1.RuntimeService` over [`Shared`].

use std::sync::Arc;

use proto::runtime::v1::{self as pb, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    generate::{self, GenerateStream},
    kv_events::{BatchStream, v1_batch},
    memory::Use,
    roofline::{Roofline, Work},
    state::Shared,
};

/// The `RuntimeService` implementation.
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    shared: Arc<Shared>,
}

impl RuntimeApi {
    /// Serves over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        RuntimeApi { shared }
    }

    fn status(&self, err: Error) -> Status {
        err.to_status(self.shared.config.retry_hint)
    }
}

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

#[tonic::async_trait]
impl RuntimeService for RuntimeApi {
    type GenerateStream = GenerateStream;
    type WatchKvEventsStream = BatchStream<pb::WatchKvEventsResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // Draining: no new generation (the running ones finish); the caller retries elsewhere.
        // The model label: a configured key, else `other` (callers must not create series).
        let model = match self.shared.models.get(&request.get_ref().model) {
            Ok(model) => model.spec.key.clone(),
            Err(_) => "other".to_owned(),
        };
        if self.shared.draining.is_cancelled() {
            self.shared.metrics.requests.with_label_values(&[&model, "shed"]).inc();
            return Err(self.status(Error::ShuttingDown));
        }
        let timeout = serving::deadline::grpc_timeout(request.metadata());
        let owner = serving::auth::Caller::of(&request).map(|c| c.identity);
        generate::Plan::new(&self.shared.models, request.into_inner())
            .and_then(|plan| generate::start(&self.shared, plan, timeout, owner))
            .map(Response::new)
            .map_err(|e| {
                // Refused before it started: load shed (a capacity signal) is counted apart from the
                // caller's mistakes (invalid, unknown model, duplicate id).
                let outcome = match e {
                    Error::Overloaded { .. } | Error::ShuttingDown => "shed",
                    _ => "invalid",
                };
                self.shared.metrics.requests.with_label_values(&[&model, outcome]).inc();
                self.status(e)
            })
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let config = &self.shared.config;
        let device = &config.device;
        let models = self.shared.models.iter().map(|m| model_info(config, m)).collect();
        let device = pb::DeviceInfo {
            name: device.name.clone(),
            memory_bytes: device.memory_bytes,
            bandwidth_bytes_per_second: device.bandwidth_bytes_per_s,
            flops_per_second: device.flops_per_s,
            scheduler: config.scheduler.name().to_owned(),
            max_batch_size: config.max_batch_size as u32,
            max_batched_tokens: config.max_batched_tokens,
            kv_block_tokens: config.kv_block_tokens,
            usable_memory_bytes: self.shared.device_memory.usable(),
            weights_bytes: self.shared.device_memory.held(Use::Weights),
            activations_bytes: self.shared.device_memory.held(Use::Activations),
            kv_cache_bytes: self.shared.device_memory.held(Use::KvCache),
        };
        Ok(Response::new(pb::ListModelsResponse { models, device: Some(device) }))
    }

    async fn watch_kv_events(
        &self,
        request: Request<pb::WatchKvEventsRequest>,
    ) -> Result<Response<Self::WatchKvEventsStream>, Status> {
        let request = request.into_inner();
        if request.model.is_empty() {
            return Err(
                self.status(Error::invalid("model", "is required; ListModels shows the configured models"))
            );
        }
        let model = self.shared.models.get(&request.model).map_err(|e| self.status(e))?;
        let (hub, slot) = self.shared.kv_subscription(model.lane)?;
        let subscription = hub
            .subscribe(request.start_sequence_number)
            .map_err(|err| Status::out_of_range(err.to_string()))?;
        let sent = self.shared.metrics.kv_event_batches_sent.clone();
        let block_tokens = hub.block_tokens();
        Ok(Response::new(BatchStream::new(subscription, slot, sent, move |batch| {
            v1_batch(batch, block_tokens)
        })))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let caller = serving::auth::Caller::of(&request);
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(self.status(Error::invalid("request_id", "is required")));
        }
        if !crate::generate::is_valid_request_id(&id) {
            return Err(self.status(Error::invalid("request_id", crate::generate::request_id_rule())));
        }
        let who = caller.as_ref().map(|c| &*c.identity);
        let admin = caller.as_ref().is_some_and(|c| c.has("admin"));
        let was_queued = self.shared.executor.cancel(&id, who, admin).map_err(|e| self.status(e))?;
        tracing::info!(request_id = %id, was_queued, "generation cancelled");
        Ok(Response::new(pb::CancelResponse { was_queued }))
    }
}

/// What ListModels says of one model: its size, and its costs on this device at batch 1.
fn model_info(config: &crate::Config, model: &crate::models::Model) -> pb::ModelInfo {
    let spec = &model.spec;
    let roofline = Roofline::new(&config.device, &spec.arch);
    let decode = roofline.step([Work { tokens: 1, context: 1 }]);
    let chunk = 512u32.min(spec.max_prompt_tokens);
    let prefill = roofline.step([Work { tokens: chunk, context: 0 }]).gpu / chunk;
    pb::ModelInfo {
        key: spec.key.clone(),
        engine: spec.mock_lm.name().to_owned(),
        loaded: model.is_loaded(),
        uniform_bytes: spec.arch.weight_bytes(),
        kv_cache_bytes_per_token: spec.arch.kv_bytes_per_token(),
        activation_bytes_per_token: spec.arch.activation_bytes_per_token(),
        max_tokens_limit: spec.max_tokens_limit,
        max_prompt_tokens: spec.max_prompt_tokens,
        prefill_per_token: duration(prefill),
        cpu_per_token: duration(decode.cpu),
        gpu_per_token: duration(decode.gpu),
        parameters: spec.arch.parameters,
        layers: spec.arch.layers,
        context_length: spec.arch.context_length,
        decode_floor: duration(Roofline::weights_floor(&config.device, &spec.arch)),
    }
}

/// The roles of `runtime.v1.RuntimeService`'s and `vllm.grpc.engine.VllmEngine`'s methods:
/// `client` generates, lists models and cancels (aborts) its own generations; `admin` may also
/// cancel anyone's.
#[derive(Debug, Clone, Copy)]
pub struct RuntimePolicy;

impl serving::auth::Policy for RuntimePolicy {
    fn roles(&self) -> &'static [&'static str] {
        &["admin", "client"]
    }

    fn required(&self, path: &str) -> Option<&'static [&'static str]> {
        // The engine dialect is the same door by other words: the same roles.
        let generation = path.starts_with("/runtime.v1.RuntimeService/")
            || path.starts_with("/vllm.grpc.engine.VllmEngine/");
        Some(if generation { &["admin", "client"] } else { &[] })
    }
}
