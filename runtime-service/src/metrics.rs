//! runtime-service's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serving::observe::GrpcMetrics;

/// The registry and every instrument the generation path updates.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Everything below, plus gRPC server metrics.
    pub registry: Registry,
    /// gRPC calls by method and code (the server layer).
    pub grpc: GrpcMetrics,
    /// Generations streaming right now.
    pub active_streams: IntGauge,
    /// Generations by outcome: ok, cancelled, deadline, rejected, error.
    pub requests: IntCounterVec,
    /// Time from the call to its first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a stream.
    pub inter_token: Histogram,
    /// Tokens streamed.
    pub tokens: IntCounter,
    /// Pipeline time by `stage` (cpu, gpu) and `state` (busy, waiting_for_cpu, waiting_for_gpu).
    pub pipeline: prometheus::CounterVec,
    /// Time spent obtaining memory (waits and retries) per generation.
    pub memory_wait: Histogram,
}

fn seconds(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
}

impl Metrics {
    /// A registry with every instrument registered.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let grpc = GrpcMetrics::register(&registry)?;
        let latency =
            vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let metrics = Metrics {
            grpc,
            active_streams: IntGauge::new("runtime_active_streams", "Generations streaming right now.")?,
            requests: IntCounterVec::new(
                Opts::new("runtime_requests_total", "Generate calls by outcome."),
                &["outcome"],
            )?,
            ttft: seconds(
                "runtime_time_to_first_token_seconds",
                "From the call to its first token.",
                latency.clone(),
            )?,
            inter_token: seconds(
                "runtime_inter_token_seconds",
                "Time between consecutive tokens of a stream.",
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0],
            )?,
            tokens: IntCounter::new("runtime_tokens_generated_total", "Tokens streamed to clients.")?,
            pipeline: prometheus::CounterVec::new(
                Opts::new("runtime_pipeline_seconds_total", "Pipeline stage time, busy or stalled."),
                &["stage", "state"],
            )?,
            memory_wait: seconds(
                "runtime_memory_wait_seconds",
                "Time a generation spent obtaining its memory (waits and retries).",
                latency,
            )?,
            registry,
        };
        let r = &metrics.registry;
        r.register(Box::new(metrics.active_streams.clone()))?;
        r.register(Box::new(metrics.requests.clone()))?;
        r.register(Box::new(metrics.ttft.clone()))?;
        r.register(Box::new(metrics.inter_token.clone()))?;
        r.register(Box::new(metrics.tokens.clone()))?;
        r.register(Box::new(metrics.pipeline.clone()))?;
        r.register(Box::new(metrics.memory_wait.clone()))?;
        Ok(metrics)
    }
}
