//! runtime-service killed with SIGKILL mid-stream: nothing returns its memory, so expiry does.
//! Every lease it held expires within its TTL (plus the timer's resolution) of the kill, with an
//! EXPIRED event each, and the pools return to their starting use.

use std::time::{Duration, SystemTime};

use e2e::{MemoryServer, process::Process, wait_serving};
use proto::{
    memory::v1::{EventKind, ListPoolsRequest, WatchEventsRequest, watch_events_response},
    runtime::v1::{GenerateRequest, generate_response, runtime_service_client::RuntimeServiceClient},
};
use tonic::transport::Channel;

const TTL: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runtime_leases_expire_within_their_ttl_and_the_pools_come_back() {
    let memory = MemoryServer::start(memory_service::Config::default()).await;
    let mut client = memory.client().await;
    let used = |pools: Vec<proto::memory::v1::PoolStats>| pools.iter().map(|p| p.used_bytes).sum::<u64>();
    let start = used(client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().pools);
    let mut expired = client
        .watch_events(WatchEventsRequest {
            pools: vec![],
            kinds: vec![EventKind::Expired as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();

    let memory_addr = format!("http://{}", memory.addr);
    let ttl = TTL.as_millis().to_string();
    let runtime = Process::start(
        "runtime-service",
        &["--memory-addr", &memory_addr, "--lease-ttl-ms", &ttl],
        &[("RUST_LOG", "warn,runtime_service=info")],
        false,
    );
    let channel = Channel::from_shared(format!("http://{}", runtime.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    wait_serving(channel.clone(), "runtime.v1.RuntimeService").await;
    let mut generator = RuntimeServiceClient::new(channel);
    let request = GenerateRequest {
        model: "distilgpt2".into(),
        prompt: "Write a long story about caches.".into(),
        max_tokens: 256,
        ..GenerateRequest::default()
    };
    let mut stream = generator.generate(request).await.expect("accepted").into_inner();
    while !matches!(
        stream.message().await.expect("ok").expect("open").item,
        Some(generate_response::Item::Token(_))
    ) {}
    let held = used(client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().pools);
    assert!(held > start, "the runtime holds memory while it streams");

    let killed = SystemTime::now();
    runtime.kill();
    // Every lease expires: EXPIRED events until the pools are back where they started.
    let mut latest = killed;
    let mut count = 0;
    loop {
        let pools = client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().pools;
        if used(pools) == start {
            break;
        }
        let reply = tokio::time::timeout(TTL * 10, expired.message())
            .await
            .expect("an expiry")
            .expect("ok")
            .expect("open");
        if let Some(watch_events_response::Item::Event(event)) = reply.item {
            let at: SystemTime = event.time.expect("time").try_into().expect("timestamp");
            latest = latest.max(at);
            count += 1;
        }
    }
    assert!(count >= 2, "weights and activations (at least) expired: {count}");
    // The last renewal was at most at the kill, so every deadline is within a TTL of it; the
    // reaper fires on the earliest deadline (a few ms of timer resolution and scheduling).
    let after = latest.duration_since(killed).unwrap_or_default();
    assert!(after <= TTL + Duration::from_millis(250), "the last lease expired {after:?} after the kill");
}
