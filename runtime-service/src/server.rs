//! Serving runtime-service on a bound listener until a shutdown future resolves.

use std::{future::Future, sync::Arc};

use proto::runtime::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use serving::config::ServeError;

use crate::{
    config::{Config, ConfigError},
    metrics::Metrics,
    service::RuntimeApi,
    state::Shared,
    supervisor,
};

/// Extra time after the grace period for returning the models' memory and closing connections.
const UNLOAD_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `runtime.v1.RuntimeService`, health and reflection on `listener` until `shutdown`
/// resolves. Health is NOT_SERVING until memory-service answers, the device's activations are
/// leased and the preload models are loaded. At shutdown: health turns NOT_SERVING, every
/// generation ends with UNAVAILABLE and the device returns its KV slabs (within
/// `config.grace_period`), then the models' and activations' memory is returned (within 2 s more). `admin`, if given, serves Prometheus metrics at `/metrics`.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    let grace = config.grace_period;
    let token = CancellationToken::new();
    let metrics = Metrics::new()?;
    let shared = Shared::new(config, token.clone(), metrics.clone())
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    // Every runtime metric is a registered instrument; nothing extra to render per scrape.
    let snapshot: serving::admin::Snapshot = Arc::new(String::new);
    serving::admin::spawn(admin, &metrics.registry, snapshot, &token);

    let (health, router) = serving::grpc::base(metrics.grpc.clone(), &[proto::FILE_DESCRIPTOR_SET])?;
    serving::grpc::set_health::<RuntimeServiceServer<RuntimeApi>>(&health, false).await;
    let supervisor = tokio::spawn(supervisor::run(shared.clone(), health.clone()));

    let addr = listener.local_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let server = router
        .add_service(RuntimeServiceServer::new(RuntimeApi::new(shared.clone())))
        .serve_with_incoming_shutdown(serving::grpc::incoming(listener), token.clone().cancelled_owned());
    tokio::pin!(server);
    info!(%addr, memory = %shared.config.memory_addr, instance = %shared.config.instance, "runtime-service listening");

    tokio::select! {
        result = &mut server => {
            token.cancel();
            return Ok(result?);
        }
        () = shutdown => {}
    }

    info!(grace = ?grace, "draining");
    supervisor.abort();
    serving::grpc::set_health::<RuntimeServiceServer<RuntimeApi>>(&health, false).await;
    // Cancels every generation (their tokens are children): each returns its memory, then ends
    // its stream with UNAVAILABLE.
    token.cancel();
    shared.tracker.close();
    if tokio::time::timeout(grace, shared.tracker.wait()).await.is_err() {
        warn!(grace = ?grace, "generations still running at the end of the grace period; their leases will expire");
    }
    // The models' and the device's memory is returned even after a slow drain, under its own
    // short bound. (The device loop dropped its kv-cache slabs as it stopped.)
    let unload = async {
        for model in shared.models.iter() {
            model.unload().await;
        }
        shared.activations.release().await;
        shared.tracker.wait().await; // frees retried in the background
    };
    if tokio::time::timeout(UNLOAD_BOUND.min(grace), unload).await.is_err() {
        warn!("could not return every model's memory in time; those leases will expire");
    }
    let result = match tokio::time::timeout(UNLOAD_BOUND, &mut server).await {
        Ok(result) => result.map_err(ServeError::from),
        Err(_) => {
            warn!("connections still open after the drain; closing them");
            Ok(())
        }
    };
    info!("runtime-service stopped");
    result
}
