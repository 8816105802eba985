//! The admin HTTP port: Prometheus text at `/metrics`, and `/livez` and `/readyz` for probes
//! that cannot speak TLS or present a token (Kubernetes' native gRPC probes speak neither).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Renders metrics computed at scrape time (snapshots of live state), in Prometheus text format.
pub type Snapshot = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves: the registry's metrics followed
/// by `snapshot`'s.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    snapshot: Snapshot,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = move || {
        let (registry, snapshot) = (registry.clone(), snapshot.clone());
        async move {
            let mut body = Vec::new();
            // Encoding into a Vec cannot fail for well-formed metrics; an error leaves what was
            // written, which a scraper reports as a parse error rather than silently.
            let _ = TextEncoder::new().encode(&registry.gather(), &mut body);
            body.extend_from_slice(snapshot().as_bytes());
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
        }
    };
    // Readiness is the gRPC health of the server as a whole: 200 SERVING, else 503.
    let readyz = move || {
        let serving = ready.load(Ordering::Relaxed);
        async move {
            if serving {
                (axum::http::StatusCode::OK, "SERVING\n")
            } else {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .route("/livez", get(|| async { "OK\n" }));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Serves `/metrics` on `admin` (if given) in the background until `stop` is cancelled.
pub fn spawn(
    admin: Option<TcpListener>,
    registry: &Registry,
    snapshot: Snapshot,
    health: &crate::grpc::Health,
    stop: &tokio_util::sync::CancellationToken,
) {
    let Some(admin) = admin else { return };
    let addr = admin.local_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    tokio::spawn(serve(admin, registry.clone(), snapshot, health.ready(), stop.clone().cancelled_owned()));
    tracing::info!(%addr, probes = "/livez /readyz", "metrics on /metrics");
}

/// Parses an admin listen address: `host:port`, or `off` (or empty) for no admin port.
pub fn parse_listen(value: &str) -> Result<Option<std::net::SocketAddr>, String> {
    match value.trim() {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|e| format!("admin address {addr:?}: {e}")),
    }
}

/// Appends one metric family in Prometheus text format: `# HELP`, `# TYPE`, then one line per
/// `(labels, value)` sample. `labels` is the text inside the braces, e.g. `pool="kv-cache"`.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}
