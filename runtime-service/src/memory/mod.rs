//! The memory-service client: every call bounded in time, every failure mapped to a domain error
//! that keeps memory-service's gRPC code meaningful for the caller.

mod budget;
mod renewer;
mod reservation;
mod scope;
mod standing;

use std::time::Duration;

use proto::memory::v1::{
    self as pb, AllocateRequest, AllocationItem, CanAllocateRequest, FreeScopeRequest,
    memory_service_client::MemoryServiceClient,
};
use serving::propagation;
use tonic::{Code, Request, Status, transport::Channel};
use tracing::{Instrument, Span};

pub use self::{
    budget::{DeviceMemory, Held, Use},
    renewer::{Lost, Renewer},
    reservation::Reservation,
    scope::{random_u64, unique_scope},
    standing::{Loader, Standing},
};
use crate::error::Error;

/// HTTP/2 ping interval and timeout on the connection to memory-service.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

pub use crate::config::{MAX_INSTANCE, MAX_SCOPE_NAME};

/// Pool of KV-cache slabs in memory-service.
pub const KV_CACHE: &str = "kv-cache";
/// Pool of activation buffers.
pub const ACTIVATIONS: &str = "activations";
/// Pool of model weights.
pub const UNIFORMS: &str = "uniforms";

/// A pool's capacity as memory-service reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// The epoch of the server that answered.
    pub epoch: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A cheap-to-clone handle on memory-service.
#[derive(Debug, Clone)]
pub struct MemoryClient {
    client: MemoryServiceClient<Channel>,
    holder: String,
    /// `Bearer <token>`, presented on every call when configured.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Bound on each call's round trip (waits add to it).
    pub(crate) timeout: Duration,
}

/// What one Allocate asks for.
#[derive(Debug, Clone)]
pub struct Ask {
    /// (pool, bytes) items, granted together.
    pub items: Vec<(&'static str, u64)>,
    /// Scope the leases join.
    pub scope: String,
    /// Lease TTL (renewed by the [`Renewer`]).
    pub ttl: Duration,
    /// Server-side wait for room.
    pub max_wait: Duration,
}

impl MemoryClient {
    /// A client for `addr` that connects lazily: a runtime may start before memory-service, and
    /// calls made while it is down fail fast with UNAVAILABLE instead of hanging.
    /// With credentials in `auth`, the holder is left empty: memory-service then holds the
    /// leases under the identity the credentials prove.
    pub fn new(
        addr: &str,
        holder: &str,
        timeout: Duration,
        auth: &crate::config::MemoryAuth,
    ) -> Result<Self, Error> {
        // With TLS, our connector does the handshake, so tonic must see a plain address: it
        // refuses an https:// one without TLS settings of its own.
        let connect_addr =
            if auth.tls_ca.is_some() { addr.replacen("https://", "http://", 1) } else { addr.to_owned() };
        let endpoint = Channel::from_shared(connect_addr)
            .map_err(|e| Error::MemoryUnavailable(format!("bad memory address {addr:?}: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            // A memory-service that hangs (rather than dies) closes no stream: HTTP/2 pings find
            // it, and the keep-alive stream's end then turns health NOT_SERVING.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let unreadable = |what: &str, path: &std::path::Path, e: std::io::Error| {
            Error::MemoryUnavailable(format!("cannot read {what} {}: {e}", path.display()))
        };
        let channel = match &auth.tls_ca {
            // TLS through our own connector, which reads the current certificates at each new
            // connection: a rotated client certificate or CA is used without a restart.
            Some(ca) => {
                let files = serving::tls::client::ClientTlsFiles {
                    ca: ca.clone(),
                    identity: auth.tls_identity.clone(),
                };
                let tls = serving::tls::client::ClientTls::load(
                    files,
                    auth.tls_reload,
                    tokio_util::sync::CancellationToken::new(),
                )
                .map_err(Error::MemoryUnavailable)?;
                let host =
                    endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                let server_name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| Error::MemoryUnavailable(format!("memory address host {host:?}: {e}")))?;
                endpoint.connect_with_connector_lazy(tls.connector(server_name))
            }
            None => endpoint.connect_lazy(),
        };
        let authorization = match &auth.token_file {
            Some(path) => {
                let token =
                    std::fs::read_to_string(path).map_err(|e| unreadable("--memory-token-file", path, e))?;
                let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                    Error::MemoryUnavailable(format!(
                        "the token in {} is not valid header text",
                        path.display()
                    ))
                })?;
                Some(value)
            }
            None => None,
        };
        let authenticated = authorization.is_some() || auth.tls_identity.is_some();
        Ok(MemoryClient {
            client: MemoryServiceClient::new(channel),
            holder: if authenticated { String::new() } else { holder.to_owned() },
            authorization,
            timeout,
        })
    }

    /// Adds this client's credentials to `request`.
    pub(crate) fn authorize<T>(&self, request: &mut Request<T>) {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
    }

    /// Whether memory-service answers at all: its epoch, and the limits it advertises.
    pub async fn ping(&self) -> Result<(u64, Option<pb::ServerLimits>), Error> {
        let (span, request) = self.request("ListPools", pb::ListPoolsRequest {}, Duration::ZERO);
        let reply = traced(&span, self.client.clone().list_pools(request)).await?;
        Ok((reply.server_epoch, reply.limits))
    }

