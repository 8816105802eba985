//! ReplayReport statistics on known inputs: numpy's percentiles and vLLM's TTFT/TPOT/ITL definitions.

use std::time::Duration;

use fidelity::{Chunk, Failure, ReplayReport, RequestRecord, Stats, percentile};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A completed request sent at `sent` ms whose chunks arrived at `(ms, tokens)`, ending with the
/// last chunk.
fn record(index: usize, sent: u64, chunks: &[(u64, u32)]) -> RequestRecord {
    let chunks: Vec<Chunk> = chunks.iter().map(|&(at, tokens)| Chunk { at: ms(at), tokens }).collect();
    let output_tokens = chunks.iter().map(|c| c.tokens).sum();
    RequestRecord {
        index,
        class: 0,
        scheduled: ms(sent),
        sent: ms(sent),
        ended: chunks.last().map_or(ms(sent), |c| c.at),
        chunks,
        prompt_tokens: 32,
        max_tokens: output_tokens,
        output_tokens,
        completion_tokens: Some(output_tokens),
        cached_tokens: 0,
        finish_reason: Some("length".into()),
        failure: None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn percentiles_interpolate_between_ranks_like_numpy() {
    let sorted: Vec<f64> = (1..=10).map(f64::from).collect();
    // numpy.percentile([1..10], [50, 90, 99]) = [5.5, 9.1, 9.91]
    for (p, expected) in [(0.0, 1.0), (50.0, 5.5), (90.0, 9.1), (99.0, 9.91), (100.0, 10.0)] {
        assert!(close(percentile(&sorted, p), expected), "p{p}: {}", percentile(&sorted, p));
    }
    let stats = Stats::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
    assert_eq!(stats.count, 4);
    assert!(close(stats.mean, 4.0) && close(stats.p50, 2.5) && close(stats.p90, 7.9), "{stats:?}");
    assert!(close(Stats::of(&[7.0]).unwrap().p99, 7.0));
    assert_eq!(Stats::of(&[]), None);
}

#[test]
fn ttft_tpot_and_itl_follow_vllms_benchmark() {
    // One token per chunk: TTFT 100, E2E 130, TPOT (130 − 100) / (3 − 1) = 15, ITLs 10 and 20.
    let single = record(0, 0, &[(100, 1), (110, 1), (130, 1)]);
    assert_eq!((single.ttft(), single.e2e(), single.tpot()), (Some(ms(100)), ms(130), Some(ms(15))));
    assert_eq!(single.itls().collect::<Vec<_>>(), [ms(10), ms(20)]);
    // A chunk of four tokens counts four tokens arriving together: TPOT (90 − 50) / 4 = 10, one
    // ITL of 40 (one gap between two chunks).
    let multi = record(1, 0, &[(50, 1), (90, 4)]);
    assert_eq!((multi.ttft(), multi.tpot()), (Some(ms(50)), Some(ms(10))));
    assert_eq!(multi.itls().collect::<Vec<_>>(), [ms(40)]);
    // One token: no TPOT, no ITL.
    let one = record(2, 0, &[(20, 1)]);
    assert_eq!((one.tpot(), one.itls().count()), (None, 0));
}

#[test]
fn the_report_counts_completed_requests_and_spans_the_whole_run() {
    let mut failed = record(3, 50, &[(80, 1)]);
    failed.failure = Some(Failure::Status { code: tonic::Code::InvalidArgument, message: "too long".into() });
    failed.ended = ms(400);
    let mut timed_out = record(4, 10, &[]);
    timed_out.failure = Some(Failure::Timeout);
    let records = [
        record(0, 0, &[(100, 1), (110, 1), (130, 1)]),
        record(1, 20, &[(70, 1), (110, 4)]),
        record(2, 40, &[(60, 1)]),
        failed,
        timed_out,
    ];
    let report = ReplayReport::of_records(&records);
    assert_eq!((report.completed, report.failed), (3, 2));
    assert_eq!(
        report.failures.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
        [("InvalidArgument", 1), ("timeout", 1)]
    );
    // First send 0 ms, last end 400 ms (a failed request's end counts: the run lasted that long).
    assert!(close(report.duration_s, 0.4));
    assert_eq!((report.input_tokens, report.output_tokens), (96, 9));
    assert!(close(report.request_throughput, 7.5) && close(report.output_throughput, 22.5), "{report:?}");
    assert!(close(report.total_token_throughput, 105.0 / 0.4));
    // TTFT of the completed: 100, 50, 20 ms. TPOT: 15 and (90 − 50) / 4 = 10 (the one-token
    // request has none). ITL: 10, 20, 40. E2E: 130, 90, 20.
    let ttft = report.ttft.unwrap();
    assert!(close(ttft.mean, 170.0 / 3.0) && close(ttft.p50, 50.0), "{ttft:?}");
    let tpot = report.tpot.unwrap();
    assert!(tpot.count == 2 && close(tpot.mean, 12.5), "{tpot:?}");
    let itl = report.itl.unwrap();
    assert!(itl.count == 3 && close(itl.p50, 20.0) && close(itl.p99, 39.6), "{itl:?}");
    assert!(close(report.e2e.unwrap().p90, 122.0));

    let line = report.key_values();
    eprintln!("{line}\n{}", report.table());
    assert!(!line.contains('\n'));
    for pair in ["completed=3", "failed=2", "ttft_p50_ms=50", "tpot_mean_ms=12.5", "failures.timeout=1"] {
        assert!(line.split(' ').any(|p| p == pair), "{pair} in {line}");
    }
    assert!(report.table().lines().any(|l| l.starts_with("tpot") && l.contains("12.50")));
}

#[test]
fn a_run_where_nothing_completed_reports_no_latencies() {
    let mut lost = record(0, 0, &[]);
    lost.failure = Some(Failure::Incomplete);
    let report = ReplayReport::of_records(&[lost]);
    assert_eq!((report.completed, report.failed, report.ttft, report.e2e), (0, 1, None, None));
    assert_eq!(report.request_throughput, 0.0);
    assert!(!report.key_values().contains("ttft"));
    assert_eq!(ReplayReport::of_records(&[]).duration_s, 0.0);
}
