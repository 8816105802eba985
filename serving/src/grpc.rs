//! Pieces every gRPC server here needs: an accept loop with TCP_NODELAY, reflection (v1 and
//! v1alpha) and the standard health service.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::net::TcpListener;
use tonic::{server::NamedService, transport::server::Router};
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::{
    auth::AuthLayer,
    observe::{GrpcMetrics, ObserveLayer},
    transport::{OversizeLayer, Transport},
};
pub use tonic_reflection::server::Error as ReflectionError;

/// Binds the gRPC listener and, if given, the admin listener. Errors name the address.
pub async fn bind(
    grpc: std::net::SocketAddr,
    admin: Option<std::net::SocketAddr>,
) -> Result<(TcpListener, Option<TcpListener>), String> {
    let listener = TcpListener::bind(grpc).await.map_err(|e| format!("gRPC address {grpc}: {e}"))?;
    let admin = match admin {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| format!("admin address {addr}: {e}"))?),
        None => None,
    };
    Ok((listener, admin))
}

/// Reflection servers listing `services` (the server's own APIs), health and reflection, over
/// `descriptor_sets` plus health's descriptor and google.rpc's `status.proto` and
/// `error_details.proto`, so grpcurl and `buf curl` decode the rich error details every error
/// carries. Both versions are served: grpcurl and `buf curl` ask v1, while Python's
/// grpcio-reflection client speaks only v1alpha.
pub fn reflection(
    services: &[&str],
    descriptor_sets: &[&[u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ReflectionError,
> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure();
        for set in descriptor_sets {
            builder = builder.register_encoded_file_descriptor_set(set);
        }
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH)
            .with_service_name(REFLECTION_V1)
            .with_service_name(REFLECTION_V1ALPHA)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// A router with what every server here carries, before its own service is added.
pub type BaseRouter = Router<Stack<AuthLayer, Stack<OversizeLayer, Stack<ObserveLayer, Identity>>>>;

/// The serving status, for gRPC health and for the admin port's `/readyz` (which probes that
/// speak neither TLS nor tokens can reach).
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    ready: Arc<AtomicBool>,
    /// The services health reports on, besides the server as a whole: a server with two front
    /// doors to one core (runtime-service) turns both SERVING or NOT_SERVING together.
    services: Arc<[&'static str]>,
}

impl Health {
    /// Whether the server is SERVING.
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }
}

/// The common server, with `transport`'s limits: the observe layer outermost, so every call
/// (health and reflection included, refusals too) gets a span continuing the caller's trace
/// and is counted with its final status; over-size requests answered RESOURCE_EXHAUSTED; then
/// authentication (`auth`); the standard health service; reflection v1 and v1alpha of service
/// `S` over `descriptor_set`.
pub fn base<S: NamedService>(
    metrics: GrpcMetrics,
    descriptor_set: &[u8],
    transport: &Transport,
    auth: AuthLayer,
) -> Result<(Health, BaseRouter), ReflectionError> {
    base_for(&[S::NAME], &[descriptor_set], metrics, transport, auth)
}

/// [`base`] for a server with several services of its own (`services`, described by
/// `descriptor_sets`): reflection lists them all and health covers them all.
pub fn base_for(
    services: &[&'static str],
    descriptor_sets: &[&[u8]],
    metrics: GrpcMetrics,
    transport: &Transport,
    auth: AuthLayer,
) -> Result<(Health, BaseRouter), ReflectionError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = reflection(services, descriptor_sets)?;
    let mut sets = descriptor_sets.to_vec();
    sets.extend([
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]);
    let types = crate::observe::method_types(&sets);
    let router = transport
        .server()
        .layer(ObserveLayer::new(metrics, types))
        .layer(OversizeLayer)
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let health =
        Health { reporter: health, ready: Arc::new(AtomicBool::new(false)), services: services.into() };
    Ok((health, router))
}

/// Sets the health of the server's services and of the server as a whole (`""`, what liveness
/// probes ask).
pub async fn set_health(health: &Health, serving: bool) {
    let status =
        if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.ready.store(serving, Ordering::Relaxed);
    for service in health.services.iter() {
        health.reporter.set_service_status(*service, status).await;
    }
    health.reporter.set_service_status("", status).await;
}
