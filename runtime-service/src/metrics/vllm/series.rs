//! One model's `vllm:*` series and what one request contributes to them.

use std::time::Duration;

use prometheus::{Gauge, GaugeVec, Histogram, IntCounter};
use tokio::time::Instant;

use super::{ENGINE, Finish};

/// One model's `vllm:*` series, bound once: the device loop records on every step, and a label
/// lookup per token would cost more than the token.
#[derive(Debug)]
pub struct ModelSeries {
    pub(super) model: String,
    pub(super) running: Gauge,
    pub(super) waiting: Gauge,
    pub(super) kv_usage: Gauge,
    pub(super) cache_config: GaugeVec,
    /// The `block_size` and `num_gpu_blocks` exported, removed when they change: an info series
    /// left behind would tell a router about blocks the device no longer has.
    pub(super) cache_labels: Option<(u32, u64)>,
    pub(super) preemptions: IntCounter,
    pub(super) prompt_tokens: IntCounter,
    pub(super) generation_tokens: IntCounter,
    pub(super) prefix_queries: IntCounter,
    pub(super) prefix_hits: IntCounter,
    pub(super) success: [IntCounter; 3],
    pub(super) ttft: Histogram,
    pub(super) itl: Histogram,
    pub(super) tpot: Histogram,
    pub(super) e2e: Histogram,
    pub(super) queue: Histogram,
    pub(super) prompt: Histogram,
    pub(super) generation: Histogram,
    /// Durations are observed in simulated time: wall time × this.
    pub(super) time_scale: crate::config::TimeScale,
    /// The runtime's own time-to-first-token and inter-token series, observed alike.
    pub(super) runtime_latency: Option<[Histogram; 2]>,
}

/// One request's moments, as vLLM's `RequestStateStats` keeps them.
#[derive(Debug, Clone, Copy)]
pub struct RequestStats {
    /// When its front door received it: TTFT and end-to-end latency count from here, as vLLM's
    /// count from the API server's arrival time.
    received: Instant,
    /// When it reached the device (vLLM's `queued_ts`).
    queued: Instant,
    /// Its first step (vLLM's `scheduled_ts`); a preemption does not reset it.
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    generated: u32,
    prompt_tokens: u32,
}

impl RequestStats {
    /// A request received at `received` that reached the device at `queued`.
    pub fn new(received: Instant, queued: Instant, prompt_tokens: u32) -> Self {
        RequestStats {
            received,
            queued,
            scheduled: None,
            first_token: None,
            last_token: None,
            generated: 0,
            prompt_tokens,
        }
    }

    /// When its front door received it.
    pub fn received(&self) -> Instant {
        self.received
    }

    /// Marks its first step, started at `at`; true the first time only.
    pub fn schedule(&mut self, at: Instant) -> bool {
        let first = self.scheduled.is_none();
        self.scheduled.get_or_insert(at);
        first
    }

    /// From reaching the device to its first step, once scheduled.
    pub fn queue_time(&self) -> Option<Duration> {
        self.scheduled.map(|at| at.saturating_duration_since(self.queued))
    }
}

impl ModelSeries {
    /// The scheduler's state now: sequences running and waiting, and KV blocks used over what
    /// this runtime could hold. Set after every change, so all three fall to zero with the load.
    pub fn load(&self, running: usize, waiting: usize, kv_usage: f64) {
        self.running.set(running as f64);
        self.waiting.set(waiting as f64);
        self.kv_usage.set(kv_usage);
    }

    /// Exports the cache geometry once `num_gpu_blocks` is known (non-zero), replacing the
    /// series of an earlier geometry.
    pub fn cache_config(&mut self, block_size: u32, num_gpu_blocks: u64) {
        if num_gpu_blocks == 0 || self.cache_labels == Some((block_size, num_gpu_blocks)) {
            return;
        }
        if let Some((size, blocks)) = self.cache_labels.take() {
            let (size, blocks) = (size.to_string(), blocks.to_string());
            let _ = self.cache_config.remove_label_values(&[&self.model, ENGINE, &size, &blocks]);
        }
        let (size, blocks) = (block_size.to_string(), num_gpu_blocks.to_string());
        self.cache_config.with_label_values(&[&self.model, ENGINE, &size, &blocks]).set(1.0);
        self.cache_labels = Some((block_size, num_gpu_blocks));
    }

    /// These series observe durations in simulated time at `scale`.
    pub fn in_time_scale(mut self, scale: crate::config::TimeScale) -> Self {
        self.time_scale = scale;
        self
    }

    /// Every token also lands in `ttft` (a first token) or `inter_token` (the next): the
    /// runtime's own series, measured at the same instant as vLLM's.
    pub fn with_runtime_latency(mut self, ttft: Histogram, inter_token: Histogram) -> Self {
        self.runtime_latency = Some([ttft, inter_token]);
        self
    }

    /// A request was first scheduled with the prefix cache on: it looked up `queried` prompt
    /// tokens and found `hit` of them cached (vLLM counts both in tokens).
    pub fn prefix_cache(&self, queried: u32, hit: u32) {
        self.prefix_queries.inc_by(u64::from(queried));
        self.prefix_hits.inc_by(u64::from(hit));
    }

    /// `n` sequences were preempted.
    pub fn preempted(&self, n: usize) {
        self.preemptions.inc_by(n as u64);
    }

    /// The request produced a token at `at`: its first (TTFT, and its prompt counts as
    /// processed) or the next (an inter-token gap).
    pub fn token(&self, request: &mut RequestStats, at: Instant) {
        let (series, seconds) = match request.last_token {
            None => {
                self.prompt_tokens.inc_by(u64::from(request.prompt_tokens));
                request.first_token = Some(at);
                (0, at.saturating_duration_since(request.received))
            }
            Some(last) => (1, at.saturating_duration_since(last)),
        };
        let seconds = self.time_scale.simulated_secs(seconds);
        [&self.ttft, &self.itl][series].observe(seconds);
        if let Some(runtime) = &self.runtime_latency {
            runtime[series].observe(seconds);
        }
        request.last_token = Some(at);
        request.generated += 1;
        self.generation_tokens.inc();
    }

    /// The request left the device at `at` for `reason`. A request that never ran spent its
    /// whole life waiting: that is its queue time.
    pub fn finished(&self, request: &RequestStats, reason: Finish, at: Instant) {
        self.success[reason as usize].inc();
        let seconds = |d: Duration| self.time_scale.simulated_secs(d);
        self.e2e.observe(seconds(at.saturating_duration_since(request.received)));
        let queue = request.queue_time().unwrap_or_else(|| at.saturating_duration_since(request.queued));
        self.queue.observe(seconds(queue));
        self.prompt.observe(f64::from(request.prompt_tokens));
        self.generation.observe(f64::from(request.generated));
        // vLLM's mean_time_per_output_token: the decode time over the tokens after the first.
        let tpot = match (request.first_token, request.last_token) {
            (Some(first), Some(last)) if request.generated > 1 => {
                seconds(last.saturating_duration_since(first)) / f64::from(request.generated - 1)
            }
            _ => 0.0,
        };
        self.tpot.observe(tpot);
    }
}
