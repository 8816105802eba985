//! Published vs simulated, metric by metric: the relative error of each pair and the mean
//! absolute percentage error (MAPE) per metric and per GPU.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{Point, limits::scheduler_steps};
use crate::report::ReplayReport;

/// A metric a point may publish; its key in `published.toml` is [`Metric::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// `batch_latency_s`: wall time of one offline batch.
    BatchLatency,
    /// `total_throughput_tok_s`: (input + output tokens) / batch latency.
    TotalThroughput,
    /// `ttft_batch_s`: wall time of a batch with output length 1.
    TtftBatch,
    /// `duration_s`: the benchmark's span, first send to last end.
    Duration,
    /// `output_throughput_tok_s`.
    OutputThroughput,
    /// `request_throughput_req_s`.
    RequestThroughput,
    /// `{ttft,tpot,itl,e2e}_{mean,p50,p90,p99}_ms`.
    Latency(Latency, Stat),
}

/// A per-request latency of vLLM's benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Latency {
    /// Time to first token.
    Ttft,
    /// Time per output token after the first.
    Tpot,
    /// Gap between streamed chunks.
    Itl,
    /// End to end.
    E2e,
}

/// A statistic of a latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stat {
    /// Mean.
    Mean,
    /// Median.
    P50,
    /// 90th percentile.
    P90,
    /// 99th percentile.
    P99,
}

impl Metric {
    /// Every metric: the whole-run ones, then each latency's statistics.
    pub fn all() -> Vec<Metric> {
        let mut all = vec![
            Metric::BatchLatency,
            Metric::TotalThroughput,
            Metric::TtftBatch,
            Metric::Duration,
            Metric::OutputThroughput,
            Metric::RequestThroughput,
        ];
        for latency in [Latency::Ttft, Latency::Tpot, Latency::Itl, Latency::E2e] {
            for stat in [Stat::Mean, Stat::P50, Stat::P90, Stat::P99] {
                all.push(Metric::Latency(latency, stat));
            }
        }
        all
    }

    /// Its key in `published.toml` (and in [`ReplayReport::fields`]).
    pub fn key(self) -> String {
        let name = match self {
            Metric::BatchLatency => "batch_latency_s",
            Metric::TotalThroughput => "total_throughput_tok_s",
            Metric::TtftBatch => "ttft_batch_s",
            Metric::Duration => "duration_s",
            Metric::OutputThroughput => "output_throughput_tok_s",
            Metric::RequestThroughput => "request_throughput_req_s",
            Metric::Latency(latency, stat) => {
                let latency = match latency {
                    Latency::Ttft => "ttft",
                    Latency::Tpot => "tpot",
                    Latency::Itl => "itl",
                    Latency::E2e => "e2e",
                };
                let stat = match stat {
                    Stat::Mean => "mean",
                    Stat::P50 => "p50",
                    Stat::P90 => "p90",
                    Stat::P99 => "p99",
                };
                return format!("{latency}_{stat}_ms");
            }
        };
        name.to_owned()
    }

    /// The same figure from a replay, in the same unit. An offline batch's latency is the run's
    /// span (all requests start together and the batch ends with the last), and so is the TTFT
    /// of a batch that generates one token each.
    pub fn simulated(self, report: &ReplayReport) -> Option<f64> {
        let any = report.completed > 0;
        match self {
            Metric::BatchLatency | Metric::TtftBatch | Metric::Duration => any.then_some(report.duration_s),
            Metric::TotalThroughput => any.then_some(report.total_token_throughput),
            Metric::OutputThroughput => any.then_some(report.output_throughput),
            Metric::RequestThroughput => any.then_some(report.request_throughput),
            Metric::Latency(latency, stat) => {
                let stats = match latency {
                    Latency::Ttft => report.ttft,
                    Latency::Tpot => report.tpot,
                    Latency::Itl => report.itl,
                    Latency::E2e => report.e2e,
                }?;
                Some(match stat {
                    Stat::Mean => stats.mean,
                    Stat::P50 => stats.p50,
                    Stat::P90 => stats.p90,
                    Stat::P99 => stats.p99,
                })
            }
        }
    }
}

/// One published figure beside the simulated one.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The point's id.
    pub point: String,
    /// Its GPU.
    pub gpu: String,
    /// Its regime ("low", "high").
    pub regime: String,
    /// Which figure.
    pub metric: Metric,
    /// As published.
    pub published: f64,
    /// As replayed; `None` when the replay gave no sample (every request failed).
    pub simulated: Option<f64>,
}

