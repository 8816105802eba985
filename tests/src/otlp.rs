//! An OTLP trace collector in the test process, and services started to export to it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::Span,
};
use tonic::{Request, Response, Status};

use crate::{TestServer, process::Process};

/// Spans received, with the service that sent them.
pub type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// The TraceService that keeps what it is sent.
#[derive(Debug, Default)]
struct Receiver(Received);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = self.0.lock().map_err(|_| Status::internal("receiver poisoned"))?;
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(string)
                .unwrap_or_default();
            // Every exporting process says which version it is and which instance.
            let resource: Vec<&str> = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| kv.key.as_str())
                .collect();
            for key in ["service.version", "service.instance.id"] {
                if !resource.contains(&key) {
                    return Err(Status::invalid_argument(format!("{service}: resource has no {key}")));
                }
            }
            for scope in resource_spans.scope_spans {
                received.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

pub fn string(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(string)
}

/// Starts `name` exporting traces to `otlp` (and nowhere else: an ambient OTEL_* variable must
/// not redirect or mute it), with the serving glue's logs filtered out: tracing must not depend on
/// the log filter.
pub fn start(name: &str, args: &[&str], otlp: SocketAddr) -> Process {
    let endpoint = format!("http://{otlp}");
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ("OTEL_TRACES_SAMPLER", ""),
        ("OTEL_TRACES_SAMPLER_ARG", ""),
        ("OTEL_SERVICE_NAME", ""),
        ("OTEL_RESOURCE_ATTRIBUTES", ""),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "warn,memory_service=info,runtime_service=info"),
    ];
    Process::start(name, args, &env, false)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/gRPC trace receiver on a loopback port, keeping every span it is sent.
#[derive(Debug)]
pub struct Collector;

impl Collector {
    /// Starts one; stop it with `TestServer::stop`.
    pub async fn start() -> (TestServer, Received) {
        let received = Received::default();
        let sink = received.clone();
        let server = TestServer::spawn("127.0.0.1:0".parse().expect("addr"), |listener, _admin, stopped| {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(sink)))
                .serve_with_incoming_shutdown(
                    serving::transport::Transport::default().incoming(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
        })
        .await;
        (server, received)
    }
}
