//! The state every handler and background task shares: the ledger behind its lock, the
//! configuration, limits on streams, and the way to the store.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{durability, status};
use crate::{
    config::Config,
    ledger::{Error, Ledger},
    metrics::Metrics,
};

/// Longest a read waits for the changes it saw to be on disk (see [`Shared::settled`]): a
/// healthy commit takes milliseconds, so only a stalled disk reaches it.
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

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
    pub(super) config: Config,
    pub(super) epoch: u64,
    /// Cancelled when shutdown starts: streams end and waiters give up.
    shutdown: CancellationToken,
    /// Prometheus instruments.
    metrics: Metrics,
    /// One permit per open WatchEvents stream.
    pub(super) watchers: Arc<Semaphore>,
    /// One permit per open KeepAlive stream.
    pub(super) keepalives: Arc<Semaphore>,
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
        ledger.set_reclaim_timeout(config.reclaim_timeout);
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

    /// The epoch of the server's state (kept across a durable restart).
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

    /// Waits until the ledger's changes so far are durable (at once without a store). Mutating
    /// calls wait for it before they answer.
    pub async fn durable(&self) -> Result<(), Error> {
        // In memory every change is as durable as it gets: no second lock on the hot path.
        if !self.durability.is_durable() {
            return Ok(());
        }
        self.durability.wait(self.durability.latest_change()).await
    }

    /// Waits until what a read saw is on disk, so the read reports nothing a crash could take
    /// back (etcd's reads are of committed revisions alike); it costs a commit only when
    /// changes are in flight. A failing store cannot settle it: the read then reports memory as
    /// it is, which differs from the disk only by leases that expired or were taken back (every
    /// other change is refused meanwhile), so an operator can still read the books. Nor can a
    /// stalled one: a read waits at most [`SETTLE_LIMIT`], then answers the same way, rather
    /// than hang with the disk.
    pub async fn settled(&self) {
        let _ = tokio::time::timeout(SETTLE_LIMIT, self.durable()).await;
    }

    /// The shutdown token.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(super) fn status(&self, err: Error) -> Status {
        status::to_status(err, self.config.retry_hint)
    }
}
