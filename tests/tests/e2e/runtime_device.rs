//! The device end to end: concurrent generations share it (per-stream TPOT rises while the
//! aggregate rises sub-linearly), kv-cache in memory-service follows the live sequences, a small
//! pool preempts and still completes everything, and two runtimes on one memory-service trade
//! kv-cache as their loads shift. All on tokio's paused clock, so the numbers are the simulation's.

use std::time::Duration;

use e2e::{
    MemoryServer, RuntimeServer, TEST_BLOCK_BYTES, config_with_pools, runtime_config, sample, stats,
    wait_for_used,
};
use proto::runtime::v1::{GenerateRequest, GenerateResponse, Summary, generate_response::Item};
use runtime_service::{config::parse_models, roofline::Roofline};
use serving::{arch::Arch, device::DeviceSpec};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Streaming;

fn request(model: &str, prompt_words: usize, max_tokens: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: vec!["word"; prompt_words].join(" "),
        max_tokens,
        seed,
        ..GenerateRequest::default()
    }
}

/// Reads `n` tokens (checking their order).
async fn read(stream: &mut Streaming<GenerateResponse>, from: u32, n: u32) {
    for index in from..from + n {
        match stream.next().await.expect("open").expect("no error").item {
            Some(Item::Token(token)) => assert_eq!(token.index, index, "each token once, in order"),
            other => panic!("expected token {index}, got {other:?}"),
        }
    }
}

/// Reads to the summary, checking that every index comes once and in order.
async fn finish(stream: &mut Streaming<GenerateResponse>, from: u32) -> Summary {
    let mut next = from;
    while let Some(item) = stream.next().await {
        match item.expect("no error").item {
            Some(Item::Token(token)) => {
                assert_eq!(token.index, next, "each token once, in order");
                next += 1;
            }
            Some(Item::Summary(summary)) => {
                assert_eq!(summary.completion_tokens, next);
                return summary;
            }
            None => panic!("empty item"),
        }
    }
    panic!("no summary")
}

/// A memory-service whose kv-cache pool holds `kv` bytes, with room for everything else.
async fn memory_with_kv(kv: u64) -> MemoryServer {
    MemoryServer::with_pools(&[("kv-cache", kv), ("activations", 64 << 20), ("uniforms", 64 << 20)]).await
}

