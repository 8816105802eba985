//! Graceful shutdown with open streams: health flips to NOT_SERVING, every open stream and waiting
//! call ends with UNAVAILABLE (a clean status, not a reset), and the server exits well inside its
//! grace period.

use std::time::Duration;

use e2e::{MemoryServer, alloc, config_with_pools, pb_duration};
use proto::memory::v1::{KeepAliveRequest, WatchEventsRequest};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test(start_paused = true)]
async fn shutdown_ends_open_streams_cleanly_within_the_grace_period() {
    let mut config = config_with_pools(&[("kv-cache", 100)]);
    config.grace_period = Duration::from_secs(30);
    let mut server = MemoryServer::start(config).await;
    let mut client = server.client().await;

    let mut health = HealthClient::new(server.channel().await);
    let mut health_watch = health
        .watch(HealthCheckRequest { service: "memory.v1.MemoryService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health_watch.next().await.unwrap().unwrap().status(), ServingStatus::Serving);

    let mut events = client.watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();
    let lease = client.allocate(alloc(&[("kv-cache", 100)])).await.unwrap().into_inner().leases.remove(0);
    assert!(events.next().await.unwrap().is_ok(), "watch stream is live");

    let (keepalive_tx, keepalive_rx) = tokio::sync::mpsc::channel(1);
    let mut keepalive = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(keepalive_rx))
        .await
        .unwrap()
        .into_inner();
    keepalive_tx
        .send(KeepAliveRequest { lease_ids: vec![lease.lease_id], scope_ids: vec![], reclaimable: None })
        .await
        .unwrap();
    assert!(keepalive.next().await.unwrap().is_ok());

    let mut waiter = server.client().await;
    let mut waits = alloc(&[("kv-cache", 1)]);
    waits.max_wait = Some(pb_duration(Duration::from_secs(10)));
    let waiting = tokio::spawn(async move { waiter.allocate(waits).await });
    let queued = e2e::wait_for_waiters(&mut client, "kv-cache", 1).await;
    assert!(queued, "the Allocate never queued");

    let started = Instant::now();
    server.begin_shutdown();

    assert_eq!(health_watch.next().await.unwrap().unwrap().status(), ServingStatus::NotServing);
    drop(health_watch); // a health watch is the client's to close; it would otherwise hold the drain
    let end = loop {
        // Events published before the shutdown (the renewal, the wait) come first.
        match events.next().await.expect("the stream ends with a status, not silently") {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable);
    assert_eq!(keepalive.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
    assert_eq!(waiting.await.unwrap().unwrap_err().code(), Code::Unavailable);
    drop((events, keepalive, keepalive_tx, client));

    server.join().await;
    assert!(Instant::now() - started < Duration::from_secs(30), "drained before the grace period ran out");
}

#[tokio::test(start_paused = true)]
async fn a_stream_the_client_never_closes_is_cut_at_the_grace_period() {
    let mut config = config_with_pools(&[("kv-cache", 100)]);
    config.grace_period = Duration::from_secs(5);
    let mut server = MemoryServer::start(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let _stuck = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();

    let started = Instant::now();
    server.begin_shutdown();
    server.join().await;
    let took = Instant::now() - started;
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(6), "took {took:?}");
}
