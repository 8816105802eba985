//! The two ways into a runtime's engine: its engine dialect over gRPC (a live service, or one
//! served in-process), or the offline simulator's device with no network at all. A replay paces
//! and times requests the same way through either.

use std::sync::Arc;

use proto::vllm::grpc::engine::{
    GenerateRequest, GetModelInfoRequest, GetModelInfoResponse, SamplingParams, TokenizedInput,
    generate_request::Input, generate_response::Response, vllm_engine_client::VllmEngineClient,
};
use runtime_service::offline::Offline;
use tonic::transport::Channel;

use crate::{
    drive::{DriveError, Shared},
    record::{Chunk, Failure, RequestRecord},
    workload::PlannedRequest,
};

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) enum Door {
    /// The engine dialect over gRPC, over one or more HTTP/2 connections used in turn.
    Grpc(Vec<VllmEngineClient<Channel>>),
    /// The offline simulator.
    Offline(Arc<Offline>),
}

impl Door {
    /// The served model: `vocab_size` bounds the prompt token ids a plan may hold.
    pub(crate) async fn model_info(&self) -> Result<GetModelInfoResponse, DriveError> {
        match self {
            Door::Grpc(clients) => {
                let mut client = clients[0].clone();
                let reply =
                    client.get_model_info(GetModelInfoRequest {}).await.map_err(DriveError::ModelInfo)?;
                Ok(reply.into_inner())
            }
            Door::Offline(offline) => Ok(offline.model_info()),
        }
    }

    /// Sends request `planned` (the `n`th sent) and times what comes back into `record`.
    pub(crate) async fn exchange(
        &self,
        n: usize,
        planned: &PlannedRequest,
        record: &mut RequestRecord,
        shared: &Shared,
    ) -> Result<(), Failure> {
        let message = message(planned, &shared.options.request_id_prefix);
        match self {
            Door::Grpc(clients) => {
                let mut client = clients[n % clients.len()].clone();
                exchange_grpc(&mut client, message, record, shared).await
            }
            Door::Offline(offline) => {
                let timed = offline.generate(message, |_| {
                    record.chunks.push(Chunk { at: shared.now(), tokens: 1 });
                    record.output_tokens += 1;
                });
                // The live service's status for the same failure: the same code and message.
                let report =
                    timed.await.map_err(|e| Failure::from(e.to_status(std::time::Duration::ZERO)))?;
                record.completion_tokens = Some(report.generated);
                record.cached_tokens = report.cached_tokens;
                record.finish_reason = Some(if report.stopped { "stop" } else { "length" }.into());
                Ok(())
            }
        }
    }
}

/// The engine-dialect request for `planned`: its exact token ids, `max_tokens`, `ignore_eos`.
fn message(planned: &PlannedRequest, id_prefix: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("{id_prefix}{}", planned.index),
        input: Some(Input::Tokenized(TokenizedInput {
            original_text: String::new(),
            input_ids: planned.prompt.clone(),
        })),
        sampling_params: Some(SamplingParams {
            max_tokens: Some(planned.max_tokens),
            ignore_eos: planned.ignore_eos,
            // Greedy, as vLLM's benchmark_serving.py sends: lengths then depend on ignore_eos only.
            temperature: Some(0.0),
            ..SamplingParams::default()
        }),
        stream: true,
        ..GenerateRequest::default()
    }
}

/// Reads the stream to its GenerateComplete, timing each chunk as it arrives.
async fn exchange_grpc(
    client: &mut VllmEngineClient<Channel>,
    message: GenerateRequest,
    record: &mut RequestRecord,
    shared: &Shared,
) -> Result<(), Failure> {
    let mut stream = client.generate(message).await?.into_inner();
    while let Some(reply) = stream.message().await? {
        match reply.response {
            // A chunk without tokens says nothing about token timing (vLLM's benchmark skips
            // empty deltas too).
            Some(Response::Chunk(chunk)) if !chunk.token_ids.is_empty() => {
                let tokens = chunk.token_ids.len() as u32;
                record.chunks.push(Chunk { at: shared.now(), tokens });
                record.output_tokens += tokens;
            }
            Some(Response::Complete(done)) => {
                record.completion_tokens = Some(done.completion_tokens);
                record.cached_tokens = done.cached_tokens;
                let aborted = done.finish_reason == "abort";
                record.finish_reason = Some(done.finish_reason);
                return if aborted { Err(Failure::Aborted) } else { Ok(()) };
            }
            Some(Response::Chunk(_)) | None => {}
        }
    }
    Err(Failure::Incomplete)
}