fn secs(d: Option<prost_types::Duration>) -> f64 {
    Duration::try_from(d.expect("set")).expect("non-negative").as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn concurrent_streams_share_the_device_per_stream_tpot_rises_aggregate_rises_sublinearly() {
    let device = DeviceSpec::preset("a100-40gb").expect("preset");
    let memory = MemoryServer::start(config_with_pools(&serving::models::pool_split(&device))).await;
    let config = runtime_service::Config {
        device: device.clone(),
        models: parse_models("[[models]]\nkey = \"llama-3.1-8b\"\nmock_lm = \"webllm\"\npreload = true\n")
            .expect("models"),
        ..runtime_config(memory.addr)
    };
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let client = runtime.client().await;
    let mut levels = Vec::new();
    for concurrency in [1u64, 8, 32] {
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut stream = client
                        .generate(request("llama-3.1-8b", 128, 32, i))
                        .await
                        .expect("admitted")
                        .into_inner();
                    finish(&mut stream, 0).await
                })
            })
            .collect();
        let mut summaries = Vec::new();
        for task in tasks {
            summaries.push(task.await.expect("stream task"));
        }
        let wall = (Instant::now() - started).as_secs_f64();
        let tpot =
            summaries.iter().map(|s| secs(s.time_per_output_token)).sum::<f64>() / summaries.len() as f64;
        let aggregate = (32 * concurrency) as f64 / wall;
        let batch = summaries.iter().map(|s| s.mean_batch_size).fold(0.0, f64::max);
        levels.push((concurrency, tpot, aggregate, batch));
    }
    let floor =
        Roofline::weights_floor(&device, &Arch::preset("llama-3.1-8b").expect("preset")).as_secs_f64();
    let [(_, tpot1, agg1, _), (_, tpot8, agg8, batch8), (_, tpot32, agg32, batch32)] = levels[..] else {
        unreachable!()
    };
    assert!(tpot1 > floor, "a decode step never beats weights / bandwidth: {tpot1} <= {floor}");
    assert!(tpot1 < tpot8 && tpot8 < tpot32, "per-stream TPOT rises: {levels:?}");
    assert!(agg1 < agg8 && agg8 < agg32, "aggregate throughput rises: {levels:?}");
    assert!(agg32 < 32.0 * agg1, "sub-linearly: {levels:?}");
    assert!(agg32 > 4.0 * agg1, "but a lot, since the weights are read once per step: {levels:?}");
    // Prompts are prefilled in chunks of the token budget, so early steps hold fewer sequences.
    assert!(batch8 > 6.0 && batch32 > 20.0, "they shared steps: {levels:?}");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn kv_cache_in_memory_service_follows_the_live_sequences() {
    let memory = memory_with_kv(64 << 20).await;
    let config = runtime_service::Config { kv_slab_blocks: 4, ..runtime_config(memory.addr) };
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut pools = memory.client().await;
    assert_eq!(stats(&mut pools, "kv-cache").await.used_bytes, 0, "nothing leased before any sequence");
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut client = runtime.client().await;
        streams
            .push(client.generate(request("test-webllm", 7, 400, i)).await.expect("admitted").into_inner());
    }
    for stream in &mut streams {
        read(stream, 0, 1).await;
    }
    let early = stats(&mut pools, "kv-cache").await.used_bytes;
    for stream in &mut streams {
        read(stream, 1, 199).await;
    }
    let late = stats(&mut pools, "kv-cache").await.used_bytes;
    // 8 sequences of 7 + 199 tokens hold ceil(206 / 16) = 13 blocks each at least.
    assert!(late >= 8 * 13 * TEST_BLOCK_BYTES, "{late}");
    assert!(late > early, "leased as the sequences grew: {early} then {late}");
    for stream in &mut streams {
        finish(stream, 200).await;
    }
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_small_kv_pool_preempts_and_every_generation_still_completes() {
    // 16 blocks for 6 sequences that each grow to 8 (7 + 120 tokens).
    let memory = memory_with_kv(16 * TEST_BLOCK_BYTES).await;
    let config = runtime_service::Config { kv_slab_blocks: 4, ..runtime_config(memory.addr) };
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let client = runtime.client().await;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut stream =
                    client.generate(request("test-webllm", 7, 120, i)).await.expect("admitted").into_inner();
                finish(&mut stream, 0).await
            })
        })
        .collect();
    let mut preemptions = 0;
    for task in tasks {
        let summary = task.await.expect("completes");
        assert_eq!(summary.completion_tokens, 120);
        preemptions += summary.preemptions;
    }
    assert!(preemptions > 0, "the pool could not hold all six at once");
    let rt = runtime.scrape().await;
    assert_eq!(sample(&rt, "runtime_preemptions_total", &[]), Some(f64::from(preemptions)));
    let mut pools = memory.client().await;
    let kv = stats(&mut pools, "kv-cache").await;
    assert!(kv.peak_used_bytes <= 16 * TEST_BLOCK_BYTES, "never over-committed: {kv:?}");
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

