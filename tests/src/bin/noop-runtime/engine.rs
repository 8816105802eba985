//! The no-op's engine dialect: `VllmEngine.Generate` as the production server words it (one
//! `GenerateStreamChunk` per token, then a `GenerateComplete` with every output id); the other
//! calls are not served.

use proto::{
    smg::grpc::common as smg,
    vllm::grpc::engine::{
        self as vllm, GenerateComplete, GenerateStreamChunk,
        generate_response::Response as Message,
        vllm_engine_server::{VllmEngine, VllmEngineServer},
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Noop, Out, STREAM_BUFFER, not_served};

pub type Reply = Result<vllm::GenerateResponse, Status>;

/// Prompt tokens every reply reports (the benchmark's prompts are this long).
const PROMPT_TOKENS: u32 = 32;

fn id(index: u32) -> u32 {
    1000 + index
}

/// The chunk carrying token `index`.
pub fn chunk(index: u32) -> vllm::GenerateResponse {
    let chunk = GenerateStreamChunk {
        token_ids: vec![id(index)],
        prompt_tokens: PROMPT_TOKENS,
        completion_tokens: index + 1,
        cached_tokens: 0,
        ..Default::default()
    };
    vllm::GenerateResponse { response: Some(Message::Chunk(chunk)) }
}

/// The last message of a stream of `tokens`.
pub fn complete(tokens: u32) -> vllm::GenerateResponse {
    let complete = GenerateComplete {
        output_ids: (0..tokens).map(id).collect(),
        finish_reason: "length".into(),
        prompt_tokens: PROMPT_TOKENS,
        completion_tokens: tokens,
        cached_tokens: 0,
        ..Default::default()
    };
    vllm::GenerateResponse { response: Some(Message::Complete(complete)) }
}

pub fn server(noop: Noop) -> VllmEngineServer<Noop> {
    VllmEngineServer::new(noop)
}

#[tonic::async_trait]
impl VllmEngine for Noop {
    type GenerateStream = ReceiverStream<Reply>;
    type GetTokenizerStream = ReceiverStream<Result<smg::GetTokenizerChunk, Status>>;
    type SubscribeKvEventsStream = ReceiverStream<Result<smg::KvEventBatch, Status>>;

    async fn generate(
        &self,
        request: Request<vllm::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let max_tokens = request.into_inner().sampling_params.and_then(|p| p.max_tokens).unwrap_or(16);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.start(Out::Engine(tx), max_tokens);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn embed(&self, _: Request<vllm::EmbedRequest>) -> Result<Response<vllm::EmbedResponse>, Status> {
        not_served()
    }
    async fn health_check(
        &self,
        _: Request<vllm::HealthCheckRequest>,
    ) -> Result<Response<vllm::HealthCheckResponse>, Status> {
        not_served()
    }
    async fn abort(&self, _: Request<vllm::AbortRequest>) -> Result<Response<vllm::AbortResponse>, Status> {
        not_served()
    }
    async fn get_model_info(
        &self,
        _: Request<vllm::GetModelInfoRequest>,
    ) -> Result<Response<vllm::GetModelInfoResponse>, Status> {
        not_served()
    }
    async fn get_server_info(
        &self,
        _: Request<vllm::GetServerInfoRequest>,
    ) -> Result<Response<vllm::GetServerInfoResponse>, Status> {
        not_served()
    }
    async fn get_loads(
        &self,
        _: Request<vllm::GetLoadsRequest>,
    ) -> Result<Response<vllm::GetLoadsResponse>, Status> {
        not_served()
    }
    async fn get_tokenizer(
        &self,
        _: Request<smg::GetTokenizerRequest>,
    ) -> Result<Response<Self::GetTokenizerStream>, Status> {
        not_served()
    }
    async fn subscribe_kv_events(
        &self,
        _: Request<smg::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        not_served()
    }
}
