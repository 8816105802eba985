//! memory-service restarted (kill -9) under a runtime that is streaming. From the moment its
//! keep-alive stream breaks until its leases are confirmed again, the runtime's device runs no
//! step: its memory is in doubt. With `--state-dir` the leases survive and keep their epoch: the
//! keep-alive stream reconnects and renews them, and the generation in flight completes. In
//! memory only, the restart is a new epoch: the runtime drops the memory it no longer holds and
//! the generation ends UNAVAILABLE; it never ran a step on that memory after the old process
//! died, so before the new one could grant it to anyone.

use std::time::Duration;

use e2e::{RuntimeServer, certs::TempDir, process::Process, runtime_config, sample};
use proto::runtime::v1::{GenerateRequest, generate_response};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const POOLS: &str = "kv-cache=64MiB,activations=64MiB,uniforms=64MiB";
const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info")];

fn long_generation(id: &str) -> GenerateRequest {
    GenerateRequest {
        model: "test-webllm".into(),
        prompt: "Write a long story about caches.".into(),
        max_tokens: 400,
        seed: 3,
        request_id: id.into(),
        ..GenerateRequest::default()
    }
}

/// Streams `id`, restarting memory-service (`restart`) after the first tokens; returns how the
/// stream ended and how many tokens it carried.
async fn stream_through_a_restart(durable: bool) -> (Result<u32, tonic::Status>, u32) {
    let dir = TempDir::new("restart-state");
    let state = dir.path().to_str().expect("utf-8").to_owned();
    let mut args = vec!["--pool", POOLS];
    if durable {
        args.extend(["--state-dir", state.as_str()]);
    }
    let memory = Process::start("memory-service", &args, LOG, false);
    let addr: std::net::SocketAddr = memory.addr.parse().expect("address");
    let mut config = runtime_config(addr);
    // Renew often, so the test does not wait for a 30 s TTL's third.
    config.lease_ttl = std::time::Duration::from_secs(3);
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut stream =
        client.generate(long_generation("through-restart")).await.expect("accepted").into_inner();
    let mut tokens = 0;
    while tokens < 5 {
        if let Some(generate_response::Item::Token(_)) =
            stream.message().await.expect("ok").expect("open").item
        {
            tokens += 1;
        }
    }
    let mut health = HealthClient::new(runtime.channel().await);
    let check = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(check).await.expect("watch").into_inner();
    memory.kill();
    // The keep-alive stream's end is noticed at once: NOT_SERVING, and the device stops.
    while watch.next().await.expect("open").expect("status").status() != ServingStatus::NotServing {}
    let generated =
        || async { sample(&runtime.scrape().await, "runtime_tokens_generated_total", &["test-webllm"]) };
    // Observation windows (not readiness waits): the step already running when the memory came
    // into doubt finishes (one step, a few ms); after it, at ~3 ms a step, a running device would
    // generate dozens of tokens in 200 ms.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = generated().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(generated().await, before, "the device stepped while its memory was in doubt");
    drop((watch, health));
    let listen = addr.to_string();
    let mut restart = args.clone();
    restart.extend(["--listen", listen.as_str()]);
    let memory = Process::start_at("memory-service", &restart, LOG);
    let ended = loop {
        match stream.message().await {
            Ok(Some(message)) => match message.item {
                Some(generate_response::Item::Token(_)) => tokens += 1,
                Some(generate_response::Item::Summary(summary)) => break Ok(summary.completion_tokens),
                None => {}
            },
            Ok(None) => break Err(tonic::Status::internal("ended without a summary")),
            Err(status) => break Err(status),
        }
    };
    drop(stream);
    runtime.stop().await;
    memory.stop();
    (ended, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_durable_memory_service_a_restart_ends_no_generation() {
    let (ended, tokens) = stream_through_a_restart(true).await;
    assert_eq!(ended.expect("the generation completed"), 400);
    assert_eq!(tokens, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_in_memory_memory_service_a_restart_ends_generations_unavailable() {
    let (ended, tokens) = stream_through_a_restart(false).await;
    let status = ended.expect_err("streamed on after a new epoch");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(tokens < 400);
}

/// memory-service restarted in memory with a smaller kv-cache pool: the runtime learns the new
/// capacity (it is cached per server epoch), so a generation that fitted the old pool but not
/// the new one is refused at once instead of waiting for blocks that can never exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_learns_the_kv_pool_of_a_restarted_memory_service() {
    let memory = Process::start("memory-service", &["--pool", POOLS], LOG, false);
    let addr: std::net::SocketAddr = memory.addr.parse().expect("address");
    let runtime = RuntimeServer::start(runtime_config(addr)).await;
    runtime.ready().await;
    let client = runtime.client().await;
    let generation =
        |id: &str| GenerateRequest { prompt: "hi there".into(), max_tokens: 100, ..long_generation(id) };
    let run = |mut client: proto::runtime::v1::runtime_service_client::RuntimeServiceClient<_>,
               request: GenerateRequest| async move {
        let mut stream = client.generate(request).await?.into_inner();
        let mut tokens = 0u32;
        while let Some(message) = stream.message().await? {
            if let Some(generate_response::Item::Token(_)) = message.item {
                tokens += 1;
            }
        }
        Ok::<u32, tonic::Status>(tokens)
    };
    assert_eq!(run(client.clone(), generation("before")).await.expect("fits the 64 MiB pool"), 100);

    let mut health = HealthClient::new(runtime.channel().await);
    let check = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(check).await.expect("watch").into_inner();
    memory.kill();
    while watch.next().await.expect("open").expect("status").status() != ServingStatus::NotServing {}
    // Two blocks of kv-cache now: 32 tokens, fewer than the prompt plus 100.
    let small = format!("kv-cache={},activations=64MiB,uniforms=64MiB", 2 * e2e::TEST_BLOCK_BYTES + 100);
    let listen = addr.to_string();
    let memory = Process::start_at("memory-service", &["--pool", &small, "--listen", &listen], LOG);
    runtime.ready().await;
    let refused = tokio::time::timeout(Duration::from_secs(60), run(client.clone(), generation("after")))
        .await
        .expect("answered, not left waiting for blocks the pool cannot hold")
        .expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("lower max_tokens"), "{}", refused.message());
    // One that fits the two blocks runs.
    let short = GenerateRequest { max_tokens: 20, ..generation("short") };
    assert_eq!(run(client.clone(), short).await.expect("fits two blocks"), 20);
    runtime.stop().await;
    memory.stop();
}

/// memory-service gone for longer than the idle-gap limit under a streaming runtime: the device
/// runs no step while its memory is in doubt, so the stream's idle limit runs out, and the
/// cause it is told is the memory authority (UNAVAILABLE, with a retry hint), not a deadline of
/// the client's or a stalled model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_outage_longer_than_the_idle_limit_ends_the_stream_unavailable() {
    let memory = Process::start("memory-service", &["--pool", POOLS], LOG, false);
    let addr: std::net::SocketAddr = memory.addr.parse().expect("address");
    let mut config = runtime_config(addr);
    // A short idle limit, so the outage outlasts it quickly; a token comes every few ms.
    config.idle_timeout = Duration::from_secs(1);
    config.retry_hint = Duration::from_millis(1234);
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut stream = client.generate(long_generation("outage")).await.expect("accepted").into_inner();
    stream.message().await.expect("ok").expect("a first token");
    memory.kill();
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the generation completed without memory-service"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("memory-service"), "{}", ended.message());
    use tonic_types::StatusExt;
    let retry = ended.get_error_details().retry_info().and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(Duration::from_millis(1234)), "{ended:?}");
    drop(stream);
    runtime.stop().await;
}
