//! The fidelity suite's fast subset, for CI: six published points (two GPUs and the A100-80GB,
//! one request to a burst of 80) replayed against real in-process services configured as the
//! full suite configures them, on tokio's paused clock, so the simulated device's times are
//! measured exactly and a run takes seconds. Fails when a metric's MAPE passes its bound: the
//! bounds are today's figures plus a margin (docs/fidelity.md), so a change that makes the
//! simulation worse against published measurements fails here, not months later.

mod virtual_stack;

use fidelity::published::{self, Mapping};

const SUBSET: [&str; 6] = [
    "argonne-h100-b1-128x128",
    "argonne-h100-b64-128x128",
    "argonne-a100-b1-128x128",
    "lambda-h100-sxm-c10-len2048",
    "lambda-h100-sxm-c80-len2048",
    "lambda-a100-80gb-c10-len2048",
];

/// MAPE bounds, in percent, by metric prefix: the subset's figures when they were set (TTFT mean
/// 29.6, p50 33.7, p99 12.2; TPOT p50 8.5; E2E 5.1–5.7; output throughput 4.9; batch latency
/// 5.1) plus a margin for the jitter of the seeded step times.
const BOUNDS: [(&str, f64); 5] =
    [("ttft", 40.0), ("tpot_p50", 10.0), ("e2e", 10.0), ("output_throughput", 10.0), ("batch_latency", 10.0)];

#[tokio::test(start_paused = true)]
async fn the_subset_stays_within_its_error_bounds() {
    check_subset(false, &BOUNDS).await;
}

/// MAPE bounds on the offline simulator: its figures when they were set (TTFT mean 19.4, p50
/// 18.3, p99 13.3; TPOT p50 9.0; E2E 5.1–5.6; output throughput 4.9; batch latency 5.1) plus a
/// margin. A burst's requests join one step there, as they did in vLLM 0.6 (docs/fidelity.md).
const OFFLINE_BOUNDS: [(&str, f64); 5] =
    [("ttft", 25.0), ("tpot_p50", 12.0), ("e2e", 10.0), ("output_throughput", 10.0), ("batch_latency", 10.0)];

#[tokio::test(start_paused = true)]
async fn the_subset_offline_stays_within_its_error_bounds() {
    check_subset(true, &OFFLINE_BOUNDS).await;
}

async fn check_subset(offline: bool, bounds: &[(&str, f64)]) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/published.toml")).expect("data");
    let points = published::parse(&text).expect("parses");
    let mut comparisons = Vec::new();
    for id in SUBSET {
        let point = points.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("{id} is published"));
        let Mapping::Replay(scenario) = published::map_point(point) else { panic!("{id} replays") };
        let report = if offline {
            let config = virtual_stack::runtime_config(&scenario);
            fidelity::ReplayReport::of_run(&virtual_stack::replay_offline(config, &scenario.workload).await)
        } else {
            virtual_stack::replay(&scenario).await
        };
        assert_eq!(report.failed, 0, "{id}: every request completes");
        comparisons.extend(published::compare(point, &report));
    }
    eprintln!("{}", published::comparison_table(&comparisons));
    let mape = published::mape(&comparisons);
    let mut over = Vec::new();
    for row in &mape.by_metric {
        eprintln!("{:<28} {:>6.1}%  over {}", row.key, row.mape_pct, row.n);
        if let Some((_, bound)) = bounds.iter().find(|(prefix, _)| row.key.starts_with(prefix))
            && row.mape_pct > *bound
        {
            over.push(format!("{} {:.1}% > {bound}%", row.key, row.mape_pct));
        }
    }
    assert!(over.is_empty(), "MAPE above its bound: {over:?}");
}
