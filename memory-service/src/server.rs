//! Serving memory-service on a bound listener until a shutdown future resolves.

use std::{future::Future, sync::Arc};

use proto::memory::v1::memory_service_server::MemoryServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use serving::config::ServeError;

use crate::{
    config::{Config, ConfigError},
    metrics::Metrics,
    reaper,
    service::{MemoryApi, MemoryPolicy, Shared},
};

/// Serves `memory.v1.MemoryService`, health and reflection on `listener` until `shutdown`
/// resolves, then drains: health turns NOT_SERVING, open watch and keep-alive streams end with
/// UNAVAILABLE, waiting Allocate calls are answered UNAVAILABLE, and in-flight calls get up to
/// `config.grace_period` to finish before connections are closed.
///
/// Taking bound listeners (rather than addresses) lets tests serve on `127.0.0.1:0` and read
/// the ports before the server starts. `admin`, if given, serves Prometheus metrics at
/// `/metrics`.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    let grace = config.grace_period;
    let token = CancellationToken::new();
    let pools: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    let metrics = Metrics::new(&pools)?;
    let security = config.security.prepare("memory-service", Box::new(MemoryPolicy))?;
    let transport = config.security.transport;
    let config_reload = config.security.tls_reload;
    let store = match &config.state_dir {
        Some(dir) => {
            let store = crate::store::Store::open(dir).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            let snapshot = store.load().map_err(|e| ConfigError::Invalid(e.to_string()))?;
            info!(dir = %dir.display(), "state: durable; every acknowledged change is on disk before its reply");
            Some((store, snapshot))
        }
        None => {
            warn!(
                "state: in memory only (no --state-dir): a restart forgets every lease and starts a new epoch"
            );
            None
        }
    };
    let shared = Shared::new(config, token.clone(), metrics.clone(), security.auth.enforced(), store)
        .map_err(|e| ConfigError::Invalid(format!("cannot create the configured pools: {e}")))?;
    let committer = crate::service::durability::Committer::start(shared.clone())
        .map_err(|e| ConfigError::Invalid(format!("cannot start the commit thread: {e}")))?;

    let (health, router) = serving::grpc::base::<MemoryServiceServer<MemoryApi>>(
        metrics.grpc.clone(),
        proto::MEMORY_DESCRIPTOR_SET,
        &transport,
        security.auth,
    )?;
    let snapshot_of = shared.clone();
    let snapshot: serving::admin::Snapshot = Arc::new(move || {
        let pools = {
            let mut ledger = snapshot_of.ledger();
            ledger.reap(tokio::time::Instant::now());
            ledger.list_pools()
        };
        crate::metrics::pool_families(&pools, snapshot_of.epoch())
    });
    serving::admin::spawn(admin, &metrics.registry, snapshot, &health, &token);
    serving::grpc::set_health(&health, true).await;
    let addr = listener.local_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let incoming = serving::tls::accept(listener, security.tls, &transport, config_reload, token.clone());

    let reaper = tokio::spawn(reaper::run(shared.clone()));
    let drain = token.clone();
    let server = router
        .add_service(
            MemoryServiceServer::new(MemoryApi::new(shared.clone()))
                .max_decoding_message_size(transport.max_message_bytes),
        )
        .serve_with_incoming_shutdown(incoming, drain.cancelled_owned());
    tokio::pin!(server);
    // The epoch as a string: a 64-bit number loses precision in JSON tooling (JavaScript's 2^53).
    info!(%addr, epoch = %shared.ledger().epoch(), "memory-service listening");

    tokio::select! {
        result = &mut server => {
            token.cancel();
            return Ok(result?);
        }
        () = shutdown => {}
    }

    info!(grace = ?grace, "draining");
    // Not serving first, so load balancers and probes stop sending new work while we drain.
    serving::grpc::set_health(&health, false).await;
    token.cancel();
    shared.ledger().close_waiters();
    let result = match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.map_err(ServeError::from),
        Err(_) => {
            warn!(grace = ?grace, "grace period over; closing remaining connections");
            Ok(())
        }
    };
    let _ = reaper.await;
    // The last commit, once no call is served any more: what the drain changed is on disk
    // before exit, and no call that changed the ledger during the drain waits in vain.
    committer.finish().await;
    info!("memory-service stopped");
    result
}
