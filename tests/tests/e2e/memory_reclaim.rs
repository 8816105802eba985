//! Reclaimable leases over real gRPC: holder A fills the kv-cache pool with leases it keeps only
//! as a cache, offers them on its KeepAlive stream and goes idle; holder B's Allocate waits for
//! room. A is asked for just what B lacks, and B is granted when A gives it back, or when A's
//! silence costs it those leases; a decline or the end of A's stream costs A nothing.
//!
//! Here, the holders and the asks between them; refused offers are in `refusals`, reclaim across
//! a restart in `durable`, both with the helpers here.

mod durable;
mod refusals;

use std::time::Duration;

use e2e::{MemoryServer, alloc, config_with_pools, pb_duration, sample, stats, wait_for_waiters};
use memory_service::Config;
use proto::memory::v1::{
    AllocateResponse, EventKind, FreeRequest, KeepAliveRequest, KeepAliveResponse, ReclaimRequest,
    ReclaimableSet, WatchEventsRequest, memory_service_client::MemoryServiceClient,
    watch_events_response::Item,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::memory_time::crawl_clock;

/// Ten leases of 10 bytes fill the pool.
const LEASES: usize = 10;

/// A holder's KeepAlive stream.
struct Holder {
    tx: mpsc::Sender<KeepAliveRequest>,
    replies: Streaming<KeepAliveResponse>,
}

impl Holder {
    async fn open(client: &mut MemoryServiceClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(4);
        let replies =
            client.keep_alive(ReceiverStream::new(rx)).await.expect("keep-alive stream").into_inner();
        Holder { tx, replies }
    }

    /// Sends `request` and returns its reply. A ReclaimRequest arriving first is a failure:
    /// each test says when it expects one.
    async fn call(&mut self, request: KeepAliveRequest) -> KeepAliveResponse {
        self.tx.send(request).await.expect("stream open");
        let reply = self.next().await;
        assert!(reply.reclaim.is_none(), "an unexpected ReclaimRequest: {reply:?}");
        reply
    }

    /// Replaces the leases this stream offers.
    async fn offer(&mut self, leases: &[String]) -> KeepAliveResponse {
        let set = ReclaimableSet { lease_ids: leases.to_vec() };
        self.call(KeepAliveRequest { reclaimable: Some(set), ..KeepAliveRequest::default() }).await
    }

    /// The next message, which must be a ReclaimRequest.
    async fn asked(&mut self) -> ReclaimRequest {
        let message = self.next().await;
        let request = message.reclaim.expect("a ReclaimRequest");
        assert!(message.renewed.is_empty() && message.not_found.is_empty() && message.renewed_count == 0);
        assert_ne!(message.server_epoch, 0);
        request
    }

    async fn next(&mut self) -> KeepAliveResponse {
        self.replies.message().await.expect("no error").expect("stream open")
    }
}

/// A server whose kv-cache pool (100 bytes) holder A fills with ten 10-byte leases of 1 h TTL
/// (so no expiry plays a part), the leases' ids in the order granted.
async fn filled(reclaim_timeout: Duration) -> (MemoryServer, MemoryServiceClient<Channel>, Vec<String>) {
    filled_with(pool_config(reclaim_timeout)).await
}

fn pool_config(reclaim_timeout: Duration) -> Config {
    Config { reclaim_timeout, ..config_with_pools(&[("kv-cache", 100)]) }
}

/// [`filled`], with `config`.
async fn filled_with(config: Config) -> (MemoryServer, MemoryServiceClient<Channel>, Vec<String>) {
    let server = MemoryServer::start(config).await;
    let mut a = server.client().await;
    let mut leases = Vec::new();
    for _ in 0..LEASES {
        let mut request = alloc(&[("kv-cache", 10)]);
        request.holder = "a".into();
        request.ttl = Some(pb_duration(Duration::from_secs(3600)));
        leases.push(a.allocate(request).await.expect("room").into_inner().leases.remove(0).lease_id);
    }
    (server, a, leases)
}

/// Holder B asks for `bytes` and waits up to `max_wait`, from a task of its own.
async fn b_waits(
    server: &MemoryServer,
    bytes: u64,
    max_wait: Duration,
) -> JoinHandle<Result<(AllocateResponse, Duration), Status>> {
    let mut b = server.client().await;
    let mut request = alloc(&[("kv-cache", bytes)]);
    request.holder = "b".into();
    request.max_wait = Some(pb_duration(max_wait));
    tokio::spawn(async move {
        let started = Instant::now();
        let granted = b.allocate(request).await?.into_inner();
        Ok((granted, started.elapsed()))
    })
}

#[tokio::test]
async fn a_holder_asked_for_what_a_waiter_lacks_gives_it_back_and_the_waiter_is_granted() {
    // A long timeout: B is granted by A's answer, never by a revocation.
    let (server, mut a, leases) = filled(Duration::from_secs(60)).await;
    let mut stream = Holder::open(&mut a).await;
    assert_eq!(stream.offer(&leases).await.reclaimable_leases, LEASES as u64);
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.reclaimable_bytes, kv.reclaiming_bytes), (100, 0));

    // B needs 25 bytes: three leases, the earliest offered, are asked back (30 bytes).
    let called = Instant::now();
    let b = b_waits(&server, 25, Duration::from_secs(10)).await;
    let asked = stream.asked().await;
    let heard = called.elapsed();
    assert_eq!(asked.lease_ids, leases[..3]);
    assert_eq!((asked.pool.as_str(), asked.bytes, asked.needed_bytes), ("kv-cache", 30, 25));
    let within = asked.within.map(|d| Duration::new(d.seconds as u64, d.nanos as u32)).unwrap_or_default();
    assert!(within > Duration::ZERO && within <= Duration::from_secs(60), "{within:?}");
    for lease_id in &asked.lease_ids {
        a.free(FreeRequest { lease_id: lease_id.clone() }).await.expect("A gives it back");
    }
    let (granted, latency) = b.await.expect("B's task").expect("B granted");
    assert_eq!(granted.leases[0].size_bytes, 25);
    eprintln!(
        "reclaim: B granted {latency:?} after its call (server-side wait {:?}); A heard the ask \
         {heard:?} after B's call, then freed 3 leases one call at a time (debug build, loopback; \
         the reclaim timeout is 60 s, A's TTL 1 h)",
        granted.waited.map(|d| Duration::new(d.seconds as u64, d.nanos as u32)).unwrap_or_default()
    );

    // A's cache shrank by what B needed, in whole leases: seven leases, all still offered.
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.live_leases, kv.reclaimable_bytes, kv.reclaiming_bytes), (95, 8, 70, 0));
    assert_eq!((kv.reclaim_requests_total, kv.reclaim_asked_total, kv.reclaim_returned_total), (1, 3, 3));
    assert_eq!((kv.revoked_total, kv.reclaim_declined_total, kv.reclaimed_bytes_total), (0, 0, 30));
    let renew = KeepAliveRequest { lease_ids: leases[3..].to_vec(), ..KeepAliveRequest::default() };
    let reply = stream.call(renew).await;
    assert_eq!((reply.renewed.len(), reply.reclaimable_leases), (7, 7));
    let metrics = server.scrape().await;
    assert_eq!(sample(&metrics, "memory_reclaim_seconds_count", &[r#"outcome="returned""#]), Some(3.0));
    assert_eq!(sample(&metrics, "memory_pool_reclaimable_bytes", &[r#"pool="kv-cache""#]), Some(70.0));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_holder_loses_the_leases_asked_at_the_deadline_and_the_waiter_is_granted() {
    let timeout = Duration::from_millis(500);
    let (server, mut a, leases) = filled(timeout).await;
    let _crawl = crawl_clock();
    let filter = WatchEventsRequest {
        kinds: vec![EventKind::ReclaimRequested.into(), EventKind::Revoked.into()],
        ..WatchEventsRequest::default()
    };
    let mut events = a.watch_events(filter).await.expect("watch").into_inner();
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases).await;

    let b = b_waits(&server, 20, Duration::from_secs(10)).await;
    let asked = stream.asked().await;
    assert_eq!(asked.lease_ids, leases[..2]);
    // A ignores it. B is granted when the deadline revokes them: at the reclaim timeout (a
    // virtual clock crawling 1 ms per idle moment), not at A's TTL.
    let (granted, waited) = b.await.expect("B's task").expect("B granted");
    assert_eq!(granted.leases[0].size_bytes, 20);
    assert!(waited >= timeout && waited < timeout + Duration::from_millis(50), "waited {waited:?}");

    // A's next KeepAlive naming them says they are gone; the rest are as they were.
    let renew = KeepAliveRequest { lease_ids: leases[..3].to_vec(), ..KeepAliveRequest::default() };
    let reply = stream.call(renew).await;
    assert_eq!(reply.not_found, leases[..2]);
    assert_eq!((reply.renewed.len(), reply.reclaimable_leases), (1, 8));
    let err = a.free(FreeRequest { lease_id: leases[0].clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let Some(Ok(reply)) = events.next().await else { panic!("event stream ended") };
        if let Some(Item::Event(event)) = reply.item {
            seen.push((event.kind(), event.lease_id, event.holder));
        }
    }
    let expected: Vec<_> = [EventKind::ReclaimRequested, EventKind::Revoked]
        .into_iter()
        .flat_map(|kind| leases[..2].iter().map(move |id| (kind, id.clone(), "a".to_owned())))
        .collect();
    assert_eq!(seen, expected);
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.live_leases, kv.reclaimable_bytes), (100, 9, 80));
    assert_eq!((kv.revoked_total, kv.reclaim_returned_total, kv.reclaimed_bytes_total), (2, 0, 20));
    assert_eq!(kv.granted_total, kv.freed_total + kv.expired_total + kv.revoked_total + kv.live_leases);
    let metrics = server.scrape().await;
    assert_eq!(sample(&metrics, "memory_leases_revoked_total", &[r#"pool="kv-cache""#]), Some(2.0));
    assert_eq!(sample(&metrics, "memory_reclaim_seconds_count", &[r#"outcome="revoked""#]), Some(2.0));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_declined_lease_is_kept_and_another_is_asked_for() {
    let timeout = Duration::from_millis(500);
    let (server, mut a, leases) = filled(timeout).await;
    let _crawl = crawl_clock();
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases[..2]).await;

    let b = b_waits(&server, 10, Duration::from_secs(10)).await;
    assert_eq!(stream.asked().await.lease_ids, leases[..1]);
    // A wants lease 0 for itself: it stops offering it, and is asked for lease 1 instead.
    let reply = stream.offer(&leases[1..2]).await;
    assert_eq!(reply.reclaimable_leases, 1);
    assert_eq!(stream.asked().await.lease_ids, leases[1..2]);
    a.free(FreeRequest { lease_id: leases[1].clone() }).await.expect("A gives lease 1 back");
    b.await.expect("B's task").expect("B granted");

    // Past the deadline, the declined lease is still A's.
    tokio::time::sleep(timeout * 2).await;
    let reply = stream.call(KeepAliveRequest { lease_ids: leases[..1].to_vec(), ..Default::default() }).await;
    assert_eq!((reply.renewed.len(), reply.not_found.len()), (1, 0));
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.reclaim_asked_total, kv.reclaim_declined_total, kv.reclaim_returned_total), (2, 1, 1));
    assert_eq!((kv.revoked_total, kv.reclaimable_bytes), (0, 0));
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_takes_its_offer_and_asks_with_it() {
    let timeout = Duration::from_millis(500);
    let (server, mut a, leases) = filled(timeout).await;
    let _crawl = crawl_clock();
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases).await;
    let b = b_waits(&server, 10, Duration::from_secs(2)).await;
    assert_eq!(stream.asked().await.lease_ids, leases[..1]);

    // A's stream ends (it crashed, say) before it answers: nothing it offered is revoked, and
    // with nothing offered, B waits until its max_wait.
    drop(stream);
    let err = b.await.expect("B's task").unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.live_leases, kv.reclaimable_bytes, kv.reclaiming_bytes), (10, 0, 0));
    assert_eq!((kv.reclaim_declined_total, kv.revoked_total), (1, 0));

    // A new stream offers again: a new waiter is heard on it.
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases[5..]).await;
    let b = b_waits(&server, 10, Duration::from_secs(2)).await;
    assert!(wait_for_waiters(&mut a, "kv-cache", 1).await);
    assert_eq!(stream.asked().await.lease_ids, leases[5..6]);
    drop(b);
    server.stop().await;
}
