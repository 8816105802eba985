//! The statistics of a replay, with vLLM's `benchmark_serving.py` definitions: TTFT, TPOT, ITL
//! and E2E (mean, p50, p90, p99 in ms) over completed requests, and throughput over the run.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use crate::{drive::Run, record::RequestRecord};

/// Summary of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Samples.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Stats {
    /// The summary of `samples_ms`; `None` when there are none. Percentiles interpolate between
    /// the closest ranks, as `numpy.percentile` (which vLLM's benchmark uses) does by default.
    pub fn of(samples_ms: &[f64]) -> Option<Stats> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Stats {
            count: sorted.len(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
        })
    }
}

/// The `p`th percentile (0–100) of ascending `sorted` (not empty), by linear interpolation
/// between ranks: rank = p/100 × (n − 1).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// What a replay measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Failed requests by reason (gRPC code name or failure kind).
    pub failures: BTreeMap<String, usize>,
    /// From the first send to the last end, in seconds (simulated time).
    pub duration_s: f64,
    /// Prompt tokens of completed requests.
    pub input_tokens: u64,
    /// Tokens streamed back to completed requests.
    pub output_tokens: u64,
    /// Completed requests per second over the run.
    pub request_throughput: f64,
    /// Output tokens per second over the run.
    pub output_throughput: f64,
    /// Prompt and output tokens per second over the run.
    pub total_token_throughput: f64,
    /// Time to first token.
    pub ttft: Option<Stats>,
    /// Time per output token after the first.
    pub tpot: Option<Stats>,
    /// Gaps between successive chunks.
    pub itl: Option<Stats>,
    /// End-to-end latency.
    pub e2e: Option<Stats>,
    /// Requests in flight at once, at most.
    pub max_in_flight: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl ReplayReport {
    /// The report of a run.
    pub fn of_run(run: &Run) -> ReplayReport {
        ReplayReport { max_in_flight: run.max_in_flight, ..ReplayReport::of_records(&run.records) }
    }

    /// The report of `records`. Latencies count completed requests only; the run's duration
    /// spans every request, failed ones included, as vLLM's benchmark times the whole gather.
    pub fn of_records(records: &[RequestRecord]) -> ReplayReport {
        let done: Vec<&RequestRecord> = records.iter().filter(|r| r.succeeded()).collect();
        let mut failures = BTreeMap::new();
        for failure in records.iter().filter_map(|r| r.failure.as_ref()) {
            *failures.entry(failure.reason()).or_default() += 1;
        }
        let first = records.iter().map(|r| r.sent).min().unwrap_or_default();
        let last = records.iter().map(|r| r.ended).max().unwrap_or_default();
        let duration_s = last.saturating_sub(first).as_secs_f64();
        let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
        let input_tokens: u64 = done.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let output_tokens: u64 = done.iter().map(|r| u64::from(r.output_tokens)).sum();
        let ttft: Vec<f64> = done.iter().filter_map(|r| r.ttft()).map(ms).collect();
        let tpot: Vec<f64> = done.iter().filter_map(|r| r.tpot()).map(ms).collect();
        let itl: Vec<f64> = done.iter().flat_map(|r| r.itls()).map(ms).collect();
        let e2e: Vec<f64> = done.iter().map(|r| ms(r.e2e())).collect();
        ReplayReport {
            completed: done.len(),
            failed: records.len() - done.len(),
            failures,
            duration_s,
            input_tokens,
            output_tokens,
            request_throughput: per_s(done.len() as f64),
            output_throughput: per_s(output_tokens as f64),
            total_token_throughput: per_s((input_tokens + output_tokens) as f64),
            ttft: Stats::of(&ttft),
            tpot: Stats::of(&tpot),
            itl: Stats::of(&itl),
            e2e: Stats::of(&e2e),
            max_in_flight: 0,
        }
    }

    /// Every figure as (key, value), in a fixed order: latencies as `{metric}_{stat}_ms`
    /// (absent when no request gave a sample), throughputs, counts.
    pub fn fields(&self) -> Vec<(String, f64)> {
        let mut fields = vec![
            ("completed".to_owned(), self.completed as f64),
            ("failed".to_owned(), self.failed as f64),
            ("duration_s".to_owned(), self.duration_s),
            ("request_throughput_req_s".to_owned(), self.request_throughput),
            ("output_throughput_tok_s".to_owned(), self.output_throughput),
            ("total_throughput_tok_s".to_owned(), self.total_token_throughput),
            ("input_tokens".to_owned(), self.input_tokens as f64),
            ("output_tokens".to_owned(), self.output_tokens as f64),
            ("max_in_flight".to_owned(), self.max_in_flight as f64),
        ];
        for (name, stats) in self.latencies() {
            if let Some(s) = stats {
                for (stat, value) in [("mean", s.mean), ("p50", s.p50), ("p90", s.p90), ("p99", s.p99)] {
                    fields.push((format!("{name}_{stat}_ms"), value));
                }
            }
        }
        fields
    }

    fn latencies(&self) -> [(&'static str, Option<Stats>); 4] {
        [("ttft", self.ttft), ("tpot", self.tpot), ("itl", self.itl), ("e2e", self.e2e)]
    }

    /// One line of `key=value` pairs (see [`ReplayReport::fields`]), then `failures.{reason}=n`:
    /// for scripts to grep. Values print with Rust's shortest round-trip form.
    pub fn key_values(&self) -> String {
        let mut pairs: Vec<String> = self.fields().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.extend(self.failures.iter().map(|(reason, n)| format!("failures.{reason}={n}")));
        pairs.join(" ")
    }

    /// A fixed-width table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "requests     {:>10} completed {:>8} failed", self.completed, self.failed);
        for (reason, n) in &self.failures {
            let _ = writeln!(out, "  failed     {n:>10} {reason}");
        }
        let _ =
            writeln!(out, "duration     {:>10.3} s  (max {} in flight)", self.duration_s, self.max_in_flight);
        let _ = writeln!(out, "throughput   {:>10.2} req/s", self.request_throughput);
        let _ = writeln!(out, "             {:>10.1} output tok/s", self.output_throughput);
        let _ = writeln!(out, "             {:>10.1} total tok/s", self.total_token_throughput);
        let _ =
            writeln!(out, "{:<8} {:>8} {:>10} {:>10} {:>10} {:>10}", "ms", "n", "mean", "p50", "p90", "p99");
        for (name, stats) in self.latencies() {
            match stats {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "{name:<8} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                        s.count, s.mean, s.p50, s.p90, s.p99
                    );
                }
                None => {
                    let _ = writeln!(out, "{name:<8} {:>8} {:>10}", 0, "-");
                }
            }
        }
        out
    }
}
