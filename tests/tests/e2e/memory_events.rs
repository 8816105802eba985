//! WatchEvents over gRPC: every event kind, filters, and a slow watcher told how much it missed.

use std::time::Duration;

use e2e::{MemoryServer, alloc, config_with_pools, pb_duration};
use proto::memory::v1::{
    CreatePoolRequest, Event, EventKind, FreeRequest, FreeScopeRequest, RenewLeaseRequest,
    WatchEventsRequest, WatchEventsResponse, watch_events_response::Item,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming};

async fn next_event(stream: &mut Streaming<WatchEventsResponse>) -> Event {
    match stream.next().await.expect("stream open").expect("no error").item {
        Some(Item::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_watcher_sees_every_kind_of_event_in_sequence() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100)]).await;
    let mut client = server.client().await;
    // Virtual time crawls while RPCs are in flight, so no lease expires early.
    let _crawl = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut watch = client.watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();

    client.create_pool(CreatePoolRequest { name: "scratch".into(), capacity_bytes: 10 }).await.unwrap();
    let mut scoped = alloc(&[("kv-cache", 70)]);
    scoped.scope_id = "gen-1".into();
    scoped.holder = "runtime-0".into();
    let lease = client.allocate(scoped).await.unwrap().into_inner().leases.remove(0);
    client.renew_lease(RenewLeaseRequest { lease_id: lease.lease_id.clone() }).await.unwrap();
    let _ = client.allocate(alloc(&[("kv-cache", 50)])).await.unwrap_err(); // no room, no wait
    let mut waits = alloc(&[("kv-cache", 50)]);
    waits.max_wait = Some(pb_duration(Duration::from_millis(100)));
    let _ = client.allocate(waits).await.unwrap_err(); // waits, then times out
    client.free_scope(FreeScopeRequest { scope_id: "gen-1".into() }).await.unwrap();
    let mut short = alloc(&[("scratch", 4)]);
    short.ttl = Some(pb_duration(Duration::from_millis(10)));
    let short = client.allocate(short).await.unwrap().into_inner().leases.remove(0);

    let expected = [
        (EventKind::PoolCreated, "scratch", 10, 0),
        (EventKind::Allocated, "kv-cache", 70, 70),
        (EventKind::Renewed, "kv-cache", 70, 70),
        (EventKind::Rejected, "kv-cache", 50, 70),
        (EventKind::WaitTimedOut, "kv-cache", 50, 70),
        (EventKind::Freed, "kv-cache", 70, 0),
        (EventKind::Allocated, "scratch", 4, 4),
        (EventKind::Expired, "scratch", 4, 0),
    ];
    let mut last_sequence = 0;
    for (kind, pool, size, used) in expected {
        let event = next_event(&mut watch).await;
        assert_eq!(
            (event.kind(), event.pool.as_str(), event.size_bytes, event.pool_used_bytes),
            (kind, pool, size, used),
            "{event:?}"
        );
        assert!(event.sequence > last_sequence, "sequence must increase");
        last_sequence = event.sequence;
        assert!(event.time.is_some());
        if kind == EventKind::Allocated && pool == "kv-cache" {
            assert_eq!((event.holder.as_str(), event.scope_id.as_str()), ("runtime-0", "gen-1"));
            assert_eq!(event.lease_id, lease.lease_id);
        }
        if kind == EventKind::Expired {
            assert_eq!(event.lease_id, short.lease_id);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn filters_pass_only_the_named_pools_and_kinds() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100), ("activations", 100)]).await;
    let mut client = server.client().await;
    let filter = WatchEventsRequest {
        pools: vec!["activations".into()],
        kinds: vec![EventKind::Freed.into()],
        ..Default::default()
    };
    let mut watch = client.watch_events(filter).await.unwrap().into_inner();

    let kv = client.allocate(alloc(&[("kv-cache", 1)])).await.unwrap().into_inner().leases.remove(0);
    let act = client.allocate(alloc(&[("activations", 2)])).await.unwrap().into_inner().leases.remove(0);
    client.free(FreeRequest { lease_id: kv.lease_id }).await.unwrap();
    client.free(FreeRequest { lease_id: act.lease_id.clone() }).await.unwrap();

    let event = next_event(&mut watch).await;
    assert_eq!((event.kind(), event.lease_id), (EventKind::Freed, act.lease_id));

    let bad = client
        .watch_events(WatchEventsRequest { pools: vec![], kinds: vec![0], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "UNSPECIFIED is not a filter");
    let bad = client
        .watch_events(WatchEventsRequest { pools: vec!["No!".into()], kinds: vec![], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_watcher_is_told_it_lagged_and_never_slows_allocation() {
    let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
    config.event_buffer = 16;
    let server = MemoryServer::start(config).await;
    let mut client = server.client().await;
    // The watcher's connection takes at most 1 KiB before HTTP/2 flow control pushes back, so the
    // backlog lands in the server's buffers and the 16-event ring, not in this process.
    let slow = server.tiny_window_channel().await;
    let mut watcher = proto::memory::v1::memory_service_client::MemoryServiceClient::new(slow);
    let mut watch = watcher.watch_events(WatchEventsRequest::default()).await.unwrap().into_inner();

    // 2,000 allocate+free pairs with ~300-byte events while the watcher reads nothing: far beyond
    // the ring plus the server's send buffer. Every call must still succeed.
    let mut req = alloc(&[("kv-cache", 1)]);
    req.holder = "h".repeat(128);
    req.scope_id = "s".repeat(128);
    for _ in 0..2_000 {
        let lease = client.allocate(req.clone()).await.unwrap().into_inner().leases.remove(0);
        client.free(FreeRequest { lease_id: lease.lease_id }).await.unwrap();
    }

    let mut missed = 0;
    let mut seen = 0;
    while seen + missed < 4_000 {
        match watch.next().await.unwrap().unwrap().item {
            Some(Item::Lagged(lagged)) => missed += lagged.missed_events,
            Some(Item::Event(_)) => seen += 1,
            None => panic!("empty item"),
        }
    }
    assert!(missed > 0, "the watcher must have lagged");
    assert_eq!(seen + missed, 4_000, "every event is either delivered or counted as missed");
    server.stop().await;
}
