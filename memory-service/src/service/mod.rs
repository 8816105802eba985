//! The gRPC shell: `memory.v1.MemoryService` over a shared [`Ledger`].
//!
//! Each handler validates its request, takes the ledger lock for a few microseconds, renders the
//! answer and releases the lock before any await.

mod access;
mod allocate;
pub mod convert;
pub mod durability;
mod keepalive;
mod scope;
pub mod status;
mod watch;

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use proto::memory::v1::{self as pb, memory_service_server::MemoryService};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use self::access::{Access, MemoryPolicy};

use self::convert::Clock;
use crate::{
    config::Config,
    ledger::{Error, Ledger},
    metrics::Metrics,
};

/// State shared by every handler and background task.
#[derive(Debug)]
pub struct Shared {
    /// A synchronous mutex, not tokio's: it is never held across an await, critical sections
    /// are microseconds, and the ledger must stay usable from `Drop` (wait guards) where no await
    /// is possible. parking_lot's, because it is eventually fair: a caller waiting for it is
    /// handed the lock within about half a millisecond, even while a sliced scope operation
    /// takes and releases it in a loop (std's futex mutex let that loop starve other calls for
    /// hundreds of milliseconds).
    ledger: Mutex<Ledger>,
    config: Config,
    epoch: u64,
    /// Cancelled when shutdown starts: streams end and waiters give up.
    shutdown: CancellationToken,
    /// Prometheus instruments.
    metrics: Metrics,
    /// One permit per open WatchEvents stream.
    watchers: Arc<Semaphore>,
    /// One permit per open KeepAlive stream.
    keepalives: Arc<Semaphore>,
    /// Group commit to the state store, if there is one.
    durability: durability::Durability,
}

impl Shared {
    /// Builds the ledger with the configured pools. `config` must be validated.
    /// `authenticated`: callers carry identities, so scopes become per-holder namespaces.
    /// With a `store`, its contents come back first (epoch, pools, leases with the time they
    /// have left) and every change is committed to it before it is acknowledged; configured
    /// pools it lacks are created, and a stored pool keeps its stored capacity.
    pub fn new(
        config: Config,
        shutdown: CancellationToken,
        metrics: Metrics,
        authenticated: bool,
        store: Option<(crate::store::Store, crate::ledger::Snapshot)>,
    ) -> Result<Arc<Self>, Error> {
        let mut ledger = Ledger::new(config.event_buffer);
        ledger.set_limits(config.limits);
        ledger.set_scopes_per_holder(authenticated);
        ledger.observe_releases(metrics.lifetimes());
        let store = match store {
            Some((store, snapshot)) => {
                let latest = ledger.track_changes();
                let restored =
                    ledger.restore(snapshot, tokio::time::Instant::now(), std::time::SystemTime::now())?;
                tracing::info!(
                    live = restored.live,
                    expired = restored.expired,
                    epoch = %ledger.epoch(),
                    "state restored: leases live again with their remaining time; those whose deadline passed while down expired"
                );
                if restored.reconciled > 0 {
                    tracing::warn!(
                        pools = restored.reconciled,
                        "stored pool counters did not add up with the leases restored and were corrected (leases counted but not held count as expired); the next commit writes them back"
                    );
                }
                if restored.dropped > 0 {
                    tracing::warn!(
                        dropped = restored.dropped,
                        "stored leases of a pool that is not stored, or bigger than what is left of it, were not restored and will be deleted by the next commit (a damaged or edited state file)"
                    );
                }
                Some((store, latest))
            }
            None => None,
        };
        for pool in &config.pools {
            match ledger.pool_stats(&pool.name) {
                Ok(stored) if stored.capacity != pool.capacity => tracing::warn!(
                    pool = %pool.name,
                    stored = stored.capacity,
                    configured = pool.capacity,
                    "the stored pool keeps its stored capacity; pools are never resized"
                ),
                Ok(_) => {}
                Err(_) => {
                    ledger.create_pool(&pool.name, pool.capacity)?;
                }
            }
        }
        let epoch = ledger.epoch();
        let watchers = Arc::new(Semaphore::new(config.max_watchers));
        let keepalives = Arc::new(Semaphore::new(config.max_keepalive_streams));
        Ok(Arc::new(Shared {
            ledger: Mutex::new(ledger),
            config,
            epoch,
            shutdown,
            metrics,
            watchers,
            keepalives,
            durability: durability::Durability::new(store),
        }))
    }

    /// Locks the ledger. No ledger path panics on client input (sizes are bounded by pool
    /// capacity, cumulative counters are 128-bit, lookups are checked); the invariant checks in
    /// the property and stress tests are there to find a bug that would.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock()
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Boot id.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Prometheus instruments.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Group commit to the state store.
    pub fn durability(&self) -> &durability::Durability {
        &self.durability
    }

    /// Waits until the ledger's changes so far are durable (at once without a store).
    pub async fn durable(&self) -> Result<(), Error> {
        // In memory every change is as durable as it gets: no second lock on the hot path.
        if !self.durability.is_durable() {
            return Ok(());
        }
        self.durability.wait(self.durability.latest_change()).await
    }

    /// The shutdown token.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn status(&self, err: Error) -> Status {
        status::to_status(err, self.config.retry_hint)
    }
}

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
        allocate::allocate(&self.shared, request).await.map(Response::new).map_err(|e| self.shared.status(e))
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
            access.check_owner(&ledger, id).and_then(|()| {
                ledger
                    .renew(id, clock.instant())
                    .map(|l| convert::lease(&l, ledger.pool_name(l.pool), &clock))
            })
        };
        let lease = lease.map_err(|e| self.shared.status(e))?;
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
        let filter = watch::Filter::new(request.into_inner(), access).map_err(|e| self.shared.status(e))?;
        let permit = self.shared.watchers.clone().try_acquire_owned().map_err(|_| {
            self.shared.status(Error::LimitReached {
                what: "event watchers",
                limit: self.shared.config.max_watchers as u64,
                hint: "share one WatchEvents stream per process",
            })
        })?;
        Ok(Response::new(watch::spawn(self.shared.clone(), filter, permit)))
    }
}