    /// Checks `ask` against pool capacities; a request that can never fit fails at once.
    pub async fn check_fits(&self, ask: &Ask) -> Result<(), Error> {
        let items = items(ask);
        let (span, request) = self.request("CanAllocate", CanAllocateRequest { items }, Duration::ZERO);
        let reply = traced(&span, self.client.clone().can_allocate(request)).await?;
        if let Some(pool) = reply.pools.iter().find(|p| p.requested_bytes > p.capacity_bytes) {
            return Err(Error::Unservable(format!(
                "it needs {} bytes of {} but the pool holds {} bytes; lower max_tokens or shorten the prompt",
                pool.requested_bytes, pool.pool, pool.capacity_bytes
            )));
        }
        Ok(())
    }

    /// Capacity of `pool`, and the epoch of the server that said so. A running memory-service
    /// never resizes a pool, but one restarted in memory may come back with other pools: a
    /// cached capacity is good for its epoch only.
    pub async fn pool_capacity(&self, pool: &'static str) -> Result<PoolCapacity, Error> {
        let items = vec![AllocationItem { pool: pool.to_owned(), size_bytes: 1 }];
        let (span, request) = self.request("CanAllocate", CanAllocateRequest { items }, Duration::ZERO);
        let reply = traced(&span, self.client.clone().can_allocate(request)).await?;
        reply
            .pools
            .iter()
            .find(|p| p.pool == pool)
            .map(|p| PoolCapacity { epoch: reply.server_epoch, bytes: p.capacity_bytes })
            .ok_or_else(|| Error::MemoryProtocol(format!("CanAllocate did not report pool {pool}")))
    }

    /// One atomic Allocate of `ask`. `request_id` is the attempt's unique scope, so a retry by the
    /// transport of this very call cannot double-allocate. Returns the server epoch the leases
    /// belong to.
    pub async fn allocate(&self, ask: &Ask, request_id: &str) -> Result<(u64, Vec<String>), Error> {
        let req = AllocateRequest {
            items: items(ask),
            holder: self.holder.clone(),
            scope_id: ask.scope.clone(),
            ttl: prost_types::Duration::try_from(ask.ttl).ok(),
            max_wait: prost_types::Duration::try_from(ask.max_wait).ok(),
            request_id: request_id.to_owned(),
        };
        let (span, request) = self.request("Allocate", req, ask.max_wait);
        span.record("memory.scope", ask.scope.as_str());
        let bytes: u64 = ask.items.iter().map(|&(_, b)| b).fold(0, u64::saturating_add);
        span.record("memory.bytes", bytes);
        let reply = traced(&span, self.client.clone().allocate(request)).await?;
        Ok((reply.server_epoch, reply.leases.into_iter().map(|l| l.lease_id).collect()))
    }

    /// Frees every lease of `scope`; returns (leases, bytes) freed.
    pub async fn free_scope(&self, scope: &str) -> Result<(u64, u64), Error> {
        let req = FreeScopeRequest { scope_id: scope.to_owned() };
        let (span, request) = self.request("FreeScope", req, Duration::ZERO);
        span.record("memory.scope", scope);
        let reply = traced(&span, self.client.clone().free_scope(request)).await?;
        span.record("memory.bytes", reply.freed_bytes);
        Ok((reply.freed_leases, reply.freed_bytes))
    }

    /// The raw client, for the keep-alive stream.
    pub(crate) fn raw(&self) -> MemoryServiceClient<Channel> {
        self.client.clone()
    }

    /// A bounded request carrying the trace context of a new client span for `method`.
    fn request<T>(&self, method: &'static str, message: T, extra: Duration) -> (Span, Request<T>) {
        // A client span only where there is a trace to continue or spans are exported.
        let span = if !serving::telemetry::traced() {
            Span::none()
        } else {
            tracing::info_span!(
            "grpc.client",
            otel.name = %format_args!("{SERVICE}/{method}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = SERVICE,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            memory.scope = tracing::field::Empty,
            memory.bytes = tracing::field::Empty,
            )
        };
        let mut request = Request::new(message);
        request.set_timeout(self.timeout + extra);
        self.authorize(&mut request);
        propagation::inject(&span, request.metadata_mut());
        (span, request)
    }
}

/// The service name in client spans.
const SERVICE: &str = "memory.v1.MemoryService";

/// Runs `call` inside `span`, records its status code, and maps a failure to a domain error. A
/// call abandoned before its answer (the generation was cancelled or ran out of time) is
/// recorded as CANCELLED when its future is dropped.
async fn traced<T>(
    span: &Span,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Error> {
    struct Pending<'a>(Option<&'a Span>);
    impl Drop for Pending<'_> {
        fn drop(&mut self) {
            if let Some(span) = self.0 {
                propagation::record_status(span, Code::Cancelled);
            }
        }
    }
    let mut pending = Pending(Some(span));
    let result = call.instrument(span.clone()).await;
    pending.0 = None;
    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    propagation::record_status(span, code);
    result.map(tonic::Response::into_inner).map_err(|s| classify(&s))
}

fn items(ask: &Ask) -> Vec<AllocationItem> {
    ask.items.iter().map(|&(pool, size_bytes)| AllocationItem { pool: pool.to_owned(), size_bytes }).collect()
}

/// Maps a memory-service status to a domain error. Transient conditions (no room, unreachable)
/// stay distinguishable so the executor can retry them before the first token.
pub(crate) fn classify(status: &Status) -> Error {
    let detail = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::ResourceExhausted | Code::Aborted => {
            Error::MemoryExhausted { detail, attempts: 1, waited: Duration::ZERO }
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Error::MemoryUnavailable(detail)
        }
        Code::FailedPrecondition | Code::NotFound => Error::Unservable(detail),
        // The runtime's own TTL or wait is outside what memory-service accepts.
        Code::InvalidArgument => Error::MemoryRefused(detail),
        _ => Error::MemoryProtocol(detail),
    }
}
