//! The published points: every key is known, each maps to a scenario with vLLM's limits or is
//! skipped with a reason, and comparisons give the signed error and MAPE.

use std::collections::{BTreeMap, HashSet};

use fidelity::{
    Arrival, ReplayReport, Stats,
    published::{self, Latency, Mapping, Metric, Point, RUNTIME_PRESETS, Stat},
};

const PUBLISHED: &str = include_str!("../published.toml");

fn points() -> Vec<Point> {
    published::parse(PUBLISHED).expect("published.toml parses")
}

fn point(id: &str) -> Point {
    points().into_iter().find(|p| p.id == id).expect("known point")
}

fn scenario(id: &str) -> published::Scenario {
    match published::map_point(&point(id)) {
        Mapping::Replay(s) => *s,
        Mapping::Skip { reason, .. } => panic!("{id} skipped: {reason}"),
    }
}

#[test]
fn every_key_of_the_file_is_known_and_ids_are_unique() {
    let points = points();
    assert!(!points.is_empty());
    for p in &points {
        assert!(p.unknown_keys().is_empty(), "{}: unknown keys {:?}", p.id, p.unknown_keys());
        assert!(Metric::all().into_iter().any(|m| p.metric(m).is_some()), "{} publishes no metric", p.id);
    }
    let ids: HashSet<_> = points.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids.len(), points.len());
    // An unknown key is kept, not refused; integers read as figures too.
    let extra = PUBLISHED.replacen("regime = ", "new_metric_ms = 3.5\ne2e_p90_ms = 7\nregime = ", 1);
    let first = published::parse(&extra).unwrap().remove(0);
    assert_eq!(first.unknown_keys(), ["new_metric_ms"]);
    assert_eq!(first.metric(Metric::Latency(Latency::E2e, Stat::P90)), Some(7.0));
}

