//! Exhaustion: thousands of streams, hundreds of thousands of leases, one huge scope. Each bound
//! holds with RESOURCE_EXHAUSTED naming it, and ordinary calls keep being served meanwhile. The
//! latencies seen are printed (tests assert behaviour, not speed).

use std::time::Duration;

use e2e::{MemoryServer, alloc, config_with_pools};
use proto::memory::v1::{
    FreeScopeRequest, GetPoolStatsRequest, KeepAliveRequest, WatchEventsRequest,
    memory_service_client::MemoryServiceClient,
};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

fn limit_refusal(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(what), "{what:?} not in {:?}", status.message());
}

/// Allocates 64-lease requests for `holder` (in `scope`) until refused; returns the leases
/// granted and the refusal.
async fn fill(
    client: &mut MemoryServiceClient<Channel>,
    holder: &str,
    scope: &str,
    max: usize,
) -> (usize, tonic::Status) {
    let mut granted = 0;
    loop {
        let mut ask = alloc(&[("kv-cache", 1); 64]);
        ask.holder = holder.into();
        ask.scope_id = scope.into();
        match client.allocate(ask).await {
            Ok(reply) => granted += reply.into_inner().leases.len(),
            Err(status) => return (granted, status),
        }
        assert!(granted <= max, "{granted} leases granted past the bound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_bounds_hold_at_hundreds_of_thousands_and_a_huge_scope_never_stalls_the_server() {
    let mut config = config_with_pools(&[("kv-cache", 1 << 40)]);
    config.limits.leases = 300_000;
    config.limits.leases_per_holder = 200_000;
    config.limits.scope_members = 150_016;
    let server = MemoryServer::start(config).await;
    let mut client = server.client().await;

    let (scoped, refusal) = fill(&mut client, "bulk", "huge", 150_016).await;
    assert_eq!(scoped, 150_016);
    limit_refusal(&refusal, "leases per scope");
    let (more, refusal) = fill(&mut client, "bulk", "", 200_000).await;
    assert_eq!(scoped + more, 200_000);
    limit_refusal(&refusal, "leases per holder");
    let (others, refusal) = fill(&mut client, "another", "", 100_000).await;
    // 64 leases are granted together or not at all: 1,562 requests fit under 300,000.
    assert_eq!(others, 99_968);
    let remaining = (more + others) as u64;
    limit_refusal(&refusal, "leases limit");

    // Renewing and freeing the 150,016-lease scope while an ordinary caller keeps calling: the
    // work goes in slices, so the ordinary calls are answered throughout.
    let probe = {
        let mut client = server.client().await;
        tokio::spawn(async move {
            let (mut worst, mut calls) = (Duration::ZERO, 0u32);
            let until = Instant::now() + Duration::from_secs(600);
            loop {
                let started = Instant::now();
                let reply = client.get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() }).await;
                let stats = reply.expect("an ordinary call is served").into_inner().pool.expect("stats");
                worst = worst.max(started.elapsed());
                calls += 1;
                if stats.live_leases == remaining || Instant::now() > until {
                    return (worst, calls);
                }
            }
        })
    };
    let started = Instant::now();
    let renew = KeepAliveRequest { lease_ids: vec![], scope_ids: vec!["huge".into()], reclaimable: None };
    let mut replies = client.keep_alive(tokio_stream::iter([renew])).await.expect("stream").into_inner();
    let renewed = replies.message().await.expect("answer").expect("one answer");
    let renew_took = started.elapsed();
    assert_eq!(renewed.renewed_count, 150_016);
    let started = Instant::now();
    let freed =
        client.free_scope(FreeScopeRequest { scope_id: "huge".into() }).await.expect("freed").into_inner();
    let free_took = started.elapsed();
    assert_eq!(freed.freed_leases, 150_016);
    let (worst, calls) = probe.await.expect("probe");
    eprintln!(
        "huge scope: renew {renew_took:?}, free {free_took:?}; {calls} ordinary calls meanwhile, slowest {worst:?} \
         (debug build)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_stop_at_their_bounds_and_unary_calls_go_on() {
    let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
    config.max_watchers = 2000;
    config.max_keepalive_streams = 1000;
    let server = MemoryServer::start(config).await;
    // Streams spread over connections, as many clients would open them.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(server.channel().await);
    }
    let mut watches = Vec::new();
    for i in 0..2000 {
        let mut client = MemoryServiceClient::new(channels[i % channels.len()].clone());
        watches.push(
            client.watch_events(WatchEventsRequest::default()).await.expect("within the bound").into_inner(),
        );
    }
    let mut client = server.client().await;
    let refused = client.watch_events(WatchEventsRequest::default()).await.unwrap_err();
    limit_refusal(&refused, "event watchers");

    let (mut senders, mut keepalives) = (Vec::new(), Vec::new());
    for i in 0..1000 {
        let (tx, rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(1);
        let mut client = MemoryServiceClient::new(channels[i % channels.len()].clone());
        let stream = client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        keepalives.push(stream.expect("within the bound").into_inner());
        senders.push(tx);
    }
    let (_tx, rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(1);
    let refused = client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    limit_refusal(&refused, "keep-alive streams");

    let started = Instant::now();
    let lease = client.allocate(alloc(&[("kv-cache", 10)])).await.expect("an ordinary call is served");
    eprintln!("3000 open streams: an Allocate took {:?} (debug build)", started.elapsed());
    assert_eq!(lease.into_inner().leases.len(), 1);

    // Closing streams gives their places back.
    drop(watches);
    let mut reopened = None;
    for _ in 0..1000 {
        match client.watch_events(WatchEventsRequest::default()).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(status) => {
                limit_refusal(&status, "event watchers");
                tokio::task::yield_now().await;
            }
        }
    }
    assert!(reopened.is_some(), "closed watchers kept their places");
}
