//! Reclaim across restarts with `--state-dir`: what a revocation changed is stored like any other
//! change, while asks, soft state of a stream, end with the process.

use std::time::Duration;

use e2e::{MemoryServer, certs::TempDir, stats};
use memory_service::Config;
use proto::memory::v1::{EventKind, RenewLeaseRequest, WatchEventsRequest, watch_events_response::Item};
use tokio_stream::StreamExt;
use tonic::Code;

use super::{Holder, b_waits, filled_with, pool_config};

/// With `--state-dir`, a revocation is a change like an expiry: committed (its events released
/// once on disk) and kept by a restart. Asks are not: a restart ends every stream, so an ask
/// open at the time counts as declined, and its lease stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_state_dir_a_revocation_is_kept_and_an_open_ask_is_not() {
    let dir = TempDir::new("memory-reclaim");
    let durable = |timeout| Config { state_dir: Some(dir.path().to_path_buf()), ..pool_config(timeout) };
    // First life: a short timeout, in real time (the committer is a thread of its own, which a
    // paused clock would not wait for).
    let (server, mut a, leases) = filled_with(durable(Duration::from_millis(200))).await;
    let addr = server.addr;
    let filter = WatchEventsRequest { kinds: vec![EventKind::Revoked.into()], ..Default::default() };
    let mut events = a.watch_events(filter).await.expect("watch").into_inner();
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases).await;
    let b = b_waits(&server, 20, Duration::from_secs(10)).await;
    assert_eq!(stream.asked().await.lease_ids, leases[..2]);
    b.await.expect("B's task").expect("B granted by the revocation");
    for lease_id in &leases[..2] {
        let Some(Ok(reply)) = events.next().await else { panic!("event stream ended") };
        let Some(Item::Event(event)) = reply.item else { panic!("expected an event") };
        assert_eq!((event.kind(), &event.lease_id), (EventKind::Revoked, lease_id));
    }
    drop(stream);
    server.stop().await;

    // Second life: a long timeout; a restart comes while lease 2 is asked.
    let server = MemoryServer::start_at(addr, durable(Duration::from_secs(60))).await;
    let mut a = server.client().await;
    let mut stream = Holder::open(&mut a).await;
    stream.offer(&leases[2..]).await;
    let b = b_waits(&server, 10, Duration::from_secs(10)).await;
    assert_eq!(stream.asked().await.lease_ids, leases[2..3]);
    // The stream ends with the server's drain (or, after a crash, with the process): either
    // way the ask ends unanswered, and its lease is not revoked.
    server.stop().await;
    drop(stream);
    assert_eq!(b.await.expect("B's task").unwrap_err().code(), Code::Unavailable);

    // Third life: the revoked leases are gone, the asked one is still A's.
    let server = MemoryServer::start_at(addr, durable(Duration::from_secs(60))).await;
    let mut a = server.client().await;
    let kv = stats(&mut a, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.live_leases, kv.reclaimable_bytes, kv.reclaiming_bytes), (100, 9, 0, 0));
    assert_eq!((kv.reclaim_asked_total, kv.revoked_total, kv.reclaim_declined_total), (3, 2, 1));
    let renew = |lease_id: &String| RenewLeaseRequest { lease_id: lease_id.clone() };
    assert_eq!(a.renew_lease(renew(&leases[0])).await.unwrap_err().code(), Code::NotFound);
    a.renew_lease(renew(&leases[2])).await.expect("the lease asked at the restart is kept");
    server.stop().await;
}
