//! `SubscribeKvEvents`: the served model's prefix-cache batches in the shapes of the published
//! `common.proto` (KvEventBatch of KvCacheEvent: stored, removed, cleared), as routers read
//! them. Block hashes are the cache's 64-bit chained hashes, as int64 (the same bits).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use proto::smg::grpc::common as smg;
use tokio_stream::Stream;
use tonic::Status;

use crate::{
    kv_events::{KvBatch, KvSubscription},
    scheduler::KvEvent,
};

/// Subscriptions open at once, per runtime: each holds a replay backlog while it drains.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One subscriber's stream; counts itself out of the open subscriptions when dropped.
#[derive(Debug)]
pub struct KvEventStream {
    inner: KvSubscription,
    open: Arc<AtomicUsize>,
    block_tokens: i32,
    next_event_id: u64,
    failed: bool,
    sent: prometheus::IntCounter,
}

impl KvEventStream {
    /// Counts a new subscriber in; `None` if `MAX_SUBSCRIBERS` are open.
    pub fn open(
        inner: KvSubscription,
        open: Arc<AtomicUsize>,
        block_tokens: u32,
        sent: prometheus::IntCounter,
    ) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_SUBSCRIBERS).then_some(n + 1))
            .ok()?;
        let block_tokens = i32::try_from(block_tokens).unwrap_or(i32::MAX);
        Some(KvEventStream { inner, open, block_tokens, next_event_id: 1, failed: false, sent })
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

impl Drop for KvEventStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
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