#[test]
fn the_presets_named_here_are_the_runtimes() {
    let mut ours: Vec<String> = RUNTIME_PRESETS.iter().map(|s| s.to_string()).collect();
    let mut theirs = serving::device::DeviceSpec::preset_names();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn points_on_a_gpu_without_a_preset_are_skipped_with_the_reason() {
    let mut replayed = HashSet::new();
    for mapping in points().iter().map(published::map_point) {
        match mapping {
            Mapping::Replay(s) => {
                assert!(RUNTIME_PRESETS.contains(&s.point.gpu.as_str()));
                // Every scenario expands for Llama-3's vocabulary, one request per prompt.
                let plan = s.workload.expand(128_256).unwrap_or_else(|e| panic!("{}: {e}", s.point.id));
                assert_eq!(plan.requests().len(), s.point.num_prompts as usize, "{}", s.point.id);
                replayed.insert(s.point.gpu);
            }
            Mapping::Skip { gpu, reason, id } => {
                eprintln!("{id}: {reason}");
                if RUNTIME_PRESETS.contains(&gpu.as_str()) {
                    assert!(reason.starts_with("lengths not published"), "{id}: {reason}");
                } else {
                    assert!(reason.contains(&format!("no device preset for {gpu}")), "{reason}");
                }
            }
        }
    }
    for gpu in ["h100-sxm", "a100-40gb", "a100-80gb"] {
        assert!(replayed.contains(gpu), "{gpu} not in {replayed:?}");
    }
}

#[test]
fn per_request_lengths_are_replayed_request_by_request() {
    let lambda = point("lambda-h100-sxm-c10-len2048");
    let Mapping::Replay(s) = published::map_point(&lambda) else { panic!("skipped") };
    assert_eq!(s.workload.arrival, Arrival::Burst);
    let lens = lambda.input_lens.clone().unwrap();
    let outs = lambda.output_lens.clone().unwrap();
    let classes: Vec<_> =
        s.workload.requests.iter().map(|c| (c.count, c.prompt_tokens, c.output_tokens)).collect();
    let expected: Vec<_> = lens.iter().zip(&outs).map(|(&i, &o)| (1, i, o.max(1))).collect();
    assert_eq!(classes, expected);
    assert!(s.workload.requests.iter().all(|c| c.ignore_eos), "published lengths are forced");
    // vLLM 0.6.0, --max-model-len 2048 and multi-step: max(2048, 2048) tokens, 256 sequences.
    assert_eq!(
        s.runtime.flags().join(" "),
        "--device h100-sxm --engine-model llama-3.1-8b --max-batch-size 256 --max-batched-tokens 2048 \
         --prefix-caching off --scheduler sequential --chunked-prefill off --decode-steps 10 --ttft-timeout-ms 3600000 \
         --idle-timeout-ms 3600000 --max-stream-lifetime-ms 3600000"
    );
    assert!(s.notes.iter().any(|n| n.contains("ITL not compared")), "{:?}", s.notes);
    // A list that does not match num_prompts is not guessed at.
    let short = Point { output_lens: Some(outs[..3].to_vec()), ..lambda };
    let Mapping::Skip { reason, .. } = published::map_point(&short) else { panic!("replayed") };
    assert!(reason.contains("num_prompts (10)"), "{reason}");
}

#[test]
fn an_offline_batch_is_a_burst_on_its_gpu_with_vllm_v0_limits() {
    let burst = scenario("argonne-h100-b16-1024x1024");
    assert_eq!(burst.workload.arrival, Arrival::Burst);
    let class = &burst.workload.requests[0];
    assert_eq!(
        (class.count, class.prompt_tokens, class.output_tokens, class.ignore_eos),
        (16, 1024, 1024, true)
    );
    // vLLM ≤ 0.6 (V0): 256 sequences, max(max_model_len 8192, 2048) tokens, no prefix caching.
    assert_eq!(
        burst.runtime.flags().join(" "),
        "--device h100-sxm --engine-model llama-3.1-8b --max-batch-size 256 --max-batched-tokens 8192 \
         --prefix-caching off --scheduler sequential --chunked-prefill off --decode-steps 1 --ttft-timeout-ms 3600000 \
         --idle-timeout-ms 3600000 --max-stream-lifetime-ms 3600000"
    );
    assert!(burst.runtime.limits.basis.starts_with("inferred"), "{}", burst.runtime.limits.basis);

    let sequential = scenario("argonne-a100-b1-128x128");
    assert_eq!(sequential.workload.arrival, Arrival::ClosedLoop { clients: 1 });
    assert_eq!(sequential.runtime.device, "a100-40gb");
}

#[test]
fn limits_follow_the_engine_generation_unless_the_source_states_them() {
    let base = point("sglang060-a100-80gb-sharegpt-rate4");
    // V0 server with --max_model_len 4096 in its command line.
    let v0 = published::vllm_limits(&base);
    assert_eq!((v0.max_num_seqs, v0.max_num_batched_tokens, v0.prefix_caching), (256, 4096, false));
    // V1: the large table on an H100, the small one elsewhere (A100 by name since PR #17885).
    let v1 = |gpu: &str, api: &str| {
        let p = Point { engine: "vllm 0.10.1".into(), gpu: gpu.into(), api: api.into(), ..base.clone() };
        let l = published::vllm_limits(&p);
        (l.max_num_seqs, l.max_num_batched_tokens, l.prefix_caching)
    };
    assert_eq!(v1("h100-sxm", "openai-server"), (1024, 8192, true));
    assert_eq!(v1("h100-sxm", "offline"), (1024, 16384, true));
    assert_eq!(v1("a100-40gb", "openai-server"), (256, 2048, true));
    assert_eq!(v1("l4", "offline"), (256, 8192, true));
    // Long context on V0 turns chunked prefill on: 512 tokens, and sequences capped by them.
    let long = Point { model: "llama-3.1-8b".into(), engine_note: String::new(), ..base.clone() };
    let l = published::vllm_limits(&long);
    assert_eq!((l.max_num_seqs, l.max_num_batched_tokens), (256, 512));
    let stated = Point { max_num_seqs: Some(64), max_num_batched_tokens: Some(32), ..base };
    let l = published::vllm_limits(&stated);
    assert_eq!(
        (l.max_num_seqs, l.max_num_batched_tokens, l.basis.as_str()),
        (32, 32, "stated by the source")
    );
}

fn report(duration_s: f64, total_tok_s: f64, p50s: [f64; 4]) -> ReplayReport {
    let stats = |p50: f64| Some(Stats { count: 1, mean: p50, p50, p90: p50, p99: p50 });
    ReplayReport {
        completed: 1,
        failed: 0,
        failures: BTreeMap::new(),
        duration_s,
        input_tokens: 0,
        output_tokens: 0,
        request_throughput: 0.0,
        output_throughput: 0.0,
        total_token_throughput: total_tok_s,
        ttft: stats(p50s[0]),
        tpot: stats(p50s[1]),
        itl: stats(p50s[2]),
        e2e: stats(p50s[3]),
        max_in_flight: 1,
    }
}

#[test]
fn comparisons_give_the_signed_error_and_mape_per_metric_and_gpu() {
    let h100 = point("argonne-h100-b16-1024x1024");
    let a100 = point("argonne-a100-ttft-b16-1024");
    let latency = h100.metric(Metric::BatchLatency).unwrap();
    let throughput = h100.metric(Metric::TotalThroughput).unwrap();
    let ttft_batch = a100.metric(Metric::TtftBatch).unwrap();
    let mut comparisons = published::compare(&h100, &report(latency * 1.1, throughput * 0.8, [1.0; 4]));
    comparisons.extend(published::compare(&a100, &report(ttft_batch * 1.3, 0.0, [1.0; 4])));
    eprintln!("{}", published::comparison_table(&comparisons));
    let errors: Vec<_> =
        comparisons.iter().map(|c| (c.metric, (c.error().unwrap() * 1000.0).round() / 1000.0)).collect();
    assert_eq!(
        errors,
        [(Metric::BatchLatency, 0.1), (Metric::TotalThroughput, -0.2), (Metric::TtftBatch, 0.3)],
        "only what each point publishes"
    );
    let mape = published::mape(&comparisons);
    eprintln!("{}", mape.table());
    let rows = |rows: &[published::MapeRow]| {
        rows.iter().map(|r| (r.key.clone(), (r.mape_pct * 10.0).round() / 10.0, r.n)).collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&mape.by_metric),
        [
            ("batch_latency_s".into(), 10.0, 1),
            ("total_throughput_tok_s".into(), 20.0, 1),
            ("ttft_batch_s".into(), 30.0, 1)
        ]
    );
    assert_eq!(rows(&mape.by_gpu), [("a100-40gb".into(), 30.0, 1), ("h100-sxm".into(), 15.0, 2)]);
    assert_eq!(rows(std::slice::from_ref(&mape.overall)), [("all".into(), 20.0, 3)]);

    // A run where nothing completed is counted as missing, not as 0 % or 100 % error.
    let mut failed = report(0.0, 0.0, [1.0; 4]);
    failed.completed = 0;
    let missing = published::compare(&h100, &failed);
    assert!(missing.iter().all(|c| c.simulated.is_none()));
    assert_eq!((published::mape(&missing).overall.n, published::mape(&missing).overall.missing), (0, 2));
}

