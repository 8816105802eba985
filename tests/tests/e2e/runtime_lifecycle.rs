//! Every way a generation can end returns its memory: completion, Cancel, client disconnect,
//! deadline, shutdown; plus a small kv-cache pool, load shedding, and memory-service going away
//! and coming back. A generation's KV blocks go back to the device at once; the device's slabs go
//! back to memory-service as soon as the model falls idle (the tests' linger is zero).
//!
//! Here, the ways one generation ends and what load does; shutting the runtime down is in
//! `shutdown`, memory-service going away in `memory_loss`, both with the helpers here.

mod memory_loss;
mod shutdown;

use std::time::Duration;

use e2e::{
    MemoryServer, RuntimeServer, TEST_BLOCK_BYTES, config_with_pools, runtime_config, sample, stats,
    wait_for_used,
};
use proto::runtime::v1::{
    CancelRequest, GenerateRequest, GenerateResponse, generate_response::Item,
    runtime_service_client::RuntimeServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, Status, Streaming, transport::Channel};
use tonic_types::StatusExt;

const POOLS: &[(&str, u64)] = &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];

fn request(max_tokens: u32, request_id: &str) -> GenerateRequest {
    e2e::generate_request(max_tokens, request_id)
}

async fn read_tokens(stream: &mut Streaming<GenerateResponse>, n: usize) {
    for _ in 0..n {
        match stream.next().await.expect("open").expect("no error").item {
            Some(Item::Token(_)) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
}

/// Reads to the end; the status the stream ended with (OK if it ended with a summary).
async fn outcome(stream: &mut Streaming<GenerateResponse>) -> Result<(), Status> {
    while let Some(item) = stream.next().await {
        if let Some(Item::Summary(_)) = item?.item {
            return Ok(());
        }
    }
    Ok(())
}

/// The generations' memory is back in memory-service: no kv-cache slab is left, and only the
/// device's standing activation buffers remain.
async fn assert_generation_memory_returned(memory: &MemoryServer) {
    wait_for_used(memory, "kv-cache", 0).await;
    let mut pools = memory.client().await;
    let kv = stats(&mut pools, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.live_leases), (0, 0), "{kv:?}");
    let activations = stats(&mut pools, "activations").await;
    assert!(activations.live_leases <= 1, "{activations:?}");
}

async fn stack(
    config: impl FnOnce(&mut runtime_service::Config),
) -> (MemoryServer, RuntimeServer, RuntimeServiceClient<Channel>) {
    let memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let mut runtime_config = runtime_config(memory.addr);
    config(&mut runtime_config);
    let runtime = RuntimeServer::start(runtime_config).await;
    runtime.ready().await;
    let client = runtime.client().await;
    (memory, runtime, client)
}

#[tokio::test(start_paused = true)]
async fn cancel_mid_stream_ends_it_and_frees_its_memory() {
    let (memory, runtime, mut client) = stack(|_| {}).await;
    let mut stream = client.generate(request(400, "to-cancel")).await.unwrap().into_inner();
    read_tokens(&mut stream, 3).await;

    let reply = client.cancel(CancelRequest { request_id: "to-cancel".into() }).await.unwrap().into_inner();
    assert!(!reply.was_queued);
    assert_eq!(outcome(&mut stream).await.unwrap_err().code(), Code::Cancelled);
    // Its blocks were back in the device's pool before the status reached the client.
    let used = [r#"model="test-webllm""#, r#"state="used""#];
    assert_eq!(sample(&runtime.scrape().await, "runtime_kv_blocks", &used), Some(0.0));
    assert_generation_memory_returned(&memory).await;
    // The id is free again once the generation is gone.
    let again = client.cancel(CancelRequest { request_id: "to-cancel".into() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_hangs_up_frees_its_memory() {
    let (memory, runtime, mut client) = stack(|_| {}).await;
    let mut stream = client.generate(request(400, "hang-up")).await.unwrap().into_inner();
    read_tokens(&mut stream, 2).await;
    drop(stream);
    assert_generation_memory_returned(&memory).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deadline_mid_stream_frees_its_memory() {
    let (memory, runtime, mut client) = stack(|_| {}).await;
    let mut req = tonic::Request::new(request(400, "deadline"));
    req.set_timeout(Duration::from_millis(100)); // 400 tokens take 1.2 s
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let err = outcome(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let used = [r#"model="test-webllm""#, r#"state="used""#];
    assert_eq!(sample(&runtime.scrape().await, "runtime_kv_blocks", &used), Some(0.0));
    assert_generation_memory_returned(&memory).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn twenty_generations_on_a_small_kv_pool_all_complete_by_waiting_for_blocks() {
    // kv-cache for two generations at a time: each reaches 7 + 19 tokens, two 16-token blocks.
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 4 * TEST_BLOCK_BYTES),
        ("activations", 64 << 20),
        ("uniforms", 64 << 20),
    ]))
    .await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    let client = runtime.client().await;

    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = client.generate(request(20, &format!("small-{i}"))).await?.into_inner();
            let mut summary = None;
            while let Some(item) = stream.next().await {
                if let Some(Item::Summary(s)) = item?.item {
                    summary = Some(s);
                }
            }
            Ok::<_, Status>(summary.expect("summary"))
        }));
    }
    let mut waited = 0;
    for task in tasks {
        let summary = task.await.unwrap().expect("waited, not failed");
        assert_eq!(summary.completion_tokens, 20);
        if Duration::try_from(summary.queue_wait.unwrap()).unwrap() > Duration::from_millis(10) {
            waited += 1;
        }
    }
    assert!(waited >= 10, "most generations waited for KV blocks ({waited})");
    assert_generation_memory_returned(&memory).await;
    let mut pools = memory.client().await;
    assert!(stats(&mut pools, "kv-cache").await.peak_used_bytes <= 4 * TEST_BLOCK_BYTES);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_load_and_cancel_reaches_queued_work() {
    let (memory, runtime, mut client) = stack(|c| {
        c.max_batch_size = 1;
        c.queue_capacity = 1;
    })
    .await;
    let mut running = client.generate(request(400, "running")).await.unwrap().into_inner();
    read_tokens(&mut running, 1).await;
    let mut queued = client.generate(request(10, "queued")).await.unwrap().into_inner();

    let shed = client.generate(request(10, "shed")).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.get_error_details().retry_info().is_some(), "retry hint");

    let reply = client.cancel(CancelRequest { request_id: "queued".into() }).await.unwrap().into_inner();
    assert!(reply.was_queued);
    assert_eq!(outcome(&mut queued).await.unwrap_err().code(), Code::Cancelled);
    let dup = client.generate(request(10, "running")).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    client.cancel(CancelRequest { request_id: "running".into() }).await.unwrap();
    assert_eq!(outcome(&mut running).await.unwrap_err().code(), Code::Cancelled);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waiting_too_long_for_the_first_token_is_a_deadline() {
    let (memory, runtime, mut client) = stack(|c| {
        c.max_batch_size = 1;
        c.ttft_timeout = Duration::from_millis(50);
    })
    .await;
    let mut running = client.generate(request(400, "hog")).await.unwrap().into_inner();
    read_tokens(&mut running, 1).await;
    let mut starved = client.generate(request(10, "starved")).await.unwrap().into_inner();
    let err = outcome(&mut starved).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("time-to-first-token"), "{}", err.message());
    drop(running);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_longer_than_the_first_token_limit_loses_no_token() {
    let (memory, runtime, mut client) = stack(|c| {
        c.ttft_timeout = Duration::from_millis(50);
        c.idle_timeout = Duration::from_millis(20);
    })
    .await;
    // 100 tokens × 3 ms = 300 ms: six times the TTFT limit, each gap well inside the idle limit.
    let mut stream = client.generate(request(100, "long")).await.unwrap().into_inner();
    let mut indices = Vec::new();
    while let Some(item) = stream.next().await {
        match item.expect("no error").item {
            Some(Item::Token(token)) => indices.push(token.index),
            Some(Item::Summary(summary)) => assert_eq!(summary.completion_tokens, 100),
            None => panic!("empty item"),
        }
    }
    assert_eq!(indices, (0..100).collect::<Vec<_>>());
    runtime.stop().await;
    memory.stop().await;
}

/// A generation cut while its client was not reading (its buffers full) still ends with its
/// error status once the client reads again: never a silent OK after a truncated stream.
#[tokio::test(start_paused = true)]
async fn a_stream_cut_while_its_client_was_not_reading_ends_with_its_error() {
    let (memory, runtime, _) = stack(|c| {
        c.max_stream_lifetime = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let tiny = runtime.tiny_window_channel().await;
    let mut client = RuntimeServiceClient::new(tiny);
    let mut stream = client.generate(request(400, "stalled")).await.unwrap().into_inner();
    read_tokens(&mut stream, 1).await;
    // Past the stream's lifetime limit with every buffer full: the runtime cuts the generation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut tokens = 1;
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => tokens += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended OK after {tokens} of 400 tokens"),
        }
    };
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(tokens < 400, "{tokens} tokens");
    let mut pools = memory.client().await;
    assert_eq!(stats(&mut pools, "kv-cache").await.used_bytes, 0, "its blocks returned");
    runtime.stop().await;
    memory.stop().await;
}

/// A client that stops reading holds device memory no longer than the idle-gap limit: the device
/// pauses its sequence once its buffer is full, the gap runs out, and the stream ends with
/// DEADLINE_EXCEEDED saying the reader stalled (not the device), its blocks returned.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_after_the_idle_gap_and_told_why() {
    let (memory, runtime, _) = stack(|c| c.idle_timeout = Duration::from_secs(1)).await;
    let tiny = runtime.tiny_window_channel().await;
    let mut client = RuntimeServiceClient::new(tiny);
    let mut stream = client.generate(request(400, "stopped-reading")).await.unwrap().into_inner();
    read_tokens(&mut stream, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut pools = memory.client().await;
    assert_eq!(stats(&mut pools, "kv-cache").await.used_bytes, 0, "its blocks returned while unread");
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the stream ended OK"),
        }
    };
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(end.message().contains("did not read the stream"), "{}", end.message());
    runtime.stop().await;
    memory.stop().await;
}
