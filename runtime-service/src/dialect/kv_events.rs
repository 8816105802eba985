//! `SubscribeKvEvents`: the served model's prefix-cache batches in the shapes of the published
//! `common.proto` (KvEventBatch of KvCacheEvent: stored, removed, cleared), as routers read
//! them. Block hashes are the cache's 64-bit chained hashes, as int64 (the same bits).

use proto::smg::grpc::common as smg;

use crate::{kv_events::KvBatch, scheduler::KvEvent};

/// Turns batches into the dialect's messages for one subscription.
#[derive(Debug)]
pub struct DialectBatches {
    block_tokens: i32,
    next_event_id: u64,
}

impl DialectBatches {
    /// For blocks of `block_tokens`.
    pub fn new(block_tokens: u32) -> Self {
        DialectBatches { block_tokens: i32::try_from(block_tokens).unwrap_or(i32::MAX), next_event_id: 1 }
    }

    /// One batch as the dialect tells it; event ids count up across the subscription.
    pub fn convert(&mut self, batch: &KvBatch) -> smg::KvEventBatch {
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
