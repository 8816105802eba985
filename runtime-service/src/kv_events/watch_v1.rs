//! `runtime.v1.RuntimeService/WatchKvEvents`: a model's batches in runtime.v1's own shapes.

use std::time::{Duration, UNIX_EPOCH};

use proto::runtime::v1 as pb;

use super::KvBatch;
use crate::scheduler::KvEvent;

/// One batch as runtime.v1 tells it, for blocks of `block_tokens`.
pub fn convert(batch: &KvBatch, block_tokens: u32) -> pb::WatchKvEventsResponse {
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
