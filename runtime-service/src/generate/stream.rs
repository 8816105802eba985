//! The response half of a Generate call: the tokens, then the outcome, always last.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use proto::runtime::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;

/// One message of a Generate stream.
pub type Message = Result<pb::GenerateResponse, Status>;

/// The tokens, then the outcome (the summary or the error status). The outcome has its own slot
/// instead of a place in the bounded token buffer: a generation cut while its client was not
/// reading (a full buffer) still ends with its error status once the client reads, never with a
/// silent OK after a truncated stream, and the generation's task never waits to hand it over.
#[derive(Debug)]
pub struct GenerateStream {
    tokens: ReceiverStream<Message>,
    outcome: Option<oneshot::Receiver<Message>>,
}

/// Where a generation puts its tokens and its outcome.
#[derive(Debug)]
pub struct Sink {
    pub tokens: mpsc::Sender<Message>,
    pub outcome: oneshot::Sender<Message>,
}

/// A stream and its sink, with room for `buffer` tokens.
pub fn channel(buffer: usize) -> (Sink, GenerateStream) {
    let (tokens_tx, tokens) = mpsc::channel(buffer);
    let (outcome_tx, outcome) = oneshot::channel();
    let stream = GenerateStream { tokens: ReceiverStream::new(tokens), outcome: Some(outcome) };
    (Sink { tokens: tokens_tx, outcome: outcome_tx }, stream)
}

impl Stream for GenerateStream {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if let Some(token) = ready!(Pin::new(&mut self.tokens).poll_next(cx)) {
            return Poll::Ready(Some(token));
        }
        // Every token is delivered and the sink is gone: the outcome ends the stream. None left
        // (the client had gone, or the task died) is still an error, never an OK without a
        // summary.
        let Some(outcome) = self.outcome.as_mut() else { return Poll::Ready(None) };
        let outcome = ready!(Pin::new(outcome).poll(cx))
            .unwrap_or_else(|_| Err(Status::internal("the generation ended without an outcome")));
        self.outcome = None;
        Poll::Ready(Some(outcome))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn token(n: u32) -> Message {
        let token = pb::Token { index: n, ..Default::default() };
        Ok(pb::GenerateResponse { item: Some(pb::generate_response::Item::Token(token)) })
    }

    #[tokio::test]
    async fn a_full_buffer_still_ends_with_the_error_status_after_its_tokens() {
        let (sink, stream) = channel(2);
        sink.tokens.try_send(token(0)).unwrap();
        sink.tokens.try_send(token(1)).unwrap();
        assert!(sink.tokens.try_send(token(2)).is_err(), "the buffer is full");
        // The generation ends: its outcome goes in its slot and its token sender goes away.
        let Sink { tokens, outcome } = sink;
        outcome.send(Err(Status::deadline_exceeded("cut"))).unwrap();
        drop(tokens);
        let all: Vec<Message> = stream.collect().await;
        assert_eq!(all.len(), 3);
        assert!(all[..2].iter().all(Result::is_ok));
        assert_eq!(all[2].as_ref().unwrap_err().code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn no_outcome_ends_the_stream_with_an_error_after_its_tokens() {
        let (sink, stream) = channel(2);
        sink.tokens.try_send(token(0)).unwrap();
        drop(sink);
        let all: Vec<Message> = stream.collect().await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }
}
