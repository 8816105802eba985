//! Waiting for memory-service to reach a state: woken by its events where it publishes them,
//! else polled in a bounded loop that yields between calls. Never a sleep.

use std::time::Duration;

use proto::memory::v1::memory_service_client::MemoryServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{requests::stats, servers::MemoryServer};

/// Waits until `pool` holds `used` bytes, woken by its FREED and EXPIRED events (no polling):
/// slabs go back to memory-service in the background once a model falls idle.
pub async fn wait_for_used(memory: &MemoryServer, pool: &str, used: u64) {
    use proto::memory::v1::{EventKind, WatchEventsRequest};
    let mut client = memory.client().await;
    let filter = WatchEventsRequest {
        pools: vec![pool.into()],
        kinds: vec![EventKind::Freed.into(), EventKind::Expired.into(), EventKind::Allocated.into()],
        ..Default::default()
    };
    let mut events = client.watch_events(filter).await.expect("watch events").into_inner();
    loop {
        if stats(&mut client, pool).await.used_bytes == used {
            return;
        }
        let next = tokio::time::timeout(Duration::from_secs(60), events.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "{pool} never reached {used} bytes used");
    }
}

/// Polls `pool`'s stats (a bounded loop yielding between calls, never a sleep) until it has
/// `waiters` queued Allocate calls; false if that never happens.
pub async fn wait_for_waiters(client: &mut MemoryServiceClient<Channel>, pool: &str, waiters: u64) -> bool {
    for _ in 0..1000 {
        if stats(client, pool).await.waiters == waiters {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}
