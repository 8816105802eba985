//! memory-service going away under a runtime and coming back empty (a new epoch): generations
//! fail fast while it is down, one whose memory is lost ends UNAVAILABLE, health turns
//! NOT_SERVING within a second, and the runtime is ready again only once it holds fresh leases.

use std::time::Duration;

use e2e::{MemoryServer, RuntimeServer, config_with_pools, runtime_config, sample, stats, wait_for_used};
use proto::memory::v1::{EventKind, WatchEventsRequest, watch_events_response::Item as MemItem};
use proto::runtime::v1::CancelRequest;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{POOLS, outcome, read_tokens, request};

#[tokio::test(start_paused = true)]
async fn memory_service_down_is_unavailable_fast_and_service_resumes_when_it_returns() {
    let mut memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let addr = memory.addr;
    let runtime = RuntimeServer::start(runtime_config(addr)).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    // One generation first: the runtime knows the pools, and its slab went back when it ended.
    let mut stream = client.generate(request(5, "before")).await.unwrap().into_inner();
    outcome(&mut stream).await.expect("served");
    wait_for_used(&memory, "kv-cache", 0).await;

    memory.begin_shutdown();
    memory.join().await;
    drop(memory);

    let started = tokio::time::Instant::now();
    let mut stream = client.generate(request(5, "while-down")).await.unwrap().into_inner();
    let err = outcome(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The device needs a slab; the first failed lease fails the waiting sequence: no wait for
    // its deadline.
    assert!(tokio::time::Instant::now() - started < Duration::from_secs(1));

    // memory-service comes back on the same address, empty (a new epoch).
    let memory = MemoryServer::start_at(addr, config_with_pools(POOLS)).await;
    let mut uniforms = memory
        .client()
        .await
        .watch_events(WatchEventsRequest {
            pools: vec!["uniforms".into()],
            kinds: vec![EventKind::Allocated.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = client.generate(request(5, "after")).await.unwrap().into_inner();
    outcome(&mut stream).await.expect("served again once memory-service is back");
    // The runtime notices the restart and leases its model's uniforms again.
    let Some(MemItem::Event(event)) = uniforms.next().await.unwrap().unwrap().item else { panic!("event") };
    assert_eq!((event.size_bytes, event.holder.as_str()), (1_000_000, "test-runtime"));
    runtime.ready().await;
    // And keeps them: several renewal rounds later they are still held, exactly once.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let mut pools = memory.client().await;
    let held = stats(&mut pools, "uniforms").await;
    assert_eq!((held.used_bytes, held.live_leases, held.expired_total), (1_000_000, 1, 0), "{held:?}");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_generation_whose_memory_is_lost_ends_unavailable() {
    let mut memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let addr = memory.addr;
    let mut config = runtime_config(addr);
    config.lease_ttl = Duration::from_millis(300); // renewed every 100 ms
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut stream = client.generate(request(400, "orphaned")).await.unwrap().into_inner();
    read_tokens(&mut stream, 2).await;

    // memory-service restarts: every lease of the old epoch is gone.
    memory.begin_shutdown();
    memory.join().await;
    drop(memory);
    let memory = MemoryServer::start_at(addr, config_with_pools(POOLS)).await;

    let err = outcome(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("lost"), "{}", err.message());
    // Nothing of the orphaned generation exists in the new epoch.
    wait_for_used(&memory, "kv-cache", 0).await;
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn losing_memory_service_turns_not_serving_within_a_second_and_ready_again_only_with_fresh_leases() {
    let mut memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let addr = memory.addr;
    let runtime = RuntimeServer::start(runtime_config(addr)).await;
    runtime.ready().await;
    let mut health = HealthClient::new(runtime.channel().await);
    let check = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(check).await.unwrap().into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status(), ServingStatus::Serving);

    // memory-service stops: its keep-alive stream ends, and that is the signal (the renewal
    // interval is 10 s).
    let lost = tokio::time::Instant::now();
    memory.begin_shutdown();
    memory.join().await;
    drop(memory);
    while watch.next().await.unwrap().unwrap().status() != ServingStatus::NotServing {}
    assert!(tokio::time::Instant::now() - lost < Duration::from_secs(1), "NOT_SERVING within a second");

    // It comes back empty (a new epoch): the runtime is ready again only once it holds its
    // weights and activations in the new epoch.
    let memory = MemoryServer::start_at(addr, config_with_pools(POOLS)).await;
    while watch.next().await.unwrap().unwrap().status() != ServingStatus::Serving {}
    let mut pools = memory.client().await;
    assert_eq!(stats(&mut pools, "uniforms").await.used_bytes, 1_000_000, "weights leased again");
    assert_eq!(stats(&mut pools, "activations").await.live_leases, 1, "activations leased again");
    let mut client = runtime.client().await;
    let mut stream = client.generate(request(5, "after")).await.unwrap().into_inner();
    outcome(&mut stream).await.expect("served again");
    runtime.stop().await;
    memory.stop().await;
}

/// A Cancel while the device runs no step (memory-service gone, its leases in doubt): the device
/// still lets go of the sequence at once, its blocks back in the device's pool by the time the
/// client has the CANCELLED status, not after the outage.
#[tokio::test(start_paused = true)]
async fn a_cancel_while_the_memory_is_in_doubt_returns_the_blocks_at_once() {
    let mut memory = MemoryServer::start(config_with_pools(POOLS)).await;
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut stream = client.generate(request(400, "in-doubt")).await.unwrap().into_inner();
    read_tokens(&mut stream, 2).await;
    memory.begin_shutdown();
    memory.join().await;
    drop(memory);
    // The device runs no step while its memory is in doubt: the stream pauses (a second of
    // virtual time without a token, where a step takes milliseconds).
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        next.expect("still open").expect("no error while paused");
    }
    let used = [r#"model="test-webllm""#, r#"state="used""#];
    assert!(sample(&runtime.scrape().await, "runtime_kv_blocks", &used).unwrap() > 0.0, "held while paused");
    client.cancel(CancelRequest { request_id: "in-doubt".into() }).await.expect("in flight");
    assert_eq!(outcome(&mut stream).await.unwrap_err().code(), Code::Cancelled);
    assert_eq!(
        sample(&runtime.scrape().await, "runtime_kv_blocks", &used),
        Some(0.0),
        "back before the status"
    );
    runtime.stop().await;
}
