//! The core's Generate stream told in the dialect: one `GenerateStreamChunk` per token (each is
//! one device step of the sequence), then `GenerateComplete`; without `stream`, only the latter.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use proto::{
    runtime::v1::{self as pb, generate_response::Item},
    vllm::grpc::engine::{
        self as vllm, GenerateComplete, GenerateStreamChunk, generate_complete::MatchedStop,
        generate_response::Response,
    },
};
use tokio_stream::Stream;
use tonic::{Code, Status};

use crate::generate::GenerateStream;

/// vLLM's finish reasons, as the gateway maps them to OpenAI's.
const LENGTH: &str = "length";
const STOP: &str = "stop";
const ABORT: &str = "abort";

/// The dialect's response stream over one generation. Dropping it drops the core's stream,
/// which ends the generation and frees its blocks: a gateway that hangs up aborts.
#[derive(Debug)]
pub struct Reply {
    inner: GenerateStream,
    stream: bool,
    prompt_tokens: u32,
    stop_token_ids: Vec<u32>,
    output: Vec<u32>,
    done: bool,
}

impl Reply {
    /// Tells `inner` in the dialect; `stream` false sends only the final message.
    pub fn new(inner: GenerateStream, stream: bool, prompt_tokens: u32, stop_token_ids: Vec<u32>) -> Self {
        Reply { inner, stream, prompt_tokens, stop_token_ids, output: Vec::new(), done: false }
    }

    /// The final message; `cached_tokens` is known from the core's summary (an aborted stream has
    /// none: 0).
    fn complete(
        &self,
        finish_reason: &str,
        prompt_tokens: u32,
        cached_tokens: u32,
    ) -> vllm::GenerateResponse {
        let last = self.output.last().copied();
        // The core ends a sequence right after a stop token (and never after another token on
        // "stop"), so a "stop" whose last token is a stop token was that token's doing.
        let matched_stop = last
            .filter(|id| finish_reason == STOP && self.stop_token_ids.contains(id))
            .map(MatchedStop::MatchedTokenId);
        let complete = GenerateComplete {
            output_ids: self.output.clone(),
            finish_reason: finish_reason.to_owned(),
            prompt_tokens,
            completion_tokens: self.output.len() as u32,
            cached_tokens,
            matched_stop,
            ..Default::default()
        };
        vllm::GenerateResponse { response: Some(Response::Complete(complete)) }
    }
}

impl Stream for Reply {
    type Item = Result<vllm::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let Some(next) = ready!(Pin::new(&mut self.inner).poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let item = match next {
                Ok(pb::GenerateResponse { item: Some(item) }) => item,
                Ok(pb::GenerateResponse { item: None }) => continue,
                // Abort (or runtime.v1's Cancel of the same id) ends the stream as vLLM's does:
                // a final message saying "abort", with what was generated until then.
                Err(status) if status.code() == Code::Cancelled => {
                    self.done = true;
                    let prompt_tokens = self.prompt_tokens;
                    return Poll::Ready(Some(Ok(self.complete(ABORT, prompt_tokens, 0))));
                }
                Err(status) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            };
            match item {
                Item::Token(token) => {
                    self.output.push(token.token_id);
                    if !self.stream {
                        continue;
                    }
                    let chunk = GenerateStreamChunk {
                        token_ids: vec![token.token_id],
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: self.output.len() as u32,
                        cached_tokens: 0,
                        ..Default::default()
                    };
                    return Poll::Ready(Some(Ok(vllm::GenerateResponse {
                        response: Some(Response::Chunk(chunk)),
                    })));
                }
                Item::Summary(summary) => {
                    self.done = true;
                    let reason = match summary.finish_reason() {
                        pb::FinishReason::Stop => STOP,
                        _ => LENGTH,
                    };
                    let (prompt, cached) = (summary.prompt_tokens, summary.cached_tokens);
                    return Poll::Ready(Some(Ok(self.complete(reason, prompt, cached))));
                }
            }
        }
    }
}
