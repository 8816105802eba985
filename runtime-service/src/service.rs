//! The gRPC shell: `runtime.v1.RuntimeService` over [`Shared`].

use std::sync::Arc;

use proto::runtime::v1::{self as pb, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    generate::{self, GenerateStream},
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

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if self.shared.shutdown.is_cancelled() {
            self.shared.metrics.requests.with_label_values(&["rejected"]).inc();
            return Err(self.status(Error::ShuttingDown));
        }
        let timeout = serving::deadline::grpc_timeout(request.metadata());
        generate::start(&self.shared, request.into_inner(), timeout).map(Response::new).map_err(|e| {
            // Refused before it started: invalid, unknown model, duplicate id, or shed.
            self.shared.metrics.requests.with_label_values(&["rejected"]).inc();
            self.status(e)
        })
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .shared
            .models
            .iter()
            .map(|m| {
                let spec = &m.spec;
                pb::ModelInfo {
                    key: spec.key.clone(),
                    engine: spec.engine.name().to_owned(),
                    loaded: m.is_loaded(),
                    uniform_bytes: spec.memory.uniform_bytes,
                    kv_cache_bytes_per_token: spec.memory.kv_bytes_per_token,
                    activation_bytes_per_token: spec.memory.activation_bytes_per_token,
                    max_tokens_limit: spec.max_tokens_limit,
                    max_prompt_tokens: spec.max_prompt_tokens,
                    prefill_per_token: duration(spec.latency.prefill_per_token),
                    cpu_per_token: duration(spec.latency.cpu_per_token),
                    gpu_per_token: duration(spec.latency.gpu_per_token),
                }
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(self.status(Error::invalid("request_id", "is required")));
        }
        let was_queued = self.shared.executor.cancel(&id).map_err(|e| self.status(e))?;
        tracing::info!(request_id = %id, was_queued, "generation cancelled");
        Ok(Response::new(pb::CancelResponse { was_queued }))
    }
}
