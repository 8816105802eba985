//! The engine dialect: `vllm.grpc.engine.VllmEngine`, the protocol of `vllm serve --grpc` that
//! gateways such as the Shepherd Model Gateway route to, served on the same port as
//! `runtime.v1.RuntimeService`. A second front door onto the same device: each call is
//! translated into the core's terms, run by the same code as `runtime.v1` (admission, request
//! ids per identity, limits, scheduler, KV blocks, leases, traces, metrics), and its answer
//! translated back. Nothing here decides anything the core does not.

pub(crate) mod info;
mod kv_events;
mod reply;
pub(crate) mod request;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use proto::{
    smg::grpc::common as smg,
    vllm::grpc::engine::{self as vllm, vllm_engine_server::VllmEngine},
};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub use self::info::SERVER_TYPE;
use self::{info::Throughput, kv_events::DialectBatches, reply::Reply};
use crate::{error::Error, generate, kv_events::BatchStream, models::Model, state::Shared, tokenizer::zip};

/// The `VllmEngine` implementation, serving one model (`--engine-model`): the protocol names
/// none.
#[derive(Debug)]
pub struct EngineApi {
    shared: Arc<Shared>,
    model: Arc<Model>,
    /// Whether health says SERVING: HealthCheck answers the same as grpc.health.
    ready: Arc<AtomicBool>,
    started: Instant,
    /// Unix time of the last Generate, as f64 bits.
    last_receive: AtomicU64,
    throughput: Throughput,
    /// The model's tokenizer bundle as GetTokenizer serves it: zipped once, so every call (and
    /// every gateway) gets the same bytes and the same SHA-256.
    zip: Vec<u8>,
}

impl EngineApi {
    /// Serves `model` over `shared`; `ready` is the server's health.
    pub fn new(shared: Arc<Shared>, model: Arc<Model>, ready: Arc<AtomicBool>) -> Self {
        EngineApi {
            zip: model.bundle.zip(),
            shared,
            model,
            ready,
            started: Instant::now(),
            last_receive: AtomicU64::new(0f64.to_bits()),
            throughput: Throughput::default(),
        }
    }

    fn status(&self, err: Error) -> Status {
        err.to_status(self.shared.config.retry_hint)
    }

