//! Serving runtime-service on a bound listener until a shutdown future resolves.

use std::future::Future;

use proto::runtime::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError},
    service::RuntimeApi,
    state::Shared,
    supervisor,
};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] serving::grpc::ReflectionError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `runtime.v1.RuntimeService`, health and reflection on `listener` until `shutdown`
/// resolves. Health is NOT_SERVING until memory-service answers and the preload models are
/// loaded. At shutdown: health turns NOT_SERVING, every generation ends with UNAVAILABLE after
/// returning its memory, the models' memory is returned, all within `config.grace_period`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    let grace = config.grace_period;
    let token = CancellationToken::new();
    let shared = Shared::new(config, token.clone()).map_err(|e| ConfigError::Invalid(e.to_string()))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<RuntimeServiceServer<RuntimeApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let (reflection_v1, reflection_v1alpha) = serving::grpc::reflection(&[proto::FILE_DESCRIPTOR_SET])?;
    let supervisor = tokio::spawn(supervisor::run(shared.clone(), health.clone()));

    let addr = listener.local_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
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
    health.set_not_serving::<RuntimeServiceServer<RuntimeApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    // Cancels every generation (their tokens are children): each returns its memory, then ends
    // its stream with UNAVAILABLE.
    token.cancel();
    let drain = async {
        shared.tracker.close();
        shared.tracker.wait().await;
        for model in shared.models.iter() {
            model.unload().await;
        }
        // Frees started by the unloads above.
        shared.tracker.wait().await;
        (&mut server).await
    };
    let result = match tokio::time::timeout(grace, drain).await {
        Ok(result) => result.map_err(ServeError::from),
        Err(_) => {
            warn!(grace = ?grace, "grace period over; leases not yet freed will expire");
            Ok(())
        }
    };
    info!("runtime-service stopped");
    result
}
