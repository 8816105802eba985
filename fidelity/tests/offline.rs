//! The offline simulator and the live path agree: the same workload replayed through the engine
//! dialect over gRPC (in-process services) and on the offline device (no network), both on
//! tokio's paused clock, gives each request the same time to first token and end-to-end latency
//! within the host timer's millisecond.
//!
//! Arrivals are spaced (fixed-rate, Poisson): requests that arrive at the same instant are a race
//! in a live service (the first may start a step alone while the others are still being read off
//! the socket), but join one step offline, as a burst handed to vLLM's engine at once does.

mod virtual_stack;

use std::time::Duration;

use fidelity::{RequestRecord, Run, WorkloadSpec, simulate};

/// How far apart one request's times may be: timers fire on whole milliseconds, and a request
/// read off a socket can reach the device a tick later than one handed over in-process.
const TOLERANCE: Duration = Duration::from_millis(3);

/// The largest gap between the two runs' values of `what`, request by request.
fn worst(live: &Run, offline: &Run, what: impl Fn(&RequestRecord) -> Option<Duration>) -> Duration {
    assert_eq!(live.records.len(), offline.records.len());
    live.records
        .iter()
        .zip(&offline.records)
        .map(|(l, o)| what(l).expect("live").abs_diff(what(o).expect("offline")))
        .max()
        .unwrap_or_default()
}

async fn agree(name: &str, flags: &[&str], workload: &str) {
    let workload = WorkloadSpec::from_toml(workload).expect("a valid workload");
    let config = || simulate::runtime_config(None, flags.iter().map(|f| f.to_string()), None).expect("valid");
    let live = virtual_stack::replay_config(config(), &workload).await;
    let offline = virtual_stack::replay_offline(config(), &workload).await;
    for run in [&live, &offline] {
        assert!(run.records.iter().all(RequestRecord::succeeded), "{name}: every request completes");
    }
    let tokens = |run: &Run| run.records.iter().map(|r| r.output_tokens).collect::<Vec<_>>();
    assert_eq!(tokens(&live), tokens(&offline), "{name}: the same tokens");
    let batched = offline.max_in_flight;
    let ttft = worst(&live, &offline, RequestRecord::ttft);
    let e2e = worst(&live, &offline, |r| Some(r.e2e()));
    eprintln!("{name}: up to {batched} in flight; worst TTFT gap {ttft:?}, worst E2E gap {e2e:?}");
    assert!(batched > 4, "{name}: the load batches requests");
    assert!(ttft <= TOLERANCE && e2e <= TOLERANCE, "{name}: TTFT gap {ttft:?}, E2E gap {e2e:?}");
}

#[tokio::test(start_paused = true)]
async fn offline_and_live_agree_under_a_steady_rate() {
    let flags = ["--device", "h100-sxm", "--engine-model", "llama-3.1-8b", "--prefix-caching", "off"];
    let workload = r#"
        [arrival]
        kind = "fixed-rate"
        rate = 20.0

        [[requests]]
        count = 30
        prompt_tokens = 1024
        output_tokens = 128

        [[requests]]
        count = 10
        prompt_tokens = 128
        output_tokens = 512
    "#;
    agree("fixed-rate, overlapped", &flags, workload).await;
}

#[tokio::test(start_paused = true)]
async fn offline_and_live_agree_under_poisson_arrivals_with_shared_prefixes() {
    let flags = ["--device", "a100-80gb", "--engine-model", "llama-3.1-8b", "--scheduler", "sequential"];
    let workload = r#"
        shuffle_seed = 3
        [arrival]
        kind = "poisson"
        rate = 12.0
        seed = 5

        [[requests]]
        count = 30
        prompt_tokens = 768
        output_tokens = 64
        prefix_group = "system"
        shared_prefix_tokens = 512

        [[requests]]
        count = 10
        prompt_tokens = 2048
        output_tokens = 256
    "#;
    agree("poisson, sequential, prefix cache", &flags, workload).await;
}

/// A kv-cache pool that holds three sequences: the offline leaser refuses past it, the device
/// queues and preempts as it would against a full memory-service pool, and every request still
/// completes, the later ones later.
#[tokio::test(start_paused = true)]
async fn a_small_pool_queues_requests_and_every_one_completes() {
    let flags = ["--device", "h100-sxm", "--engine-model", "llama-3.1-8b", "--prefix-caching", "off"];
    let config = simulate::runtime_config(None, flags.iter().map(|f| f.to_string()), None).expect("valid");
    let spec = config.engine_model().expect("an engine model");
    let per_sequence = (1024 + 256_u64).div_ceil(u64::from(config.kv_block_tokens))
        * spec.block_bytes(config.kv_block_tokens);
    let workload = WorkloadSpec::from_toml(
        "[arrival]\nkind = \"burst\"\n[[requests]]\ncount = 12\nprompt_tokens = 1024\noutput_tokens = 256\n",
    )
    .expect("valid");
    let options = fidelity::ReplayOptions::default();
    let small =
        simulate::replay_offline(config.clone(), 3 * per_sequence, &workload, &options).await.expect("runs");
    let roomy =
        simulate::replay_offline(config, 100 * per_sequence, &workload, &options).await.expect("runs");
    for run in [&small, &roomy] {
        assert!(run.records.iter().all(RequestRecord::succeeded), "every request completes");
        assert!(run.records.iter().all(|r| r.output_tokens == 256));
    }
    let last = |run: &Run| run.records.iter().map(RequestRecord::e2e).max().expect("records");
    assert!(
        last(&small) > last(&roomy) * 2,
        "{:?} vs {:?}: three at a time take longer",
        last(&small),
        last(&roomy)
    );
}
