//! `runtime.v1.RuntimeService/WatchKvEvents`: a model's batches in runtime.v1's own shapes.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::{Duration, UNIX_EPOCH},
};

use proto::runtime::v1 as pb;
use tokio_stream::Stream;
use tonic::Status;

use super::{KvBatch, KvSubscription, SubscriberSlot};
use crate::scheduler::KvEvent;

/// One WatchKvEvents stream.
#[derive(Debug)]
pub struct WatchStream {
    inner: KvSubscription,
    _slot: SubscriberSlot,
    block_tokens: u32,
    sent: prometheus::IntCounter,
    failed: bool,
}

impl WatchStream {
    /// Streams `inner`, holding `slot`; each batch sent counts in `sent`.
    pub fn new(
        inner: KvSubscription,
        slot: SubscriberSlot,
        block_tokens: u32,
        sent: prometheus::IntCounter,
    ) -> Self {
        WatchStream { inner, _slot: slot, block_tokens, sent, failed: false }
    }
}

fn convert(batch: &KvBatch, block_tokens: u32) -> pb::WatchKvEventsResponse {
    let events = batch
        .events
        .iter()
        .map(|event| {
            let kind = match event {
                KvEvent::Stored { hash, parent, ids } => pb::kv_event::Kind::Stored(pb::KvBlockStored {
                    block_hash: *hash,
                    parent_block_hash: *parent,
                    token_ids: ids.to_vec(),
                }),
                KvEvent::Removed(hashes) => {
                    pb::kv_event::Kind::Removed(pb::KvBlocksRemoved { block_hashes: hashes.clone() })
                }
                KvEvent::Cleared => pb::kv_event::Kind::Cleared(pb::KvCacheCleared {}),
            };
            pb::KvEvent { kind: Some(kind) }
        })
        .collect();
    let time = UNIX_EPOCH + Duration::from_secs_f64(batch.timestamp.max(0.0));
    pb::WatchKvEventsResponse {
        sequence_number: batch.sequence,
        time: Some(prost_types::Timestamp::from(time)),
        block_tokens,
        events,
    }
}

impl Stream for WatchStream {
    type Item = Result<pb::WatchKvEventsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            None => Poll::Ready(None),
            Some(Ok(batch)) => {
                self.sent.inc();
                Poll::Ready(Some(Ok(convert(&batch, self.block_tokens))))
            }
            Some(Err(err)) => {
                self.failed = true;
                Poll::Ready(Some(Err(Status::out_of_range(err.to_string()))))
            }
        }
    }
}