impl Comparison {
    /// `(simulated − published) / published`: +0.1 means the simulator is 10 % high.
    pub fn error(&self) -> Option<f64> {
        self.simulated.filter(|_| self.published > 0.0).map(|sim| (sim - self.published) / self.published)
    }
}

/// Every figure `point` publishes beside `report`'s. ITL is left out when vLLM ran multi-step
/// scheduling: its chunks then carry several tokens while the runtime streams one per chunk, so
/// the gaps do not measure the same thing (SOURCES.md: compare TPOT instead). So are TPOT's mean
/// and p99 there: a request of a few tokens waits for a whole chunk of N steps, so its TPOT is
/// N steps over its few tokens (the Lambda runs' p99 TPOT is 4.4× their median); the median,
/// set by the long requests, measures the step time.
pub fn compare(point: &Point, report: &ReplayReport) -> Vec<Comparison> {
    let multi_step = scheduler_steps(point) > 1;
    Metric::all()
        .into_iter()
        .filter(|m| {
            !(multi_step
                && matches!(
                    m,
                    Metric::Latency(Latency::Itl, _) | Metric::Latency(Latency::Tpot, Stat::Mean | Stat::P99)
                ))
        })
        .filter_map(|metric| {
            Some(Comparison {
                point: point.id.clone(),
                gpu: point.gpu.clone(),
                regime: point.regime.clone(),
                metric,
                published: point.metric(metric)?,
                simulated: metric.simulated(report),
            })
        })
        .collect()
}

/// MAPE over a group of comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct MapeRow {
    /// The group: a metric key, a GPU, or "all".
    pub key: String,
    /// Mean of |error| × 100 over the pairs with a simulated figure.
    pub mape_pct: f64,
    /// Pairs counted.
    pub n: usize,
    /// Pairs without a simulated figure (not counted, but not hidden).
    pub missing: usize,
}

/// MAPE by metric, by GPU and over everything.
#[derive(Debug, Clone, PartialEq)]
pub struct Mape {
    /// One row per metric key, sorted.
    pub by_metric: Vec<MapeRow>,
    /// One row per GPU, sorted.
    pub by_gpu: Vec<MapeRow>,
    /// Every pair.
    pub overall: MapeRow,
}

/// The MAPE of `comparisons`.
pub fn mape(comparisons: &[Comparison]) -> Mape {
    let by = |key: &dyn Fn(&Comparison) -> String| {
        let mut groups: BTreeMap<String, Vec<&Comparison>> = BTreeMap::new();
        for c in comparisons {
            groups.entry(key(c)).or_default().push(c);
        }
        groups.into_iter().map(|(k, group)| row(k, &group)).collect()
    };
    Mape {
        by_metric: by(&|c| c.metric.key()),
        by_gpu: by(&|c| c.gpu.clone()),
        overall: row("all".into(), &comparisons.iter().collect::<Vec<_>>()),
    }
}

fn row(key: String, group: &[&Comparison]) -> MapeRow {
    let errors: Vec<f64> = group.iter().filter_map(|c| c.error()).map(f64::abs).collect();
    let mape_pct =
        if errors.is_empty() { 0.0 } else { errors.iter().sum::<f64>() / errors.len() as f64 * 100.0 };
    MapeRow { key, mape_pct, n: errors.len(), missing: group.len() - errors.len() }
}

/// The pairs as a fixed-width table.
pub fn comparison_table(comparisons: &[Comparison]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<10} {:<24} {:>12} {:>12} {:>8}",
        "point", "gpu", "metric", "published", "simulated", "error"
    );
    for c in comparisons {
        let sim = c.simulated.map_or("-".to_owned(), |s| format!("{s:.3}"));
        let err = c.error().map_or("-".to_owned(), |e| format!("{:+.1}%", e * 100.0));
        let _ = writeln!(
            out,
            "{:<34} {:<10} {:<24} {:>12.3} {:>12} {:>8}",
            c.point,
            c.gpu,
            c.metric.key(),
            c.published,
            sim,
            err
        );
    }
    out
}

impl Mape {
    /// The rows as a fixed-width table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<26} {:>8} {:>4} {:>8}", "MAPE", "%", "n", "missing");
        for r in self.by_metric.iter().chain(&self.by_gpu).chain([&self.overall]) {
            let _ = writeln!(out, "{:<26} {:>8.1} {:>4} {:>8}", r.key, r.mape_pct, r.n, r.missing);
        }
        out
    }
}
