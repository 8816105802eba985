//! The device loop on tokio's paused clock, driven through a rig: one device, one model lane, and
//! a test playing its kv leaser. Step times are tested in [`timing`], KV blocks and slabs in
//! [`blocks`].

mod blocks;
mod timing;

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::*;
use serving::{arch::Arch, device::DeviceSpec};

use crate::{
    executor::{Executor, Ticket},
    kv::{self, LeaserEnd},
    mock_lm::{MockLmKind, text::Sampling},
    roofline::{Roofline, Work},
    scheduler::{KvReserve, StepLimits},
};

const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0 };

/// 1 MB of weights at 1 GB/s (1 ms) plus a 2 ms launch: a decode step costs just over 3 ms.
fn arch() -> Arch {
    Arch {
        parameters: 1_000_000,
        layers: 1,
        hidden_size: 8,
        attention_heads: 1,
        kv_heads: 1,
        head_dim: 8,
        intermediate_size: 8,
        dtype_bytes: 1,
        context_length: 4096,
        vocab_size: 0,
        tie_word_embeddings: false,
    }
}

fn spec(cpu_ms: f64) -> DeviceSpec {
    DeviceSpec {
        name: "test".into(),
        memory_bytes: 1 << 30,
        bandwidth_bytes_per_s: 1e9,
        flops_per_s: 1e12,
        bandwidth_efficiency: 1.0,
        flops_efficiency: 1.0,
        kv_bandwidth_efficiency: None,
        attention_flops_efficiency: None,
        launch_overhead_s: 2e-3,
        cpu_per_step_s: cpu_ms / 1e3,
        cpu_per_seq_s: 0.0,
        cpu_per_prompt_token_s: 0.0,
        frontend_s: 0.0,
    }
}

struct Rig {
    device: Device,
    slabs: Arc<LeaserEnd>,
    metrics: Metrics,
    executor: Arc<Executor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    roofline: Roofline,
}

fn rig(mode: SchedulerMode, cpu_ms: f64, limits: StepLimits) -> Rig {
    rig_with_slabs(mode, cpu_ms, limits, 0, 1024)
}

/// A rig whose lane keeps `low_watermark` free blocks ahead of need and returns a slab only with
/// `slab_blocks` free beyond that.
fn rig_with_slabs(
    mode: SchedulerMode,
    cpu_ms: f64,
    limits: StepLimits,
    low_watermark: u64,
    slab_blocks: u64,
) -> Rig {
    rig_with(mode, cpu_ms, limits, Extras { low_watermark, slab_blocks, ..Extras::default() })
}

/// What a rig may set beyond its mode, CPU cost and limits.
struct Extras {
    low_watermark: u64,
    slab_blocks: u64,
    time_scale: crate::config::TimeScale,
    /// Until when the memory is confirmed (see [`Signals::memory`]).
    memory: tokio::sync::watch::Receiver<Option<Instant>>,
}

impl Default for Extras {
    fn default() -> Self {
        Extras {
            low_watermark: 0,
            slab_blocks: 1024,
            time_scale: crate::config::TimeScale::REAL,
            memory: confirmed(),
        }
    }
}

fn rig_with(mode: SchedulerMode, cpu_ms: f64, limits: StepLimits, extras: Extras) -> Rig {
    let Extras { low_watermark, slab_blocks, time_scale, memory } = extras;
    let metrics = Metrics::new(&["m"], 1024).expect("metrics");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    let (link, slabs) = kv::link(wake.clone());
    let roofline = Roofline::new(&spec(cpu_ms), &arch());
    let lane = LaneSpec {
        model: "m".into(),
        roofline: roofline.clone(),
        block_tokens: 4,
        limits,
        low_watermark,
        slab_blocks,
        kv_events: Arc::new(crate::kv_events::KvEventHub::new(64, 4)),
    };
    let settings = DeviceSettings {
        mode,
        jitter: 0.0,
        jitter_seed: 1,
        kv_idle_release: Duration::from_secs(3600),
        time_scale,
    };
    let device = Device::spawn(
        settings,
        vec![(lane, link)],
        64,
        wake,
        metrics.clone(),
        Signals { shutdown: shutdown.clone(), memory, reclaim: None },
        &tracker,
    );
    Rig {
        device,
        slabs: Arc::new(slabs),
        metrics,
        executor: Executor::new(64, 64, shutdown.clone()),
        shutdown,
        tracker,
        roofline,
    }
}

const LIMITS: StepLimits = StepLimits {
    max_batch: 16,
    token_budget: 256,
    reserve: KvReserve::Paged,
    prefix_caching: false,
    chunked_prefill: true,
    decode_steps: 1,
};

