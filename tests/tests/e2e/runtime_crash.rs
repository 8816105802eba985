//! runtime-service killed with SIGKILL mid-stream: nothing returns its memory, so expiry does.
//! Every lease it held expires within its TTL (plus the timer's resolution) of the kill, with an
//! EXPIRED event each, and the pools return to their starting use.

use std::time::{Duration, SystemTime};

use e2e::{MemoryServer, process::Process};
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
    let channel = runtime.serving("runtime.v1.RuntimeService").await;
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

/// The scopes of the memory-service ALLOCATED events `events` carries up to the marker lease
/// allocated now (so every allocation before it has been seen).
async fn scopes_allocated_until_now(
    client: &mut proto::memory::v1::memory_service_client::MemoryServiceClient<Channel>,
    events: &mut tonic::Streaming<proto::memory::v1::WatchEventsResponse>,
    marker: &str,
) -> Vec<String> {
    let request =
        proto::memory::v1::AllocateRequest { scope_id: marker.into(), ..e2e::alloc(&[("kv-cache", 1)]) };
    client.allocate(request).await.expect("marker allocated");
    let mut scopes = Vec::new();
    loop {
        let reply = events.message().await.expect("ok").expect("open");
        if let Some(watch_events_response::Item::Event(event)) = reply.item {
            if event.scope_id == marker {
                return scopes;
            }
            scopes.push(event.scope_id);
        }
    }
}

/// A runtime killed and restarted under the same `--instance` (a pod name, as docs/operations.md
/// advises) while its previous life's leases still live: the new life takes its memory under
/// scopes of its own. Scopes double as Allocate request ids; were they the same (a nonce that
/// restarts at 0), memory-service would replay the old life's leases to the new one, which
/// would then hold memory its predecessor's expiry takes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_restarted_under_the_same_instance_takes_new_scopes() {
    // Room for both lives: the first one's leases live on for their TTL after the kill.
    let pools = [("kv-cache", 1 << 40), ("activations", 1 << 40), ("uniforms", 1 << 40)];
    let memory = MemoryServer::start(e2e::config_with_pools(&pools)).await;
    let mut client = memory.client().await;
    let mut events = client
        .watch_events(WatchEventsRequest {
            pools: vec![],
            kinds: vec![EventKind::Allocated as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let memory_addr = format!("http://{}", memory.addr);
    let life = || async {
        let runtime = Process::start(
            "runtime-service",
            &["--memory-addr", &memory_addr, "--instance", "pod-0"],
            &[("RUST_LOG", "warn,runtime_service=info")],
            false,
        );
        runtime.serving("runtime.v1.RuntimeService").await;
        runtime
    };
    let first = life().await;
    let before = scopes_allocated_until_now(&mut client, &mut events, "marker-1").await;
    first.kill();
    let second = life().await;
    let after = scopes_allocated_until_now(&mut client, &mut events, "marker-2").await;
    second.kill();
    assert!(before.iter().all(|s| s.starts_with("pod-0/")), "{before:?}");
    assert_eq!(before.len(), after.len(), "the second life took its memory anew: {before:?} / {after:?}");
    assert!(
        before.iter().all(|s| !after.contains(s)),
        "a scope of the first life reused: {before:?} / {after:?}"
    );
    memory.stop().await;
}
