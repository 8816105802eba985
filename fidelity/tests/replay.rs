//! Replays against a real memory-service and runtime-service on 127.0.0.1:0, on tokio's paused
//! clock (the device's step times then pass instantly but are measured exactly).

use std::time::Duration;

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config};
use fidelity::{
    DriveError, Failure, Pacing, ReplayOptions, ReplayReport, Run, Schedule, Target, WorkloadSpec,
};

const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];

async fn stack() -> (MemoryServer, RuntimeServer) {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    e2e::wait_serving(runtime.channel().await, "vllm.grpc.engine.VllmEngine").await;
    (memory, runtime)
}

/// 6 requests of 32 prompt tokens and 8 output tokens, arriving as `arrival` says.
fn workload(arrival: &str) -> WorkloadSpec {
    WorkloadSpec::from_toml(&format!(
        "[arrival]\n{arrival}\n[[requests]]\ncount = 6\nprompt_tokens = 32\noutput_tokens = 8\n"
    ))
    .expect("valid workload")
}

async fn replay(target: &Target, spec: &WorkloadSpec, options: &ReplayOptions) -> (Schedule, Run) {
    let vocab = target.model_info().await.expect("GetModelInfo").vocab_size;
    let plan = spec.expand(vocab).expect("expands");
    let run = target.replay(plan.clone(), options).await.expect("replays");
    (plan, run)
}

/// What every request of a clean run must show.
fn assert_all_exact(run: &Run, output_tokens: u32) {
    for r in &run.records {
        assert_eq!(r.failure, None, "request {}", r.index);
        assert_eq!(
            (r.output_tokens, r.completion_tokens),
            (output_tokens, Some(output_tokens)),
            "ignore_eos"
        );
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert!(r.chunks.iter().all(|c| c.tokens == 1), "one token per chunk here");
        assert_eq!(r.itls().count() as u32, output_tokens - 1, "a gap between each two tokens");
        let ttft = r.ttft().expect("a first token");
        assert!(ttft <= r.e2e(), "{ttft:?} > {:?}", r.e2e());
        assert!(r.sent >= r.scheduled, "never sent before its arrival time");
        assert!(r.chunks.windows(2).all(|w| w[0].at <= w[1].at) && r.ended >= r.chunks[0].at);
    }
    let report = ReplayReport::of_run(run);
    eprintln!("{}", report.table());
    assert_eq!((report.completed, report.failed), (run.records.len(), 0));
    assert_eq!(report.output_tokens, u64::from(output_tokens) * run.records.len() as u64);
    assert!(report.output_throughput > 0.0 && report.request_throughput > 0.0, "{report:?}");
    assert!(report.ttft.is_some() && report.tpot.is_some() && report.itl.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_fixed_rate_replay_gets_every_token_at_its_arrival_times() {
    let (memory, runtime) = stack().await;
    let target = Target::connect(&format!("http://{}", runtime.addr), 2).await.expect("connects");
    let (plan, run) =
        replay(&target, &workload("kind = \"fixed-rate\"\nrate = 50.0"), &ReplayOptions::default()).await;
    assert_eq!(plan.pacing(), Pacing::Open);
    assert_eq!(run.records.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
    assert_eq!(run.records[5].scheduled, Duration::from_millis(100), "request i at i / 50 s");
    assert_all_exact(&run, 8);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_closed_loop_keeps_at_most_its_clients_in_flight() {
    let (memory, runtime) = stack().await;
    let target = Target::from_channels(vec![runtime.channel().await]).expect("a channel");
    let (plan, run) =
        replay(&target, &workload("kind = \"closed-loop\"\nclients = 2"), &ReplayOptions::default()).await;
    assert_eq!(plan.pacing(), Pacing::ClosedLoop { clients: 2 });
    assert_eq!(run.records.len(), 6);
    assert_eq!(run.max_in_flight, 2, "two clients, both busy at the start");
    assert_all_exact(&run, 8);
    // Each client sends its next request only when its previous one has ended: at any send,
    // fewer than two other requests are in flight.
    for r in &run.records {
        let others =
            run.records.iter().filter(|o| o.index != r.index && o.sent <= r.sent && o.ended > r.sent);
        assert!(others.count() < 2, "request {} sent while two were in flight", r.index);
    }
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refused_requests_are_counted_by_code_and_the_rest_complete() {
    let (memory, runtime) = stack().await;
    let target = Target::from_channels(vec![runtime.channel().await]).expect("a channel");
    // The test model takes prompts of 256 tokens at most.
    let spec = WorkloadSpec::from_toml(
        "[arrival]\nkind = \"burst\"\n\
         [[requests]]\ncount = 2\nprompt_tokens = 300\noutput_tokens = 4\n\
         [[requests]]\ncount = 3\nprompt_tokens = 16\noutput_tokens = 4\n",
    )
    .expect("valid workload");
    let (_, run) = replay(&target, &spec, &ReplayOptions::default()).await;
    let report = ReplayReport::of_run(&run);
    eprintln!("{}\n{}", report.table(), report.key_values());
    assert_eq!((report.completed, report.failed), (3, 2));
    assert_eq!(report.failures.get("InvalidArgument"), Some(&2));
    for r in run.records.iter().filter(|r| r.class == 0) {
        assert!(matches!(&r.failure, Some(Failure::Status { message, .. }) if !message.is_empty()), "{r:?}");
        assert!(r.chunks.is_empty());
    }
    assert!(report.key_values().contains("failures.InvalidArgument=2"));
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_time_scale_sends_sooner_and_reports_in_simulated_time() {
    let (memory, runtime) = stack().await;
    let target = Target::from_channels(vec![runtime.channel().await]).expect("a channel");
    let bad = ReplayOptions { time_scale: 0.0, ..ReplayOptions::default() };
    let spec = workload("kind = \"fixed-rate\"\nrate = 10.0");
    let plan = spec.expand(191).expect("expands");
    assert!(matches!(target.replay(plan, &bad).await, Err(DriveError::InvalidOptions(_))));
    // At scale 4 the requests planned 100 ms apart go 25 ms apart, and the records, scaled back,
    // still show each one sent no earlier than its planned offset.
    let options = ReplayOptions { time_scale: 4.0, ..ReplayOptions::default() };
    let start = tokio::time::Instant::now();
    let (_, run) = replay(&target, &spec, &options).await;
    assert!(start.elapsed() < Duration::from_millis(500), "the last request left at 125 ms, not 500");
    assert_all_exact(&run, 8);
    assert!(run.records[5].sent >= Duration::from_millis(500));
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_target_that_is_not_there_is_an_error_not_a_panic() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let err = Target::connect(&format!("http://{addr}"), 1).await.expect_err("nobody listens");
    assert!(matches!(err, DriveError::Connect(_)), "{err}");
    assert!(matches!(Target::connect("not a uri", 1).await, Err(DriveError::InvalidTarget(_))));
    assert!(matches!(Target::from_channels(vec![]), Err(DriveError::InvalidTarget(_))));
}
