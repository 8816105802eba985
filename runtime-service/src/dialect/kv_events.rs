//! `SubscribeKvEvents`: the served model's prefix-cache batches in the shapes of the published
//! `common.proto` (KvEventBatch of KvCacheEvent: stored, removed, cleared), as routers read
//! them. Block hashes are the cache's 64-bit chained hashes, as int64 (the same bits).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use proto::smg::grpc::common as smg;
use tokio_stream::Stream;
use tonic::Status;

use crate::{
    kv_events::{KvBatch, KvSubscription, SubscriberSlot},
    scheduler::KvEvent,
};

/// One subscriber's stream; its slot among the open subscriptions goes with it.
#[derive(Debug)]
pub struct KvEventStream {
    inner: KvSubscription,
    _slot: SubscriberSlot,
    block_tokens: i32,
    next_event_id: u64,
    failed: bool,
    sent: prometheus::IntCounter,
}

impl KvEventStream {
    /// Streams `inner`, holding `slot`; each batch sent counts in `sent`.
    pub fn new(
        inner: KvSubscription,
        slot: SubscriberSlot,
        block_tokens: u32,
        sent: prometheus::IntCounter,
    ) -> Self {
        let block_tokens = i32::try_from(block_tokens).unwrap_or(i32::MAX);
        KvEventStream { inner, _slot: slot, block_tokens, next_event_id: 1, failed: false, sent }
    }

    fn convert(&mut self, batch: &KvBatch) -> smg::KvEventBatch {
        let events = batch
            .events
            .iter()
            .map(|event| {
                let id = self.next_event_id;
                self.next_event_id += 1;
                let data = match event {
                    KvEvent::Stored { hash, parent, ids } => {
                        smg::kv_cache_event::Data::Stored(smg::KvBlocksStored {
                            blocks: vec![smg::KvBlock {
                                block_hash: *hash as i64,
                                token_ids: ids.to_vec(),
                                block_size: self.block_tokens,
                                ..Default::default()
                            }],
                            parent_block_hash: parent.map(|p| p as i64),
                        })
                    }
                    KvEvent::Removed(hashes) => smg::kv_cache_event::Data::Removed(smg::KvBlocksRemoved {
                        block_hashes: hashes.iter().map(|&h| h as i64).collect(),
                        cache_level: None,
                    }),
                    KvEvent::Cleared => smg::kv_cache_event::Data::Cleared(smg::KvCacheCleared {}),
                };
                smg::KvCacheEvent { event_id: id, data: Some(data) }
            })
            .collect();
        smg::KvEventBatch {
            sequence_number: batch.sequence,
            timestamp: batch.timestamp,
            events,
            dp_rank: None,
        }
    }
}

impl Stream for KvEventStream {
    type Item = Result<smg::KvEventBatch, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            None => Poll::Ready(None),
            Some(Ok(batch)) => {
                self.sent.inc();
                Poll::Ready(Some(Ok(self.convert(&batch))))
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
