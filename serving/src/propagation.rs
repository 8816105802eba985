//! W3C trace context in gRPC metadata: extracted on the server side, injected on client calls.

use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads propagation headers from an HTTP/2 request.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes propagation headers into outgoing gRPC metadata.
struct Metadata<'a>(&'a mut MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(&value))
        {
            self.0.insert(key, value);
        }
    }
}

/// The caller's trace context, from `traceparent`/`tracestate` headers (empty if absent).
pub fn extract(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&Headers(headers)))
}

/// Writes `span`'s trace context into `metadata`, so the callee continues the trace.
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&cx, &mut Metadata(metadata)));
}

/// Records a gRPC status code on a client span (one declaring `rpc.grpc.status_code` and
/// `otel.status_code`): per the OpenTelemetry RPC conventions every non-OK code is a client error.
pub fn record_status(span: &Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

/// Records a gRPC status on a server span (declaring also `otel.status_message`). Per the
/// OpenTelemetry RPC conventions a server span is an error only for codes that say the server
/// failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS): a caller's
/// mistake (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED...) leaves its status unset, so error
/// rates in tracing backends count what the service got wrong. The status message goes with it.
pub fn record_server_status(span: &Span, code: tonic::Code, message: Option<&str>) {
    use tonic::Code;
    span.record("rpc.grpc.status_code", code as i64);
    let server_fault = matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    );
    if server_fault {
        span.record("otel.status_code", "ERROR");
        if let Some(message) = message {
            span.record("otel.status_message", message);
        }
    }
}
