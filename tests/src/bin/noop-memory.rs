//! A no-op `memory.v1.MemoryService` for benchmarks: the same tonic server stack as the
//! production binary (TCP_NODELAY, one process) with handlers that do nothing: `Allocate` answers
//! a made-up lease per item, `Free` an empty reply, `KeepAlive` a made-up lease per id named.
//! What the production binary costs beyond it is the memory logic (and its durability). Replies
//! have the production replies' shape and size (every field of a lease filled, the same epoch
//! field), so both sides pay the same encoding, bytes and client decoding: the comparison is of
//! the work, not of the bytes.
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:0); other flags are ignored. Logs its address as
//! `listening addr=…` on stderr, as the services do.

#![allow(clippy::print_stderr)]

use proto::memory::v1::{
    self as pb,
    memory_service_server::{MemoryService, MemoryServiceServer},
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Default)]
struct Noop;

/// A server epoch of the same encoded size as a real one (random 64 bits).
const EPOCH: u64 = 0x9e37_79b9_7f4a_7c15;

/// A lease with every field the production server fills, as it renders them.
fn made_up_lease(lease_id: String, pool: String, size_bytes: u64, holder: &str) -> pb::Lease {
    pb::Lease {
        lease_id,
        pool,
        size_bytes,
        holder: holder.to_owned(),
        scope_id: String::new(),
        ttl: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
        expire_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl MemoryService for Noop {
    async fn create_pool(
        &self,
        _: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Ok(Response::new(pb::ListPoolsResponse::default()))
    }
    async fn get_pool_stats(
        &self,
        _: Request<pb::GetPoolStatsRequest>,
    ) -> Result<Response<pb::GetPoolStatsResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn can_allocate(
        &self,
        _: Request<pb::CanAllocateRequest>,
    ) -> Result<Response<pb::CanAllocateResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let request = request.into_inner();
        let holder = request.holder;
        let leases = request
            .items
            .into_iter()
            .map(|item| made_up_lease("0".repeat(32), item.pool, item.size_bytes, &holder))
            .collect();
        Ok(Response::new(pb::AllocateResponse {
            leases,
            server_epoch: EPOCH,
            ..pb::AllocateResponse::default()
        }))
    }
    async fn renew_lease(
        &self,
        _: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    type KeepAliveStream = Stream<pb::KeepAliveResponse>;
    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                let reply = pb::KeepAliveResponse {
                    renewed_count: message.lease_ids.len() as u64,
                    renewed: message
                        .lease_ids
                        .into_iter()
                        .map(|id| made_up_lease(id, "kv-cache".into(), 4096, "test"))
                        .collect(),
                    server_epoch: EPOCH,
                    ..Default::default()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn free(&self, _: Request<pb::FreeRequest>) -> Result<Response<pb::FreeResponse>, Status> {
        Ok(Response::new(pb::FreeResponse::default()))
    }
    async fn free_scope(
        &self,
        _: Request<pb::FreeScopeRequest>,
    ) -> Result<Response<pb::FreeScopeResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    type WatchEventsStream = Stream<pb::WatchEventsResponse>;
    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("no-op"))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args.windows(2).find(|w| w[0] == "--listen").map_or("127.0.0.1:0", |w| w[1].as_str());
    let listener = TcpListener::bind(listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    eprintln!("noop-memory listening addr={addr}");
    tonic::transport::Server::builder()
        .add_service(MemoryServiceServer::new(Noop))
        .serve_with_incoming(serving::transport::Transport::default().incoming(listener))
        .await
        .expect("serve");
}