/// A sequence on the device, as its generation task sees it.
struct Seq {
    tokens: mpsc::Receiver<Emitted>,
    outcome: oneshot::Receiver<Outcome>,
    guard: SeqGuard,
    room: RoomSignal,
    _ticket: Ticket,
}

impl Rig {
    fn submit(&self, name: &str, prompt: &str, max_tokens: u32) -> Seq {
        self.submit_stopping(name, prompt, max_tokens, crate::mock_lm::Stops::default())
    }

    /// [`Rig::submit`] with stop conditions.
    fn submit_stopping(
        &self,
        name: &str,
        prompt: &str,
        max_tokens: u32,
        stops: crate::mock_lm::Stops,
    ) -> Seq {
        let ticket = self.executor.register(name.into(), None).expect("unique id");
        let (tokens_tx, tokens) = mpsc::channel(TOKEN_BUFFER);
        let (outcome_tx, outcome) = oneshot::channel();
        let lm = MockLmKind::Webllm.lm();
        let guard = self
            .device
            .submit(Submission {
                lane: 0,
                received: Instant::now(),
                prompt_tokens: lm.count_prompt_tokens(prompt),
                prompt_ids: Arc::from([]),
                max_tokens,
                decoder: Decoder::primed(lm, crate::rng::fnv1a(prompt.as_bytes()), 7, GREEDY, stops),
                tokens: tokens_tx,
                outcome: outcome_tx,
                flight: ticket.flight().clone(),
                span: tracing::Span::none(),
            })
            .expect("room in the inbox");
        Seq { tokens, outcome, guard, room: self.device.room_signal(), _ticket: ticket }
    }

    /// Plays a leaser that never gets more memory: every ask is answered "no room".
    fn no_more_memory(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                slabs.report_exhausted();
            }
        });
    }

    /// Plays a leaser with all the memory in the world: every ask is granted at once.
    fn generous(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                let missing = slabs.missing();
                if missing > 0 {
                    slabs.give(missing).await;
                }
            }
        });
    }

    /// Plays a leaser on a pool others keep full: a starved lane's whole ask is granted (it
    /// waits in memory-service's first-come first-served queue until others free enough), any
    /// other ask is answered "no room".
    fn contended(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                let missing = slabs.missing();
                if !slabs.whole() {
                    slabs.report_exhausted();
                } else if missing > 0 {
                    slabs.give(missing).await;
                }
            }
        });
    }

    /// [`Rig::generous`], counting the blocks it grants.
    fn generous_counting(&self) -> Arc<std::sync::atomic::AtomicU64> {
        let granted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (slabs, count) = (self.slabs.clone(), granted.clone());
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                let missing = slabs.missing();
                if missing > 0 {
                    count.fetch_add(missing, std::sync::atomic::Ordering::Relaxed);
                    slabs.give(missing).await;
                }
            }
        });
        granted
    }

    fn held_blocks(&self) -> i64 {
        self.metrics.kv_blocks.with_label_values(&["m", "total"]).get()
    }

    fn used_blocks(&self) -> i64 {
        self.metrics.kv_blocks.with_label_values(&["m", "used"]).get()
    }

    /// A sample of model `m`'s `vllm:*` series whose labels contain `labels`, read from the
    /// rendered registry as a scraper reads it.
    fn vllm(&self, name: &str, labels: &str) -> f64 {
        use prometheus::Encoder;
        let mut text = Vec::new();
        prometheus::TextEncoder::new().encode(&self.metrics.registry.gather(), &mut text).expect("encodes");
        let text = String::from_utf8(text).expect("utf-8");
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels));
        let value = line.and_then(|l| l.rsplit_once(' ')).map(|(_, v)| v.parse().expect("a number"));
        value.unwrap_or_else(|| panic!("no {name} with {labels}:\n{text}"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Reads a sequence to its end: the instants its tokens arrived, and its outcome.
async fn drain(seq: &mut Seq) -> (Vec<(u32, Instant)>, Outcome) {
    let mut seen = Vec::new();
    while let Some(emitted) = seq.tokens.recv().await {
        seen.push((emitted.index, Instant::now()));
        seq.room.took(&seq.tokens);
    }
    let outcome = (&mut seq.outcome).await.expect("the device reports an outcome");
    (seen, outcome)
}

/// A memory signal that always confirms (these tests have no memory-service).
fn confirmed() -> tokio::sync::watch::Receiver<Option<Instant>> {
    tokio::sync::watch::channel(Some(Instant::now() + std::time::Duration::from_secs(86_400 * 365))).1
}
