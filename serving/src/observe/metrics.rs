//! The gRPC server series both services export, named and labelled as go-grpc-prometheus does,
//! resolved per method once so a call costs no label hashing.

use std::{collections::HashMap, sync::Arc};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tonic::Code;

/// gRPC server metrics shared by both services, named and labelled as go-grpc-prometheus does so
/// existing dashboards work: `grpc_type` is `unary`, `server_stream`, `client_stream` or
/// `bidi_stream`.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    started: IntCounterVec,
    handled: IntCounterVec,
    latency: HistogramVec,
}

impl GrpcMetrics {
    /// Registers `grpc_server_started_total`, `grpc_server_handled_total` and
    /// `grpc_server_handling_seconds` in `registry`, with the process metrics (`process_*`) and
    /// `build_info{service, version}` of `service`.
    pub fn register(registry: &Registry, service: &str) -> prometheus::Result<Self> {
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let build = prometheus::IntGaugeVec::new(
            Opts::new("build_info", "Constant 1, labelled with the service and its version."),
            &["service", "version"],
        )?;
        build.with_label_values(&[service, env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let started = IntCounterVec::new(
            Opts::new("grpc_server_started_total", "gRPC calls started, by method."),
            &["grpc_type", "grpc_service", "grpc_method"],
        )?;
        let handled = IntCounterVec::new(
            Opts::new("grpc_server_handled_total", "gRPC calls completed, by method and status code."),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("grpc_server_handling_seconds", "gRPC call duration, streams to their end.")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            &["grpc_type", "grpc_service", "grpc_method"],
        )?;
        registry.register(Box::new(started.clone()))?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(GrpcMetrics { started, handled, latency })
    }
}

/// The streaming kind of every method of `descriptor_sets`, by path (`pkg.Service/Method`).
pub fn method_types(descriptor_sets: &[&[u8]]) -> HashMap<String, &'static str> {
    use prost::Message;
    let mut types = HashMap::new();
    for set in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else { continue };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, false) => "client_stream",
                        (true, true) => "bidi_stream",
                    };
                    types.insert(format!("{}.{}/{}", file.package(), service.name(), method.name()), kind);
                }
            }
        }
    }
    types
}

/// Every routed method's series, resolved once: a call then costs no label hashing and no
/// allocation for its metrics.
#[derive(Debug)]
pub(super) struct Methods {
    pub(super) routed: HashMap<String, Arc<MethodMetrics>>,
    pub(super) unknown: std::sync::OnceLock<Arc<MethodMetrics>>,
    pub(super) metrics: GrpcMetrics,
}

impl Methods {
    pub(super) fn of(&self, path: &str) -> Arc<MethodMetrics> {
        match self.routed.get(path) {
            Some(method) => method.clone(),
            None => self
                .unknown
                .get_or_init(|| {
                    Arc::new(MethodMetrics::resolve(&self.metrics, "unknown", "unknown", "unknown"))
                })
                .clone(),
        }
    }
}

/// One method's series, and the names its spans carry.
#[derive(Debug)]
pub(super) struct MethodMetrics {
    pub(super) service: String,
    pub(super) method: String,
    pub(super) started: prometheus::IntCounter,
    pub(super) latency: prometheus::Histogram,
    /// By code, 0 (OK) to 16 (UNAUTHENTICATED).
    pub(super) handled: [prometheus::IntCounter; 17],
}

impl MethodMetrics {
    /// The series of one method (creating them at zero).
    pub(super) fn resolve(metrics: &GrpcMetrics, kind: &'static str, service: &str, method: &str) -> Self {
        MethodMetrics {
            service: service.to_owned(),
            method: method.to_owned(),
            started: metrics.started.with_label_values(&[kind, service, method]),
            latency: metrics.latency.with_label_values(&[kind, service, method]),
            handled: std::array::from_fn(|code| {
                let code = code_name(Code::from_i32(code as i32));
                metrics.handled.with_label_values(&[kind, service, method, code])
            }),
        }
    }
}

/// The canonical name of a code, as grpc-go and Prometheus exporters spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
