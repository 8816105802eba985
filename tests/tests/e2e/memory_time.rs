//! Waiting, expiry and keep-alive over real gRPC, on tokio's paused clock: the server and client
//! share one current-thread runtime whose clock jumps to the next timer whenever all tasks are
//! idle, so a 30 s TTL costs no wall time and nothing depends on the machine's speed.

use std::time::Duration;

use e2e::{MemoryServer, alloc, pb_duration, stats, wait_for_waiters};
use proto::memory::v1::{
    EventKind, FreeRequest, KeepAliveRequest, RenewLeaseRequest, WatchEventsRequest,
    watch_events_response::Item,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

/// Keeps virtual time crawling in 1 ms steps while RPCs are in flight: without a nearer timer,
/// an idle moment during a round trip would jump the clock straight to the next lease deadline.
pub(crate) fn crawl_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_waiting_allocate_is_woken_by_a_free() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100)]).await;
    let mut client = server.client().await;
    let _crawl = crawl_clock();
    let hold = client.allocate(alloc(&[("kv-cache", 80)])).await.unwrap().into_inner();

    let mut waiter = server.client().await;
    let mut req = alloc(&[("kv-cache", 50)]);
    req.max_wait = Some(pb_duration(Duration::from_secs(10)));
    let waiting = tokio::spawn(async move { waiter.allocate(req).await });

    // Watch the queue fill (a bounded poll of stats, not a sleep), then free.
    let queued = wait_for_waiters(&mut client, "kv-cache", 1).await;
    assert!(queued, "the Allocate never queued");
    let freed_at = Instant::now();
    client.free(FreeRequest { lease_id: hold.leases[0].lease_id.clone() }).await.unwrap();

    let granted = waiting.await.unwrap().expect("woken by the free").into_inner();
    assert_eq!(granted.leases[0].size_bytes, 50);
    // Virtual time crawls 1 ms per idle moment: a poller on any interval would show it here.
    assert!(Instant::now() - freed_at <= Duration::from_millis(2), "woken by the free, not by a poll");
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.waiters, kv.wait_timeouts_total), (50, 0, 0));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wait_times_out_with_resource_exhausted_and_holds_nothing() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100), ("activations", 10)]).await;
    let mut client = server.client().await;
    let _hold = client.allocate(alloc(&[("kv-cache", 80)])).await.unwrap();

    let mut req = alloc(&[("activations", 5), ("kv-cache", 50)]);
    req.max_wait = Some(pb_duration(Duration::from_millis(500)));
    let started = Instant::now();
    let err = client.allocate(req).await.unwrap_err();
    let waited = Instant::now() - started;

    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.get_error_details().retry_info().is_some());
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_millis(600), "waited {waited:?}");
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.waiters, kv.wait_timeouts_total), (80, 0, 1));
    assert_eq!(stats(&mut client, "activations").await.used_bytes, 0, "all or nothing");
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_grpc_deadline_bounds_the_wait() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100)]).await;
    let mut client = server.client().await;
    let _hold = client.allocate(alloc(&[("kv-cache", 100)])).await.unwrap();

    let mut req = tonic::Request::new(alloc(&[("kv-cache", 1)]));
    req.get_mut().max_wait = Some(pb_duration(Duration::from_secs(10)));
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = client.allocate(req).await.unwrap_err();
    let waited = Instant::now() - started;
    // The server gives up just before the deadline, so the caller gets the real reason and a
    // retry hint rather than a bare DEADLINE_EXCEEDED.
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.get_error_details().retry_info().is_some());
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_millis(300), "waited {waited:?}");
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.waiters, kv.used_bytes, kv.wait_timeouts_total), (0, 100, 1));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_leaves_the_queue_and_holds_nothing() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100)]).await;
    let mut client = server.client().await;
    let _crawl = crawl_clock();
    let hold = client.allocate(alloc(&[("kv-cache", 100)])).await.unwrap().into_inner();

    let mut waiter = server.client().await;
    let mut req = alloc(&[("kv-cache", 40)]);
    req.max_wait = Some(pb_duration(Duration::from_secs(10)));
    let waiting = tokio::spawn(async move { waiter.allocate(req).await });
    assert!(wait_for_waiters(&mut client, "kv-cache", 1).await, "the Allocate never queued");
    waiting.abort(); // the client goes away: its HTTP/2 stream is reset
    let _ = waiting.await;

    let gone = wait_for_waiters(&mut client, "kv-cache", 0).await;
    assert!(gone, "cancelled waiter still queued");
    client.free(FreeRequest { lease_id: hold.leases[0].lease_id.clone() }).await.unwrap();
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.live_leases), (0, 0), "nothing granted to the departed caller");
    assert_eq!(kv.wait_timeouts_total, 0, "it left because it was cancelled, not by timing out");
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unrenewed_lease_expires_and_its_bytes_return() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100)]).await;
    let mut client = server.client().await;
    let mut events = client
        .watch_events(WatchEventsRequest {
            pools: vec![],
            kinds: vec![EventKind::Expired.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let started = Instant::now();
    let lease = client.allocate(alloc(&[("kv-cache", 60)])).await.unwrap().into_inner().leases.remove(0);
    assert_eq!(lease.ttl, Some(pb_duration(Duration::from_secs(30))), "default TTL");

    // Nothing renews it: the reaper fires at the deadline on its own.
    let Some(Item::Event(expired)) = events.next().await.unwrap().unwrap().item else {
        panic!("expected an event")
    };
    let elapsed = Instant::now() - started;
    assert_eq!(
        (expired.lease_id.as_str(), expired.size_bytes, expired.pool_used_bytes),
        (lease.lease_id.as_str(), 60, 0)
    );
    assert!(
        elapsed >= Duration::from_secs(30) && elapsed < Duration::from_millis(30_100),
        "expired after {elapsed:?}"
    );

    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.expired_total, kv.live_leases), (0, 1, 0));
    let renew = client.renew_lease(RenewLeaseRequest { lease_id: lease.lease_id.clone() }).await.unwrap_err();
    assert_eq!(renew.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_holds_leases_and_scopes_past_many_ttls() {
    let server = MemoryServer::with_pools(&[("kv-cache", 100), ("uniforms", 100)]).await;
    let mut client = server.client().await;
    let _crawl = crawl_clock();
    let ttl = Duration::from_secs(1);

    let mut single = alloc(&[("uniforms", 10)]);
    single.ttl = Some(pb_duration(ttl));
    let model = client.allocate(single).await.unwrap().into_inner().leases.remove(0);
    let mut scoped = alloc(&[("kv-cache", 20), ("kv-cache", 30)]);
    scoped.ttl = Some(pb_duration(ttl));
    scoped.scope_id = "gen-7".into();
    client.allocate(scoped).await.unwrap();
    let mut unrenewed = alloc(&[("kv-cache", 5)]);
    unrenewed.ttl = Some(pb_duration(ttl));
    client.allocate(unrenewed).await.unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies =
        client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Five TTLs, renewing every 400 ms of virtual time.
    for _ in 0..12 {
        tx.send(KeepAliveRequest {
            lease_ids: vec![model.lease_id.clone()],
            scope_ids: vec!["gen-7".into()],
            reclaimable: None,
        })
        .await
        .unwrap();
        let reply = replies.next().await.unwrap().unwrap();
        // The lease named directly is listed; the scope's two are counted, not listed.
        assert_eq!((reply.renewed.len(), reply.renewed_count), (1, 3), "{reply:?}");
        assert_eq!(reply.scopes.len(), 1);
        assert_eq!((reply.scopes[0].scope_id.as_str(), reply.scopes[0].leases), ("gen-7", 2));
        assert!(reply.not_found.is_empty());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(stats(&mut client, "uniforms").await.used_bytes, 10);
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.expired_total), (50, 1), "only the unrenewed lease expired");

    // Stop renewing: everything lapses, and the stream reports what is gone.
    tokio::time::sleep(ttl).await;
    tx.send(KeepAliveRequest {
        lease_ids: vec![model.lease_id.clone()],
        scope_ids: vec!["gen-7".into()],
        reclaimable: None,
    })
    .await
    .unwrap();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(reply.renewed.is_empty() && reply.scopes.is_empty());
    assert_eq!(reply.renewed_count, 0);
    assert_eq!(reply.not_found, [model.lease_id.clone(), "gen-7".to_string()]);
    assert_eq!(stats(&mut client, "kv-cache").await.used_bytes, 0);

    // A malformed id ends the stream with INVALID_ARGUMENT.
    tx.send(KeepAliveRequest { lease_ids: vec!["zz".into()], scope_ids: vec![], reclaimable: None })
        .await
        .unwrap();
    assert_eq!(replies.next().await.unwrap().unwrap_err().code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_named_twice_in_a_keep_alive_is_renewed_once_and_big_scopes_are_counted() {
    use proto::memory::v1::{EventKind, WatchEventsRequest, watch_events_response::Item};
    let server = MemoryServer::with_pools(&[("kv-cache", 1 << 20)]).await;
    let mut client = server.client().await;
    let mut scoped = alloc(&[("kv-cache", 1); 64]);
    scoped.scope_id = "big".into();
    let leases = client.allocate(scoped).await.unwrap().into_inner().leases;
    let filter = WatchEventsRequest {
        pools: vec![],
        kinds: vec![EventKind::Renewed.into(), EventKind::Allocated.into()],
        ..Default::default()
    };
    let mut events = client.watch_events(filter).await.unwrap().into_inner();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies =
        client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // One lease named directly, twice, and again through its scope (named twice too).
    let id = leases[0].lease_id.clone();
    let request = KeepAliveRequest {
        lease_ids: vec![id.clone(), id],
        scope_ids: vec!["big".into(), "big".into()],
        reclaimable: None,
    };
    tx.send(request).await.unwrap();
    let reply = replies.next().await.unwrap().unwrap();
    assert_eq!((reply.renewed.len(), reply.renewed_count), (1, 64), "{reply:?}");
    assert_eq!(reply.scopes.iter().map(|s| s.leases).collect::<Vec<_>>(), [64, 64]);
    // Exactly 64 RENEWED events, one per lease: counted up to a marker allocated afterwards.
    client.allocate(alloc(&[("kv-cache", 1)])).await.unwrap();
    let mut renewed = std::collections::HashSet::new();
    loop {
        let Some(Item::Event(event)) = events.next().await.unwrap().unwrap().item else { continue };
        if event.kind() == EventKind::Allocated {
            break;
        }
        assert!(renewed.insert(event.lease_id.clone()), "{} renewed twice", event.lease_id);
    }
    assert_eq!(renewed.len(), 64);
    drop(tx);
    server.stop().await;
}