    fn count(&self, outcome: &str) {
        self.shared.metrics.requests.with_label_values(&[&self.model.spec.key, outcome]).inc();
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

#[tonic::async_trait]
impl VllmEngine for EngineApi {
    type GenerateStream = Reply;
    type GetTokenizerStream = ReceiverStream<Result<smg::GetTokenizerChunk, Status>>;
    type SubscribeKvEventsStream = BatchStream<smg::KvEventBatch>;

    async fn generate(
        &self,
        request: Request<vllm::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.last_receive.store(unix_now().to_bits(), Ordering::Relaxed);
        // Draining: no new generation, as on runtime.v1; the gateway retries another worker.
        if self.shared.draining.is_cancelled() {
            self.count("shed");
            return Err(self.status(Error::ShuttingDown));
        }
        let timeout = serving::deadline::grpc_timeout(request.metadata());
        let owner = serving::auth::Caller::of(&request).map(|c| c.identity);
        let translated = request::translate(&self.model, request.into_inner()).map_err(|e| {
            self.count("invalid");
            self.status(e)
        })?;
        let (prompt_tokens, stop_ids) =
            (translated.plan.prompt_tokens, translated.plan.stops.stop_token_ids.clone());
        let inner = generate::start(&self.shared, translated.plan, timeout, owner).map_err(|e| {
            self.count(match e {
                Error::Overloaded { .. } | Error::ShuttingDown => "shed",
                _ => "invalid",
            });
            self.status(e)
        })?;
        Ok(Response::new(Reply::new(inner, translated.stream, prompt_tokens, stop_ids)))
    }

    async fn embed(&self, _: Request<vllm::EmbedRequest>) -> Result<Response<vllm::EmbedResponse>, Status> {
        Err(Status::unimplemented("Embed: the simulated models are generative only; use Generate"))
    }

    async fn health_check(
        &self,
        _: Request<vllm::HealthCheckRequest>,
    ) -> Result<Response<vllm::HealthCheckResponse>, Status> {
        let (healthy, message) = if self.shared.draining.is_cancelled() {
            (false, "draining: shutting down, new generations are refused")
        } else if self.ready.load(Ordering::Relaxed) {
            (true, "serving")
        } else {
            (false, "not ready: memory-service unreachable or the model's memory not granted yet")
        };
        Ok(Response::new(vllm::HealthCheckResponse { healthy, message: message.into() }))
    }

    async fn abort(
        &self,
        request: Request<vllm::AbortRequest>,
    ) -> Result<Response<vllm::AbortResponse>, Status> {
        let caller = serving::auth::Caller::of(&request);
        let ids = request.into_inner().request_ids;
        if ids.is_empty() {
            return Err(self.status(Error::invalid("request_ids", "is empty; name the requests to abort")));
        }
        if let Some(bad) = ids.iter().find(|id| id.is_empty() || !generate::is_valid_request_id(id)) {
            let why = format!("{:?} {}", serving::echo::echo(bad), generate::request_id_rule());
            return Err(self.status(Error::invalid("request_ids", why)));
        }
        let who = caller.as_ref().map(|c| &*c.identity);
        let admin = caller.as_ref().is_some_and(|c| c.has("admin"));
        let released = self.shared.executor.abort(ids.iter().map(String::as_str), who, admin);
        let count = released.len();
        // The reply waits until the device has dropped each sequence and freed its blocks (it
        // does so at its next iteration, woken by the cancellation), so a caller that aborts and
        // then reads GetLoads or memory-service sees the memory back.
        for token in released {
            token.cancelled().await;
        }
        tracing::info!(requests = ids.len(), aborted = count, "generations aborted");
        Ok(Response::new(vllm::AbortResponse {}))
    }

    async fn get_model_info(
        &self,
        _: Request<vllm::GetModelInfoRequest>,
    ) -> Result<Response<vllm::GetModelInfoResponse>, Status> {
        Ok(Response::new(info::model_info(&self.model)))
    }

    async fn get_server_info(
        &self,
        _: Request<vllm::GetServerInfoRequest>,
    ) -> Result<Response<vllm::GetServerInfoResponse>, Status> {
        let last = f64::from_bits(self.last_receive.load(Ordering::Relaxed));
        Ok(Response::new(info::server_info(&self.shared, self.started, last)))
    }

    async fn get_loads(
        &self,
        request: Request<vllm::GetLoadsRequest>,
    ) -> Result<Response<vllm::GetLoadsResponse>, Status> {
        // `include` asks for optional sections; like vLLM, only "core" exists and the rest are
        // left out, which the gateway expects (it asks for all of them from every engine).
        if let Some(rank) = request.get_ref().dp_rank.filter(|&r| r != 0) {
            let why = format!("{rank}: this engine has one data-parallel rank, 0");
            return Err(self.status(Error::invalid("dp_rank", why)));
        }
        Ok(Response::new(info::loads(&self.shared, &self.model, &self.throughput)))
    }

    async fn get_tokenizer(
        &self,
        _: Request<smg::GetTokenizerRequest>,
    ) -> Result<Response<Self::GetTokenizerStream>, Status> {
        let chunks = zip::chunks(&self.zip, zip::CHUNK);
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for (data, sha256) in chunks {
            // The channel holds every chunk: sending cannot wait or fail while `rx` lives.
            let _ = tx.try_send(Ok(smg::GetTokenizerChunk { data, sha256 }));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn subscribe_kv_events(
        &self,
        request: Request<smg::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        let start = request.into_inner().start_sequence_number;
        let (hub, slot) = self.shared.kv_subscription(self.model.lane)?;
        let subscription = hub.subscribe(start).map_err(|err| Status::out_of_range(err.to_string()))?;
        let sent = self.shared.metrics.kv_event_batches_sent.clone();
        let mut dialect = DialectBatches::new(hub.block_tokens());
        Ok(Response::new(BatchStream::new(subscription, slot, sent, move |batch| dialect.convert(batch))))
    }
}