/// The blocks a runtime holds now, from its metrics.
async fn held_blocks(runtime: &RuntimeServer) -> f64 {
    let text = runtime.scrape().await;
    sample(&text, "runtime_kv_blocks", &[r#"model="test-webllm""#, r#"state="total""#]).unwrap_or(0.0)
}

#[tokio::test(start_paused = true)]
async fn two_runtimes_on_one_memory_service_trade_kv_cache_as_their_loads_shift() {
    // 64 blocks in all; eight sequences of 7 + 120 tokens want 64 on their own.
    let memory = memory_with_kv(64 * TEST_BLOCK_BYTES).await;
    let runtimes = e2e::runtimes_on(memory.addr, 2).await;
    for (busy, idle) in [(0, 1), (1, 0)] {
        let mut streams = Vec::new();
        for i in 0..8 {
            let mut client = runtimes[busy].client().await;
            streams.push(
                client.generate(request("test-webllm", 7, 120, i)).await.expect("admitted").into_inner(),
            );
        }
        for stream in &mut streams {
            read(stream, 0, 60).await;
        }
        // The busy runtime holds more than half the pool: static halves could not.
        let (held, other) = (held_blocks(&runtimes[busy]).await, held_blocks(&runtimes[idle]).await);
        assert!(held > 32.0, "runtime {busy} holds {held} of 64 blocks");
        assert_eq!(other, 0.0, "the idle runtime gave its slabs back");
        for stream in &mut streams {
            finish(stream, 60).await;
        }
        wait_for_used(&memory, "kv-cache", 0).await;
    }
    for runtime in runtimes {
        runtime.stop().await;
    }
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_runtimes_each_needing_most_of_the_pool_take_turns_instead_of_waiting_for_each_other() {
    // 64 blocks; each runtime has one sequence that grows to 38 (200 prompt + 400 tokens):
    // together they do not fit, alone each does. Leased piece by piece, each could hold part and wait for
    // the rest for ever; a lane that cannot start gives all back and asks for its whole need.
    let memory = memory_with_kv(64 * TEST_BLOCK_BYTES).await;
    let runtimes = e2e::runtimes_on(memory.addr, 2).await;
    let mut clients = Vec::new();
    for runtime in &runtimes {
        clients.push(runtime.client().await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let mut stream = client
                    .generate(request("test-webllm", 200, 400, i as u64))
                    .await
                    .expect("admitted")
                    .into_inner();
                finish(&mut stream, 0).await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("completes").completion_tokens, 400);
    }
    // Each alone takes about 1.2 s; a hold-and-wait would last until a 10 s idle-gap limit.
    assert!(Instant::now() - started < Duration::from_secs(8), "{:?}", Instant::now() - started);
    wait_for_used(&memory, "kv-cache", 0).await;
    for runtime in runtimes {
        runtime.stop().await;
    }
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_front_ends_fixed_cost_delays_the_first_token_by_exactly_that_much() {
    let mut ttfts = Vec::new();
    for frontend_s in [0.0, 0.25] {
        let memory = memory_with_kv(64 << 20).await;
        let device = DeviceSpec { frontend_s, ..e2e::test_device() };
        let runtime =
            RuntimeServer::start(runtime_service::Config { device, ..runtime_config(memory.addr) }).await;
        runtime.ready().await;
        let mut client = runtime.client().await;
        let mut stream =
            client.generate(request("test-webllm", 8, 4, 1)).await.expect("admitted").into_inner();
        ttfts.push(secs(finish(&mut stream, 0).await.time_to_first_token));
        runtime.stop().await;
        memory.stop().await;
    }
    // The same run but for the front end: on the paused clock, the difference is the cost itself.
    let added = ttfts[1] - ttfts[0];
    assert!((added - 0.25).abs() < 0.005, "TTFTs {ttfts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_time_scaled_device_runs_faster_and_reports_the_same_simulated_times() {
    let mut runs = Vec::new();
    for factor in [1.0, 10.0] {
        let memory = memory_with_kv(64 << 20).await;
        let time_scale = runtime_service::config::TimeScale::new(factor).expect("in range");
        let runtime =
            RuntimeServer::start(runtime_service::Config { time_scale, ..runtime_config(memory.addr) }).await;
        runtime.ready().await;
        let mut client = runtime.client().await;
        let started = Instant::now();
        let mut stream =
            client.generate(request("test-webllm", 64, 32, 3)).await.expect("admitted").into_inner();
        let summary = finish(&mut stream, 0).await;
        let wall = (Instant::now() - started).as_secs_f64();
        runs.push((wall, secs(summary.time_to_first_token), secs(summary.time_per_output_token)));
        runtime.stop().await;
        memory.stop().await;
    }
    let [(wall1, ttft1, tpot1), (wall10, ttft10, tpot10)] = runs[..] else { unreachable!() };
    // The same seeded device: the same simulated times, reached ten times sooner. The schedule
    // keeps its ideal times (timer lateness never accumulates), so TPOT holds; one event alone
    // may be seen up to a timer tick (1 ms of wall, 10 ms simulated here) late.
    assert!((tpot10 / tpot1 - 1.0).abs() < 0.05, "{runs:?}");
    assert!(ttft10 >= ttft1 - 1e-9 && ttft10 <= ttft1 + 0.010 + 1e-9, "{runs:?}");
    assert!((wall1 / wall10 - 10.0).abs() < 1.0, "{runs:?}");
}