#[test]
fn latency_statistics_compare_with_the_same_statistic() {
    let mut point = point("argonne-h100-b16-1024x1024");
    point.engine_note = String::new();
    point.rest.clear();
    for (key, value) in
        [("ttft_mean_ms", 10.0), ("tpot_p99_ms", 4.0), ("itl_p50_ms", 2.0), ("e2e_p50_ms", 100.0)]
    {
        point.rest.insert(key.into(), toml::Value::Float(value));
    }
    // ttft 11, tpot 5, itl 3, e2e 80 in every statistic.
    let pairs: Vec<_> = published::compare(&point, &report(1.0, 1.0, [11.0, 5.0, 3.0, 80.0]))
        .into_iter()
        .map(|c| (c.metric.key(), (c.error().unwrap() * 100.0).round()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("ttft_mean_ms".into(), 10.0),
            ("tpot_p99_ms".into(), 25.0),
            ("itl_p50_ms".into(), 50.0),
            ("e2e_p50_ms".into(), -20.0)
        ]
    );
}

#[test]
fn itl_is_not_compared_when_vllm_streamed_several_tokens_per_chunk() {
    let multi_step = point("sglang060-a100-80gb-sharegpt-rate4");
    let keys = |p: &Point| -> Vec<String> {
        published::compare(p, &report(1.0, 1.0, [1.0; 4])).into_iter().map(|c| c.metric.key()).collect()
    };
    assert_eq!(keys(&multi_step), ["ttft_p50_ms", "tpot_p50_ms", "e2e_p50_ms"]);
    let single_step = Point { engine_note: String::new(), ..multi_step };
    assert!(keys(&single_step).contains(&"itl_p50_ms".to_owned()));
}
