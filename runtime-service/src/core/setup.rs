//! The device as a configuration describes it: its settings and one lane per model. The service
//! and the offline simulator build it here, so both run the same device.

use std::sync::Arc;

use tokio::sync::Notify;

use super::{DeviceSettings, LaneSpec};
use crate::{
    config::Config,
    kv::{self, LeaserEnd, Link, SlabShape},
    kv_events::KvEventHub,
    roofline::Roofline,
    scheduler::StepLimits,
};

/// One model's lane, the device's end of its slab link, and what its leaser needs.
#[derive(Debug)]
pub struct LaneParts {
    /// The lane.
    pub lane: LaneSpec,
    /// The device's end of the slab link.
    pub link: Link,
    /// The leaser's end.
    pub leaser: LeaserEnd,
    /// The slabs the leaser asks for.
    pub slabs: SlabShape,
}

impl DeviceSettings {
    /// The settings `config` gives the device.
    pub fn of(config: &Config) -> Self {
        DeviceSettings {
            mode: config.scheduler,
            jitter: config.jitter,
            jitter_seed: config.jitter_seed,
            kv_idle_release: config.kv_idle_release,
            time_scale: config.time_scale,
        }
    }
}

/// Sequences handed to the device but not yet taken: admission bounds what is in flight to
/// max_batch_size + queue_capacity; twice that leaves room for the hand-overs of generations
/// that already ended but are not yet swept.
pub fn inbox_capacity(config: &Config) -> usize {
    config.max_batch_size.saturating_add(config.queue_capacity).saturating_mul(2)
}

/// The lanes of `config`'s models, in order (a model's lane index is its position); slab grants
/// wake the device through `wake`.
pub fn lanes(config: &Config, wake: &Arc<Notify>) -> Vec<LaneParts> {
    let limits = StepLimits {
        max_batch: config.max_batch_size,
        token_budget: config.max_batched_tokens,
        reserve: config.kv_reserve,
        prefix_caching: config.prefix_caching,
        chunked_prefill: config.chunked_prefill,
        decode_steps: config.decode_steps,
    };
    config
        .models
        .iter()
        .map(|spec| {
            let (link, leaser) = kv::link(wake.clone());
            let slabs = SlabShape {
                model: spec.key.clone(),
                block_bytes: spec.block_bytes(config.kv_block_tokens),
                slab_blocks: config.kv_slab_blocks,
            };
            let lane = LaneSpec {
                model: spec.key.clone(),
                roofline: Roofline::new(&config.device, &spec.arch),
                block_tokens: config.kv_block_tokens,
                limits,
                low_watermark: config.kv_low_watermark_blocks,
                slab_blocks: config.kv_slab_blocks,
                kv_events: Arc::new(KvEventHub::new(config.kv_events_buffer, config.kv_block_tokens)),
            };
            LaneParts { lane, link, leaser, slabs }
        })
        .collect()
}
