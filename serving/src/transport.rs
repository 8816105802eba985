//! Transport limits of every gRPC server here: HTTP/2 streams, resets, keepalive, header and
//! message sizes. hyper and tonic leave several of these unbounded by default (no keepalive, no
//! limit on streams per connection, reset-flood protection off); a server on a network sets all.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use serde::Deserialize;
use tonic::transport::{Server, server::TcpIncoming};
use tower::{Layer, Service};

/// Transport settings; the `[transport]` table of either service's TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Transport {
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Largest request message, in bytes; larger is RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Largest header list (metadata) a client may send, in bytes.
    pub max_header_list_bytes: u32,
    /// Streams a client may make the server reset (protocol errors) before it is sent GOAWAY:
    /// the guard against reset floods (CVE-2023-44487's family).
    pub max_local_error_reset_streams: usize,
    /// Streams reset by the client that are still being accepted, before GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// HTTP/2 PING interval on idle connections, in milliseconds; a peer that does not answer
    /// within `http2_keepalive_timeout_ms` is dropped, and its streams end.
    pub http2_keepalive_interval_ms: u64,
    /// How long a PING may go unanswered, in milliseconds.
    pub http2_keepalive_timeout_ms: u64,
    /// TCP keepalive idle time on accepted sockets, in milliseconds (catches peers whose host
    /// vanished without a FIN even when HTTP/2 is idle).
    pub tcp_keepalive_ms: u64,
    /// Longest TLS handshake, in milliseconds.
    pub tls_handshake_timeout_ms: u64,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            max_concurrent_streams: 1024,
            max_message_bytes: 4 << 20,
            max_header_list_bytes: 16 << 10,
            max_local_error_reset_streams: 1024,
            max_pending_accept_reset_streams: 20,
            http2_keepalive_interval_ms: 10_000,
            http2_keepalive_timeout_ms: 5_000,
            tcp_keepalive_ms: 30_000,
            tls_handshake_timeout_ms: 10_000,
        }
    }
}

impl Transport {
    /// Checks every value; the first problem is reported.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, u64, u64, u64); 9] = [
            ("max_concurrent_streams", self.max_concurrent_streams.into(), 1, 1 << 20),
            ("max_message_bytes", self.max_message_bytes as u64, 1024, 1 << 30),
            ("max_header_list_bytes", self.max_header_list_bytes.into(), 1024, 1 << 24),
            ("max_local_error_reset_streams", self.max_local_error_reset_streams as u64, 1, 1 << 20),
            ("max_pending_accept_reset_streams", self.max_pending_accept_reset_streams as u64, 1, 1 << 20),
            ("http2_keepalive_interval_ms", self.http2_keepalive_interval_ms, 100, 3_600_000),
            ("http2_keepalive_timeout_ms", self.http2_keepalive_timeout_ms, 100, 3_600_000),
            ("tcp_keepalive_ms", self.tcp_keepalive_ms, 1000, 3_600_000),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms, 100, 600_000),
        ];
        for (name, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(format!("transport.{name} = {value} must be between {min} and {max}"));
            }
        }
        Ok(())
    }

    /// A server builder with these limits.
    pub fn server(&self) -> Server {
        let ms = Duration::from_millis;
        Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(self.max_header_list_bytes)
            .http2_max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_reset_streams))
            .http2_keepalive_interval(Some(ms(self.http2_keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(ms(self.http2_keepalive_timeout_ms)))
    }

    /// Accepted sockets with TCP_NODELAY (without it Nagle's algorithm and delayed ACKs add
    /// ~40 ms to small unary replies) and TCP keepalive.
    pub fn incoming(&self, listener: tokio::net::TcpListener) -> TcpIncoming {
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_millis(self.tcp_keepalive_ms)))
    }
}

/// The message tonic gives a request over `max_decoding_message_size`.
const OVERSIZE: &str = "Error, decoded message length too large";

/// Answers an over-size request RESOURCE_EXHAUSTED, as gRPC's status table says for a message
/// over the receiver's limit; tonic answers OUT_OF_RANGE.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Oversize<S> {
        Oversize(inner)
    }
}

/// See [`OversizeLayer`].
#[derive(Debug, Clone)]
pub struct Oversize<S>(S);

impl<S, B, RB> Service<http::Request<B>> for Oversize<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OversizeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        OversizeFuture { inner: self.0.call(request) }
    }
}

pin_project_lite::pin_project! {
    /// See [`OversizeLayer`].
    pub struct OversizeFuture<F> { #[pin] inner: F }
}

impl<F, RB, E> Future for OversizeFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut result = std::task::ready!(self.project().inner.poll(cx));
        if let Ok(response) = &mut result {
            let headers = response.headers_mut();
            let oversize = headers.get("grpc-status").is_some_and(|v| v == "11")
                && headers.get("grpc-message").and_then(|v| v.to_str().ok()).is_some_and(|m| {
                    m.starts_with(OVERSIZE)
                        || m.starts_with("Error,%20decoded%20message%20length%20too%20large")
                });
            if oversize {
                headers.insert("grpc-status", http::HeaderValue::from_static("8"));
            }
        }
        Poll::Ready(result)
    }
}
