//! A subscription told in a front door's own messages: one generic stream for both doors, so
//! the rules (count each batch sent, end with OUT_OF_RANGE on a subscriber that fell behind,
//! hold a subscriber's place until dropped) live once.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio_stream::Stream;
use tonic::Status;

use super::{KvBatch, KvSubscription, SubscriberSlot};

/// Batches of `inner`, each turned into `T` by `convert`.
pub struct BatchStream<T> {
    inner: KvSubscription,
    _slot: SubscriberSlot,
    sent: prometheus::IntCounter,
    convert: Box<dyn FnMut(&KvBatch) -> T + Send>,
    failed: bool,
}

impl<T> BatchStream<T> {
    /// Streams `inner` through `convert`, holding `slot`; each batch sent counts in `sent`.
    pub fn new(
        inner: KvSubscription,
        slot: SubscriberSlot,
        sent: prometheus::IntCounter,
        convert: impl FnMut(&KvBatch) -> T + Send + 'static,
    ) -> Self {
        BatchStream { inner, _slot: slot, sent, convert: Box::new(convert), failed: false }
    }
}

impl<T> std::fmt::Debug for BatchStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStream").field("inner", &self.inner).field("failed", &self.failed).finish()
    }
}

impl<T> Stream for BatchStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            None => Poll::Ready(None),
            Some(Ok(batch)) => {
                self.sent.inc();
                Poll::Ready(Some(Ok((self.convert)(&batch))))
            }
            // Fell behind the replay buffer: told, and the stream ends; a resume from its last
            // number is refused the same way, a subscription from 0 starts over from the content.
            Some(Err(err)) => {
                self.failed = true;
                Poll::Ready(Some(Err(Status::out_of_range(err.to_string()))))
            }
        }
    }
}
