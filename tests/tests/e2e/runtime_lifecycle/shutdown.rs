//! Shutting runtime-service down: a drain lets the streams in flight finish while it refuses
//! new ones, a stream that outlasts the grace period is cut, and a client that stops reading
//! cannot hold the shutdown past its bound. Every pool is empty afterwards.

use std::time::Duration;

use e2e::stats;
use proto::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

use super::{outcome, read_tokens, request, stack};

#[tokio::test(start_paused = true)]
async fn a_drain_lets_streams_in_flight_finish_refuses_new_ones_and_returns_all_memory() {
    let (memory, mut runtime, mut client) = stack(|_| {}).await;
    let mut stream = client.generate(request(400, "in-flight")).await.unwrap().into_inner();
    read_tokens(&mut stream, 2).await;

    runtime.begin_shutdown();
    // Health says NOT_SERVING at once, so endpoints are removed ...
    let mut health = HealthClient::new(runtime.channel().await);
    let check = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(check).await.unwrap().into_inner();
    while watch.next().await.unwrap().unwrap().status() != ServingStatus::NotServing {}
    // ... a new generation is refused with UNAVAILABLE and a retry hint ...
    let refused = client.generate(request(5, "too-late")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.get_error_details().retry_info().is_some(), "{refused:?}");
    // ... and the one in flight runs to its end (400 tokens of 3 ms, well inside the 10 s grace).
    outcome(&mut stream).await.expect("finished during the drain");
    runtime.join().await;
    let mut pools = memory.client().await;
    for pool in ["kv-cache", "activations", "uniforms"] {
        let s = stats(&mut pools, pool).await;
        assert_eq!((s.used_bytes, s.live_leases), (0, 0), "{pool} returned at shutdown: {s:?}");
    }
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_longer_than_the_grace_period_is_cancelled_when_it_ends() {
    let (memory, mut runtime, mut client) = stack(|c| c.grace_period = Duration::from_millis(300)).await;
    let mut stream = client.generate(request(400, "too-long")).await.unwrap().into_inner();
    read_tokens(&mut stream, 2).await;
    let started = tokio::time::Instant::now();
    runtime.begin_shutdown();
    let err = outcome(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let took = tokio::time::Instant::now() - started;
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(400), "{took:?}");
    runtime.join().await;
    let mut pools = memory.client().await;
    for pool in ["kv-cache", "activations", "uniforms"] {
        assert_eq!(stats(&mut pools, pool).await.used_bytes, 0, "{pool} returned");
    }
    memory.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_even_if_a_client_stops_reading() {
    let (memory, mut runtime, _) = stack(|c| c.grace_period = Duration::from_secs(3)).await;
    // A client whose HTTP/2 window holds ~1 KiB: the generation soon blocks on it.
    let tiny = runtime.tiny_window_channel().await;
    let mut client = RuntimeServiceClient::new(tiny);
    let mut stream = client.generate(request(400, "stuck")).await.unwrap().into_inner();
    read_tokens(&mut stream, 1).await; // then never read again
    tokio::time::sleep(Duration::from_millis(500)).await; // long enough to fill every buffer
    let started = tokio::time::Instant::now();
    runtime.begin_shutdown();
    runtime.join().await;
    assert!(tokio::time::Instant::now() - started <= Duration::from_secs(5), "grace + 2 s at most");
    let mut pools = memory.client().await;
    for pool in ["kv-cache", "activations", "uniforms"] {
        assert_eq!(stats(&mut pools, pool).await.used_bytes, 0, "{pool} returned");
    }
    drop(stream);
    memory.stop().await;
}
