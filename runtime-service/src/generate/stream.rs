//! The response half of a Generate call: the tokens, straight from the device, then the outcome,
//! always last.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use proto::runtime::v1::{self as pb, generate_response::Item};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::Stream;
use tonic::Status;

use crate::{
    config::TimeScale,
    core::{Emitted, RoomSignal, TOKEN_BUFFER},
};

/// One message of a Generate stream.
pub type Message = Result<pb::GenerateResponse, Status>;

/// The tokens, then the outcome (the summary or the error status). The device sends each token
/// here itself: one hop, no task in between, and the token becomes a message only when the
/// client's HTTP/2 stream takes it. The outcome has its own slot instead of a place in the
/// bounded token buffer: a generation cut while its client was not reading (a full buffer) still
/// ends with its error status once the client reads, never with a silent OK after a truncated
/// stream, and the generation's task never waits to hand it over.
#[derive(Debug)]
pub struct GenerateStream {
    tokens: mpsc::Receiver<Emitted>,
    outcome: Option<oneshot::Receiver<Message>>,
    room: RoomSignal,
    /// When the call started: each token's `elapsed` counts from here.
    started: Instant,
    scale: TimeScale,
}

/// Where a generation's tokens (the device's, through a clone) and its outcome go.
#[derive(Debug)]
pub struct Sink {
    pub tokens: mpsc::Sender<Emitted>,
    pub outcome: oneshot::Sender<Message>,
}

/// A stream and its sink, with room for [`TOKEN_BUFFER`] tokens; `room` tells the device when a
/// full buffer drains, and tokens report their times from `started` in `scale`'s simulated time.
pub fn channel(room: RoomSignal, started: Instant, scale: TimeScale) -> (Sink, GenerateStream) {
    let (tokens_tx, tokens) = mpsc::channel(TOKEN_BUFFER);
    let (outcome_tx, outcome) = oneshot::channel();
    let stream = GenerateStream { tokens, outcome: Some(outcome), room, started, scale };
    (Sink { tokens: tokens_tx, outcome: outcome_tx }, stream)
}

impl Stream for GenerateStream {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let this = &mut *self;
        if let Some(emitted) = ready!(this.tokens.poll_recv(cx)) {
            this.room.took(&this.tokens);
            let elapsed = this.scale.to_simulated(emitted.at.saturating_duration_since(this.started));
            return Poll::Ready(Some(Ok(token(emitted, elapsed))));
        }
        // Every token is delivered and every sender is gone: the outcome ends the stream. None
        // left (the client had gone, or the task died) is still an error, never an OK without a
        // summary.
        let Some(outcome) = this.outcome.as_mut() else { return Poll::Ready(None) };
        let outcome = ready!(Pin::new(outcome).poll(cx))
            .unwrap_or_else(|_| Err(Status::internal("the generation ended without an outcome")));
        this.outcome = None;
        Poll::Ready(Some(outcome))
    }
}

/// A token as the stream carries it, `elapsed` after the call started.
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_stream::StreamExt;

    use super::*;
    use crate::mock_lm::TokenOut;

    fn emitted(index: u32) -> Emitted {
        let token = TokenOut { id: 7, text: " word".into() };
        Emitted { index, token, gpu_time: Duration::from_millis(1), at: Instant::now() }
    }

    fn channel_for_test() -> (Sink, GenerateStream, Arc<tokio::sync::Notify>) {
        let wake = Arc::new(tokio::sync::Notify::new());
        let (sink, stream) = channel(RoomSignal::new(wake.clone()), Instant::now(), TimeScale::REAL);
        (sink, stream, wake)
    }

    #[tokio::test]
    async fn a_full_buffer_still_ends_with_the_error_status_after_its_tokens() {
        let (sink, stream, _) = channel_for_test();
        for n in 0..TOKEN_BUFFER as u32 {
            sink.tokens.try_send(emitted(n)).unwrap();
        }
        assert!(sink.tokens.try_send(emitted(99)).is_err(), "the buffer is full");
        // The generation ends: its outcome goes in its slot and its token sender goes away.
        let Sink { tokens, outcome } = sink;
        outcome.send(Err(Status::deadline_exceeded("cut"))).unwrap();
        drop(tokens);
        let all: Vec<Message> = stream.collect().await;
        assert_eq!(all.len(), TOKEN_BUFFER + 1);
        assert!(all[..TOKEN_BUFFER].iter().all(Result::is_ok));
        assert_eq!(all[TOKEN_BUFFER].as_ref().unwrap_err().code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn no_outcome_ends_the_stream_with_an_error_after_its_tokens() {
        let (sink, stream, _) = channel_for_test();
        sink.tokens.try_send(emitted(0)).unwrap();
        drop(sink);
        let all: Vec<Message> = stream.collect().await;
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn draining_a_full_buffer_wakes_the_device_once() {
        let (sink, mut stream, wake) = channel_for_test();
        sink.tokens.try_send(emitted(0)).unwrap();
        stream.next().await.expect("a token").expect("ok");
        // Not full before: the device did not pause it, so nobody is told.
        let woken = wake.notified();
        tokio::pin!(woken);
        assert!(futures_poll_once(woken.as_mut()).is_pending());
        for n in 0..TOKEN_BUFFER as u32 {
            sink.tokens.try_send(emitted(n)).unwrap();
        }
        stream.next().await.expect("a token").expect("ok");
        woken.await; // the device, which paused the sequence, hears of the room
    }

    /// Polls `future` once with a no-op waker.
    fn futures_poll_once<F: std::future::Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }
}
