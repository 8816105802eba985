//! Logs and traces for both services: one `tracing` subscriber feeding a human or JSON log on
//! stderr and an OpenTelemetry layer, exported over OTLP/gRPC when the standard `OTEL_*`
//! variables name an endpoint.

use std::io::IsTerminal;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is not \"text\" or \"json\"")),
        }
    }
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Set once an exporter is installed: spans are then worth their cost on every call.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured and its exporter built).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether work done now should get spans of its own: when spans are exported, or inside a span
/// (a call that arrived with a `traceparent`, whose trace id the logs carry). Otherwise nothing
/// exports or reads them, and building them would cost a third of a loopback round trip.
pub fn traced() -> bool {
    exporting() || !Span::current().is_none()
}

/// Whether the environment names an OTLP endpoint for traces.
fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

/// A process-unique instance id: the pid and the start time, hashed to 64 bits.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // RandomState is seeded randomly per process: mixing it in keeps ids apart across hosts too.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(nanos.as_nanos());
    format!("{:016x}", hasher.finish())
}

/// Installs the global subscriber and tracer provider. The log filter comes from `RUST_LOG`, else
/// `default_filter`. `service_name` applies unless `OTEL_SERVICE_NAME` is set;
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER`/`_ARG` are honoured by the SDK.
///
/// Spans always get W3C trace ids (so logs can carry them), but with no OTLP endpoint configured
/// no exporter is installed: nothing is sent, nothing is retried at exit, nothing is delayed.
/// Calling it twice keeps the first subscriber (tests may call it freely).
pub fn init(service_name: &str, default_filter: &str, format: LogFormat) -> Telemetry {
    let mut resource = Resource::builder();
    // Precedence per the spec: OTEL_SERVICE_NAME, then service.name in OTEL_RESOURCE_ATTRIBUTES
    // (both read by the SDK's detectors), then this default.
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attrs| attrs.contains("service.name="));
    if !named_by_env {
        resource = resource.with_service_name(service_name.to_owned());
    }
    // The version that produced a span, and which process: two replicas of a service, or one
    // before and after a restart, are told apart (unless OTEL_RESOURCE_ATTRIBUTES says otherwise).
    let set_by_env =
        |key: &str| std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains(&format!("{key}=")));
    if !set_by_env("service.version") {
        resource = resource
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    if !set_by_env("service.instance.id") {
        resource =
            resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id()));
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    let mut export_error = None;
    if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                provider = provider.with_batch_exporter(exporter);
                EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(err) => export_error = Some(err.to_string()),
        }
    }
    let provider = provider.build();
    // The default propagator injects nothing: W3C trace context must be chosen explicitly.
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // The request spans (and their trace ids) stay visible to the log layer whatever `RUST_LOG`
    // says, so every line logged while serving a request carries the request's trace id. The
    // module emits no events of its own.
    let filter = match "serving::observe=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // The exporter's own gRPC client must not be traced, or every export creates spans to export.
    let otel_filter = Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
        .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_sdk", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_otlp", tracing::level_filters::LevelFilter::OFF);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name.to_owned()))
        .with_filter(otel_filter);
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            // Colour codes only for people: piped logs stay greppable.
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(true)
            .event_format(crate::json_logs::TraceJson(
                fmt::format().json().with_current_span(true).with_span_list(true),
            ))
            .boxed(),
    };
    // `RUST_LOG` filters the log lines only: turning logs down must not switch tracing off (no
    // server spans would mean no propagation and no trace ids).
    let installed =
        tracing_subscriber::registry().with(logs.with_filter(filter)).with(otel).try_init().is_ok();
    if installed && let Some(err) = export_error {
        tracing::warn!(cause = %err, "cannot build the OTLP exporter; traces will not be exported");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Flushes and stops the tracer provider, for at most 5 s: an unreachable collector must not
    /// hold the process past Kubernetes' termination grace period. The SDK's flush blocks, so it
    /// runs on a blocking thread rather than stalling the async runtime.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(cause = %err, "could not deliver every span at shutdown");
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(5), flush).await.is_err() {
            tracing::warn!("trace export did not finish within 5 s at shutdown; the rest is dropped");
        }
    }
}

/// Records the OpenTelemetry trace id of `span` in its `trace_id` field (declared `Empty` at
/// creation), so every log line emitted inside the span carries it.
pub fn record_trace_id(span: &Span) {
    use opentelemetry::trace::TraceContextExt;
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}
