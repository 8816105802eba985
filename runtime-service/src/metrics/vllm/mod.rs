//! vLLM's own series (`vllm:*`), fed by the same device loop as `runtime_*`, so the routers,
//! autoscalers and dashboards built for vLLM read this runtime unchanged.
//!
//! Names, types, label names, help texts and buckets are vLLM's: `vllm/v1/metrics/loggers.py`,
//! `PrometheusStatLogger`, as of vLLM 0.12 (the release that keeps the 0.11 rename to
//! `vllm:inter_token_latency_seconds` and hides `vllm:time_per_output_token_seconds`). The
//! subset is what the Gateway API Inference Extension's model-server protocol
//! (`docs/proposals/003-model-server-protocol`) has routers scrape, plus the request counters and
//! histograms dashboards read. Two differences, neither chosen: vLLM registers counters without
//! `_total` and Python's client appends it, the Rust client does not, so the names here carry it;
//! and several models share each family here, so one set of token-count buckets serves them all
//! (vLLM runs one model per process). One device is one vLLM engine core, so every series has
//! `engine="0"` beside `model_name`, as vLLM's have. Names with ':' are legal Prometheus names
//! (the recording-rule style) and this crate accepts them (the tests register them).
//!
//! Per-request values are recorded where a sequence leaves the device, not in a front door, so
//! every front door submitting to the device is counted once.

mod series;
#[cfg(test)]
mod tests;

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use self::series::{ModelSeries, RequestStats};

/// The `engine` label: one simulated device is one engine core.
const ENGINE: &str = "0";

/// vLLM's label names on every per-engine series.
const LABELS: [&str; 2] = ["model_name", "engine"];

/// `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];

/// `vllm:inter_token_latency_seconds` and `vllm:request_time_per_output_token_seconds` buckets.
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

/// vLLM's `request_latency_buckets` (end-to-end and queue time).
const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

/// vLLM's `build_1_2_5_buckets(max_model_len)`: 1, 2, 5, 10, 20, 50... up to `max`.
fn buckets_1_2_5(max: u32) -> Vec<f64> {
    let max = u64::from(max.max(1));
    let mut buckets = Vec::new();
    let mut scale = 1u64;
    loop {
        for m in [1, 2, 5] {
            if m * scale > max {
                return buckets;
            }
            buckets.push((m * scale) as f64);
        }
        scale *= 10;
    }
}

/// Why a request left the device: vLLM's `FinishReason` as it prints (`str(reason)`), in
/// vLLM's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced its end-of-sequence token.
    Stop = 0,
    /// It reached max_tokens.
    Length = 1,
    /// Anything else: cancelled, client gone, deadline, memory lost, shutdown.
    Abort = 2,
}

impl Finish {
    /// Every reason, each counted from the start.
    pub const ALL: [Finish; 3] = [Finish::Stop, Finish::Length, Finish::Abort];

    /// How a sequence's end reads: `Ok(stopped)`, or an error (an abort).
    pub fn of<E>(end: &Result<bool, E>) -> Self {
        match end {
            Ok(true) => Finish::Stop,
            Ok(false) => Finish::Length,
            Err(_) => Finish::Abort,
        }
    }

    /// The `finished_reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Abort => "abort",
        }
    }
}

/// Every `vllm:*` instrument.
#[derive(Debug, Clone)]
pub struct Vllm {
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    cache_config: GaugeVec,
    preemptions: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    success: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    tpot: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prompt: HistogramVec,
    generation: HistogramVec,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &LABELS)
}

fn gauge(name: &str, help: &str) -> prometheus::Result<GaugeVec> {
    GaugeVec::new(Opts::new(name, help), &LABELS)
}

fn counter(name: &str, help: &str) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), &LABELS)
}

impl Vllm {
    /// Registers every instrument in `registry`; token-count buckets reach `max_model_len`.
    pub fn register(registry: &Registry, max_model_len: u32) -> prometheus::Result<Self> {
        let tokens = buckets_1_2_5(max_model_len);
        let vllm = Vllm {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches.")?,
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")?,
            kv_usage: gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")?,
            // vLLM's labels are every CacheConfig field; these two are the ones routers read
            // (the inference extension's prefix-cache scorer), model_name tells models apart.
            cache_config: GaugeVec::new(
                Opts::new("vllm:cache_config_info", "Information of the LLMEngine CacheConfig"),
                &["model_name", "engine", "block_size", "num_gpu_blocks"],
            )?,
            preemptions: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
            )?,
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.")?,
            generation_tokens: counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            )?,
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            )?,
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            )?,
            success: IntCounterVec::new(
                Opts::new("vllm:request_success_total", "Count of successfully processed requests."),
                &["model_name", "engine", "finished_reason"],
            )?,
            ttft: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS.to_vec(),
            )?,
            itl: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS.to_vec(),
            )?,
            tpot: histogram(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                ITL_BUCKETS.to_vec(),
            )?,
            e2e: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            queue: histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            prompt: histogram(
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                tokens.clone(),
            )?,
            generation: histogram(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                tokens,
            )?,
        };
        for gauge in [&vllm.running, &vllm.waiting, &vllm.kv_usage, &vllm.cache_config] {
            registry.register(Box::new(gauge.clone()))?;
        }
        for counter in [
            &vllm.preemptions,
            &vllm.prompt_tokens,
            &vllm.generation_tokens,
            &vllm.prefix_queries,
            &vllm.prefix_hits,
            &vllm.success,
        ] {
            registry.register(Box::new(counter.clone()))?;
        }
        for histogram in
            [&vllm.ttft, &vllm.itl, &vllm.tpot, &vllm.e2e, &vllm.queue, &vllm.prompt, &vllm.generation]
        {
            registry.register(Box::new(histogram.clone()))?;
        }
        Ok(vllm)
    }

    /// `model`'s series, created at zero now (a rate over a series born with its first event
    /// misses that event). `vllm:cache_config_info` waits for the block count to be known.
    pub fn model(&self, model: &str) -> ModelSeries {
        let labels = [model, ENGINE];
        ModelSeries {
            model: model.to_owned(),
            running: self.running.with_label_values(&labels),
            waiting: self.waiting.with_label_values(&labels),
            kv_usage: self.kv_usage.with_label_values(&labels),
            cache_config: self.cache_config.clone(),
            cache_labels: None,
            preemptions: self.preemptions.with_label_values(&labels),
            prompt_tokens: self.prompt_tokens.with_label_values(&labels),
            generation_tokens: self.generation_tokens.with_label_values(&labels),
            prefix_queries: self.prefix_queries.with_label_values(&labels),
            prefix_hits: self.prefix_hits.with_label_values(&labels),
            success: Finish::ALL.map(|f| self.success.with_label_values(&[model, ENGINE, f.label()])),
            ttft: self.ttft.with_label_values(&labels),
            itl: self.itl.with_label_values(&labels),
            tpot: self.tpot.with_label_values(&labels),
            e2e: self.e2e.with_label_values(&labels),
            queue: self.queue.with_label_values(&labels),
            prompt: self.prompt.with_label_values(&labels),
            generation: self.generation.with_label_values(&labels),
            time_scale: crate::config::TimeScale::REAL,
            runtime_latency: None,
        }
    }
}
