//! The gRPC shell: `memory.v1.MemoryService` over a shared [`Ledger`](crate::ledger::Ledger).
//!
//! Each handler validates its request, takes the ledger lock for a few microseconds, renders the
//! answer and releases the lock before any await.

mod access;
mod allocate;
pub mod convert;
pub mod durability;
mod keepalive;
mod reclaim;
mod scope;
mod shared;
pub mod status;
mod watch;

use std::sync::Arc;

use proto::memory::v1::{self as pb, memory_service_server::MemoryService};
use tonic::{Request, Response, Status, Streaming};

pub use self::{
    access::{Access, MemoryPolicy},
    shared::Shared,
};

use self::convert::Clock;
use crate::ledger::Error;

/// The `MemoryService` implementation.
#[derive(Debug, Clone)]
pub struct MemoryApi {
    shared: Arc<Shared>,
}

impl MemoryApi {
    /// Serves over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        MemoryApi { shared }
    }
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let req = request.into_inner();
        // Both fields checked, so one refusal lists every violation (the ledger checks the
        // capacity again, as the authority).
        let mut bad = crate::ledger::Violations::default();
        bad.keep(convert::pool_name("name", &req.name));
        if req.capacity_bytes == 0 || req.capacity_bytes > crate::ledger::MAX_CAPACITY {
            let max = crate::ledger::MAX_CAPACITY;
            bad.add("capacity_bytes", format!("{} must be between 1 and {max} (4 EiB)", req.capacity_bytes));
        }
        bad.check().map_err(|e| self.shared.status(e))?;
        self.shared.durability().check().map_err(|e| self.shared.status(e))?;
        let stats = self.shared.ledger().create_pool(&req.name, req.capacity_bytes);
        let stats = stats.map_err(|e| self.shared.status(e))?;
        self.shared.durable().await.map_err(|e| self.shared.status(e))?;
        tracing::info!(pool = %req.name, capacity = req.capacity_bytes, "pool created");
        Ok(Response::new(pb::CreatePoolResponse {
            pool: Some(convert::pool_stats(stats)),
            server_epoch: self.shared.epoch,
        }))
    }

    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = {
            let mut ledger = self.shared.ledger();
            ledger.reap(Clock::now().instant());
            ledger.list_pools()
        };
        self.shared.settled().await;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.into_iter().map(convert::pool_stats).collect(),
            server_epoch: self.shared.epoch,
            limits: Some(convert::server_limits(&self.shared.config)),
        }))
    }

    async fn get_pool_stats(
        &self,
        request: Request<pb::GetPoolStatsRequest>,
    ) -> Result<Response<pb::GetPoolStatsResponse>, Status> {
        let name = request.into_inner().name;
        convert::pool_name("name", &name).map_err(|e| self.shared.status(e))?;
        let stats = {
            let mut ledger = self.shared.ledger();
            ledger.reap(Clock::now().instant());
            ledger.pool_stats(&name)
        };
        let stats = stats.map_err(|e| self.shared.status(e))?;
        self.shared.settled().await;
        Ok(Response::new(pb::GetPoolStatsResponse {
            pool: Some(convert::pool_stats(stats)),
            server_epoch: self.shared.epoch,
        }))
    }

    async fn can_allocate(
        &self,
        request: Request<pb::CanAllocateRequest>,
    ) -> Result<Response<pb::CanAllocateResponse>, Status> {
        let items = convert::items(request.into_inner().items).map_err(|e| self.shared.status(e))?;
        let fit = self.shared.ledger().can_allocate(&items, Clock::now().instant());
        let fit = fit.map_err(|e| self.shared.status(e))?;
        self.shared.settled().await;
        Ok(Response::new(pb::CanAllocateResponse {
            can_allocate_now: fit.now,
            fits_capacity: fit.fits_capacity,
            pools: fit.pools.into_iter().map(convert::pool_fit).collect(),
            server_epoch: self.shared.epoch,
        }))
    }

    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        allocate::allocate(&self.shared, request).await.map(Response::new).map_err(|e| {
            // A refusal is an event (REJECTED, WAIT_TIMED_OUT) with counters, and nobody waits
            // for its commit: wake the committer, or watchers would hear of it only with the
            // next change.
            self.shared.durability().nudge();
            self.shared.status(e)
        })
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let access = Access::of(&request);
        let id = convert::lease_id(&request.into_inner().lease_id).map_err(|e| self.shared.status(e))?;
        let clock = Clock::now();
        let lease = {
            let mut ledger = self.shared.ledger();
            self.shared.durability().check().and_then(|()| access.check_owner(&ledger, id)).and_then(|()| {
                ledger
                    .renew(id, clock.instant())
                    .map(|l| convert::lease(&l, ledger.pool_name(l.pool), &clock))
            })
        };
        let lease = lease.map_err(|e| self.shared.status(e))?;
        // A renewal is a promise about the deadline: it must survive a crash like a grant.
        self.shared.durable().await.map_err(|e| self.shared.status(e))?;
        Ok(Response::new(pb::RenewLeaseResponse { lease: Some(lease), server_epoch: self.shared.epoch }))
    }

    type KeepAliveStream = keepalive::KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let access = Access::of(&request);
        let permit = self.shared.keepalives.clone().try_acquire_owned().map_err(|_| {
            self.shared.status(Error::LimitReached {
                what: "keep-alive streams",
                limit: self.shared.config.max_keepalive_streams as u64,
                hint: "renew many leases and scopes on one stream rather than opening one per lease",
            })
        })?;
        Ok(Response::new(keepalive::spawn(self.shared.clone(), access, request.into_inner(), permit)))
    }

    async fn free(&self, request: Request<pb::FreeRequest>) -> Result<Response<pb::FreeResponse>, Status> {
        let access = Access::of(&request);
        let id = convert::lease_id(&request.into_inner().lease_id).map_err(|e| self.shared.status(e))?;
        let clock = Clock::now();
        let lease = {
            let mut ledger = self.shared.ledger();
            self.shared.durability().check().and_then(|()| access.check_owner(&ledger, id)).and_then(|()| {
                ledger.free(id, clock.instant()).map(|l| convert::lease(&l, ledger.pool_name(l.pool), &clock))
            })
        };
        let lease = lease.map_err(|e| self.shared.status(e))?;
        self.shared.durable().await.map_err(|e| self.shared.status(e))?;
        Ok(Response::new(pb::FreeResponse { lease: Some(lease), server_epoch: self.shared.epoch }))
    }

    async fn free_scope(
        &self,
        request: Request<pb::FreeScopeRequest>,
    ) -> Result<Response<pb::FreeScopeResponse>, Status> {
        let access = Access::of(&request);
        let req = request.into_inner();
        let scope = convert::scope_id(&req.scope_id).map_err(|e| self.shared.status(e))?;
        self.shared.durability().check().map_err(|e| self.shared.status(e))?;
        let (freed_leases, freed_bytes) = scope::free(&self.shared, access.namespace(), scope).await;
        self.shared.durable().await.map_err(|e| self.shared.status(e))?;
        Ok(Response::new(pb::FreeScopeResponse {
            freed_leases,
            freed_bytes,
            server_epoch: self.shared.epoch,
        }))
    }

    type WatchEventsStream = watch::WatchStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let access = Access::of(&request);
        let filter = watch::Filter::new(request.into_inner(), access, self.shared.epoch)
            .map_err(|e| self.shared.status(e))?;
        let permit = self.shared.watchers.clone().try_acquire_owned().map_err(|_| {
            self.shared.status(Error::LimitReached {
                what: "event watchers",
                limit: self.shared.config.max_watchers as u64,
                hint: "share one WatchEvents stream per process",
            })
        })?;
        let stream = watch::spawn(self.shared.clone(), filter, permit).map_err(|e| self.shared.status(e))?;
        Ok(Response::new(stream))
    }
}
