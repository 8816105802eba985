//! A no-op `memory.v1.MemoryService` for benchmarks: the same tonic server stack as the
//! production binary (TCP_NODELAY, one process) with handlers that do nothing: `Allocate` answers
//! one made-up lease, `Free` an empty reply, `KeepAlive` answers each message with every lease it names. What the
//! production binary costs beyond it is the memory logic (and its durability). Replies have
//! the real replies' shape (a KeepAlive reply lists every lease named), so the comparison is of
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
        let item = request.into_inner().items.into_iter().next().unwrap_or_default();
        let lease = pb::Lease {
            lease_id: "0".repeat(32),
            pool: item.pool,
            size_bytes: item.size_bytes,
            ..pb::Lease::default()
        };
        Ok(Response::new(pb::AllocateResponse { leases: vec![lease], ..pb::AllocateResponse::default() }))
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
