//! The load: closed-loop tasks on one connection, each repeating a pair of calls as fast as the
//! server answers: Allocate+Free, or a KeepAlive message of 16 leases and its reply. Every
//! server in the tables is driven by these same loops, so their rates compare.

use std::time::Duration;

use e2e::alloc;
use proto::memory::v1::{FreeRequest, KeepAliveRequest, memory_service_client::MemoryServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::ROUND;

const LEASES_PER_MESSAGE: usize = 16;

/// Runs `concurrency` closed-loop tasks for `round` on one connection, each with its own client
/// from `new_client`, repeating `pair` (two RPCs); RPCs per second.
pub(crate) async fn pair_rate<C, Fut>(
    concurrency: usize,
    round: Duration,
    new_client: impl Fn() -> C,
    pair: fn(C) -> Fut,
) -> f64
where
    C: Send + 'static,
    Fut: std::future::Future<Output = C> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = new_client();
            tokio::spawn(async move {
                let mut rpcs = 0u64;
                while started.elapsed() < round {
                    client = pair(client).await;
                    rpcs += 2;
                }
                rpcs
            })
        })
        .collect();
    let mut rpcs = 0;
    for task in tasks {
        rpcs += task.await.expect("task");
    }
    rpcs as f64 / started.elapsed().as_secs_f64()
}

/// Allocate+Free pairs for `ROUND` from `concurrency` tasks on one connection; RPCs per second.
pub(crate) async fn alloc_free(channel: &Channel, concurrency: usize) -> f64 {
    async fn pair(mut client: MemoryServiceClient<Channel>) -> MemoryServiceClient<Channel> {
        let lease = client.allocate(alloc(&[("kv-cache", 4096)])).await.expect("allocate");
        let lease_id = lease.into_inner().leases.remove(0).lease_id;
        client.free(FreeRequest { lease_id }).await.expect("free");
        client
    }
    pair_rate(concurrency, ROUND, || MemoryServiceClient::new(channel.clone()), pair).await
}

/// KeepAlive round trips for `ROUND` on `streams` streams, each message naming the same 16
/// leases (granted first on a real server); lease renewals per second.
pub(crate) async fn keep_alive(channel: &Channel, streams: usize, real: bool) -> f64 {
    let mut client = MemoryServiceClient::new(channel.clone());
    let mut lease_ids = Vec::new();
    for _ in 0..LEASES_PER_MESSAGE {
        lease_ids.push(if real {
            client
                .allocate(alloc(&[("kv-cache", 4096)]))
                .await
                .expect("allocate")
                .into_inner()
                .leases
                .remove(0)
                .lease_id
        } else {
            "0".repeat(32)
        });
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let mut client = client.clone();
            let lease_ids = lease_ids.clone();
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let mut replies = client
                    .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .expect("open")
                    .into_inner();
                let mut renewed = 0u64;
                while started.elapsed() < ROUND {
                    tx.send(KeepAliveRequest {
                        lease_ids: lease_ids.clone(),
                        scope_ids: vec![],
                        reclaimable: None,
                    })
                    .await
                    .expect("send");
                    replies.message().await.expect("reply").expect("open");
                    renewed += LEASES_PER_MESSAGE as u64;
                }
                renewed
            })
        })
        .collect();
    let mut renewed = 0;
    for task in tasks {
        renewed += task.await.expect("task");
    }
    let rate = renewed as f64 / started.elapsed().as_secs_f64();
    if real {
        for lease_id in lease_ids {
            let _ = client.free(FreeRequest { lease_id }).await;
        }
    }
    rate
}
