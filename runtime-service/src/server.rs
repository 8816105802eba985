//! Serving runtime-service on a bound listener until a shutdown future resolves.

use std::{future::Future, sync::Arc};

use proto::{
    runtime::v1::runtime_service_server::RuntimeServiceServer,
    vllm::grpc::engine::vllm_engine_server::VllmEngineServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tracing::{info, warn};

pub use serving::config::ServeError;

use crate::{
    config::{Config, ConfigError},
    dialect::EngineApi,
    metrics::Metrics,
    service::{RuntimeApi, RuntimePolicy},
    state::Shared,
    supervisor,
};

/// Extra time after the grace period for returning the models' memory and closing connections.
const UNLOAD_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `runtime.v1.RuntimeService`, its engine dialect `vllm.grpc.engine.VllmEngine` (for
/// the model `config.engine_model()`), health and reflection on `listener` until `shutdown`
/// resolves. Health is NOT_SERVING until memory-service answers, the device's activations are
/// leased and the preload models are loaded. When `shutdown` resolves, the drain: health turns
/// NOT_SERVING, new generations are refused with UNAVAILABLE, running ones get
/// `config.grace_period` to finish, then whatever is left is cancelled (2 s more), the device
/// returns its KV slabs, the models' and activations' memory is returned (2 s more) and
/// connections close (2 s more). `admin`, if given, serves Prometheus metrics at `/metrics`.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    // A user's tokenizer that does not load is refused now, not at the first request.
    for model in &config.models {
        crate::tokenizer::Bundle::check(model).map_err(crate::config::ConfigError::Invalid)?;
    }
    let grace = config.grace_period;
    let token = CancellationToken::new();
    let metrics = Metrics::for_config(&config)?;
    let security = config.security.prepare("runtime-service", Box::new(RuntimePolicy))?;
    let transport = config.security.transport;
    let config_reload = config.security.tls_reload;
    let shared = Shared::new(config, token.clone(), metrics.clone())
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let engine_model = shared.models.engine_model(&shared.config)?;

    // Two front doors onto one device: reflection lists both, health covers both.
    let (health, router) = serving::grpc::base_for(
        &[
            <RuntimeServiceServer<RuntimeApi> as NamedService>::NAME,
            <VllmEngineServer<EngineApi> as NamedService>::NAME,
        ],
        &[proto::RUNTIME_DESCRIPTOR_SET, proto::VLLM_ENGINE_DESCRIPTOR_SET],
        metrics.grpc.clone(),
        &transport,
        security.auth,
    )?;
    // Every runtime metric is a registered instrument; nothing extra to render per scrape.
    let snapshot: serving::admin::Snapshot = Arc::new(String::new);
    serving::admin::spawn(admin, &metrics.registry, snapshot, &health, &token);
    serving::grpc::set_health(&health, false).await;
    let supervisor = tokio::spawn(supervisor::run(shared.clone(), health.clone()));

    let addr = listener.local_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let incoming = serving::tls::accept(listener, security.tls, &transport, config_reload, token.clone());
    let engine = EngineApi::new(shared.clone(), engine_model, health.ready());
    let server = router
        .add_service(
            RuntimeServiceServer::new(RuntimeApi::new(shared.clone()))
                .max_decoding_message_size(transport.max_message_bytes),
        )
        .add_service(VllmEngineServer::new(engine).max_decoding_message_size(transport.max_message_bytes))
        .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned());
    tokio::pin!(server);
    info!(%addr, memory = %shared.config.memory_addr, instance = %shared.config.instance, "runtime-service listening");

    tokio::select! {
        result = &mut server => {
            token.cancel();
            return Ok(result?);
        }
        () = shutdown => {}
    }

    // The server goes on serving while it drains: the streams in flight, health (NOT_SERVING)
    // and the refusals of new generations all need it.
    let drain = drain(&shared, &health, supervisor, token.clone(), grace);
    tokio::pin!(drain);
    let mut served = None;
    loop {
        tokio::select! {
            result = &mut server, if served.is_none() => served = Some(result),
            () = &mut drain => break,
        }
    }
    let result = match served {
        Some(result) => result.map_err(ServeError::from),
        None => match tokio::time::timeout(UNLOAD_BOUND, &mut server).await {
            Ok(result) => result.map_err(ServeError::from),
            Err(_) => {
                warn!("connections still open after the drain; closing them");
                Ok(())
            }
        },
    };
    info!("runtime-service stopped");
    result
}

/// The drain: health NOT_SERVING (so endpoints go away) and new generations refused with
/// UNAVAILABLE and a retry hint, while those in flight finish, for up to `grace`; then what is
/// left is cancelled, the device loop stops (its kv-cache slabs freed) and the standing leases are
/// returned. Cancelling `token` also starts the server's own graceful stop.
async fn drain(
    shared: &Shared,
    health: &serving::grpc::Health,
    supervisor: tokio::task::JoinHandle<()>,
    token: CancellationToken,
    grace: std::time::Duration,
) {
    info!(grace = ?grace, running = shared.executor.admitted(), "draining: new generations refused, running ones finish");
    supervisor.abort();
    serving::grpc::set_health(health, false).await;
    shared.draining.cancel();
    shared.generations.close();
    if tokio::time::timeout(grace, shared.generations.wait()).await.is_err() {
        warn!(grace = ?grace, left = shared.executor.admitted(), "grace period over: cancelling the generations still running");
    }
    // Each generation left ends with UNAVAILABLE, its blocks back on the device; the device loop
    // stops and drops its slabs (freed in the background).
    token.cancel();
    if tokio::time::timeout(UNLOAD_BOUND, shared.generations.wait()).await.is_err() {
        warn!("generations did not end after cancellation; their leases will expire");
    }
    shared.tracker.close();
    // The models' and the device's memory is returned even after a slow drain, under its own
    // short bound, and so are the slabs freed in the background.
    let unload = async {
        for model in shared.models.iter() {
            model.unload().await;
        }
        shared.activations.release().await;
        shared.tracker.wait().await;
    };
    if tokio::time::timeout(UNLOAD_BOUND, unload).await.is_err() {
        warn!("could not return every lease in time; those leases will expire");
    }
}
