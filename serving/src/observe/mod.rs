//! A tower layer around every gRPC call: a server span that continues the caller's trace, and
//! request count and latency by method and status code.
//!
//! The gRPC status of a successful or streaming call travels in the HTTP/2 trailers, after the
//! response headers, so the call is finished when its body yields the trailers (or, for an error
//! answered at once, from the headers); a body dropped before that was cancelled by the client.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http_body::{Body, Frame};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

mod metrics;
mod undelivered;

use self::metrics::{MethodMetrics, Methods};
pub use self::{
    metrics::{GrpcMetrics, code_name, method_types},
    undelivered::Undelivered,
};
use crate::{propagation, telemetry};

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    methods: Arc<Methods>,
}

impl ObserveLayer {
    /// Observes calls into `metrics`; `types` gives each method's streaming kind
    /// ([`method_types`]).
    pub fn new(metrics: GrpcMetrics, types: HashMap<String, &'static str>) -> Self {
        // Every method's series exist from the start, at zero (as go-grpc-prometheus's
        // InitializeMetrics does): a rate over a series that appears with its first call misses it.
        let routed = types
            .iter()
            .map(|(path, kind)| {
                let (service, method) = path.split_once('/').unwrap_or((path, ""));
                (path.clone(), Arc::new(MethodMetrics::resolve(&metrics, kind, service, method)))
            })
            .collect();
        // Created on the first unroutable call, as before: its series exist only once one came.
        let unknown = std::sync::OnceLock::new();
        ObserveLayer { methods: Arc::new(Methods { routed, unknown, metrics }) }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, methods: self.methods.clone() }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    methods: Arc<Methods>,
}

/// One call in progress; finishing it records the span's status and the metrics. Dropped
/// unfinished, the client went away: recorded as CANCELLED, and its `Undelivered` fires.
#[derive(Debug)]
struct Call {
    span: Span,
    started: Instant,
    method: Arc<MethodMetrics>,
    code: Option<Code>,
    message: Option<String>,
    undelivered: Undelivered,
}

impl Call {
    fn finish(mut self, code: Code, message: Option<String>) {
        self.code = Some(code);
        self.message = message;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.code.is_none() {
            self.undelivered.fire();
        }
        let code = self.code.unwrap_or(Code::Cancelled);
        if !self.span.is_none() {
            propagation::record_server_status(&self.span, code, self.message.as_deref());
        }
        // `Code` values are 0..=16, the array's indexes.
        if let Some(handled) = self.method.handled.get(code as usize) {
            handled.inc();
        }
        self.method.latency.observe((Instant::now() - self.started).as_secs_f64());
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(value))
}

/// The status message, as sent (gRPC percent-encodes non-ASCII bytes).
fn message_in(headers: &http::HeaderMap) -> Option<String> {
    headers.get("grpc-message").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl<S, B, RB> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Body,
{
    type Response = http::Response<ObservedBody<RB>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let undelivered = Undelivered::default();
        request.extensions_mut().insert(undelivered.clone());
        let path = request.uri().path().trim_start_matches('/');
        // Paths come from clients: only routed methods name their series, or any client could
        // create series without bound.
        let metrics = self.methods.of(path);
        metrics.started.inc();
        let (service, method) = (metrics.service.as_str(), metrics.method.as_str());
        // Health probes and reflection are counted, not traced: a probe every few seconds per pod
        // would bury the traces worth reading. Other calls get a span when spans are exported,
        // or when the caller sent a trace context (so the logs carry its trace id and calls made
        // on its behalf continue its trace); otherwise nothing would read the span, and it would
        // cost a third of a loopback round trip.
        let traced = !service.starts_with("grpc.health.")
            && !service.starts_with("grpc.reflection.")
            && (telemetry::exporting() || request.headers().contains_key("traceparent"));
        let span = if !traced {
            Span::none()
        } else {
            tracing::info_span!(
            "grpc.server",
            otel.name = %path,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            )
        };
        if traced {
            // The caller's trace becomes the parent; without a `traceparent` the span starts a
            // trace.
            let _ = span.set_parent(propagation::extract(request.headers()));
            telemetry::record_trace_id(&span);
        }
        let call =
            Call { span, started: Instant::now(), method: metrics, code: None, message: None, undelivered };
        let future = {
            let _entered = call.span.enter();
            self.inner.call(request)
        };
        ObservedFuture { future, call: Some(call) }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Observe`]: runs the handler inside the call's span.
    pub struct ObservedFuture<F> {
        #[pin]
        future: F,
        call: Option<Call>,
    }
}

impl<F, RB, E> Future for ObservedFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<http::Response<ObservedBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            ready!(this.future.poll(cx))
        };
        let mut call = this.call.take();
        Poll::Ready(result.map(|response| {
            // An error answered at once ("trailers-only") carries its status in the headers.
            if let Some(code) = status_in(response.headers())
                && let Some(call) = call.take()
            {
                call.finish(code, message_in(response.headers()));
            }
            response.map(|inner| ObservedBody { inner, call })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call when the trailers carrying the status go by.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        // Entered while the body streams, so the span ends with the stream (tracing-opentelemetry
        // ends a span at its last exit).
        let frame = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            ready!(this.inner.poll_frame(cx))
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_in(trailers).unwrap_or(Code::Ok), message_in(trailers));
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Internal, None);
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Ok, None);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use prometheus::Registry;

    use super::*;

    /// A handler that arms an undo and answers OK with a one-frame body and OK trailers.
    #[derive(Clone)]
    struct Handler(Arc<AtomicBool>);

    impl Service<http::Request<()>> for Handler {
        type Response = http::Response<http_body_util_free::Once>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let undone = self.0.clone();
            let hook = request.extensions().get::<Undelivered>().expect("the layer adds one").clone();
            hook.on_undelivered(move || undone.store(true, Ordering::SeqCst));
            std::future::ready(Ok(http::Response::new(http_body_util_free::Once::default())))
        }
    }

    /// A body of one trailers frame carrying `grpc-status: 0`, without another dependency.
    mod http_body_util_free {
        use super::*;

        #[derive(Default)]
        pub struct Once(bool);

        impl Body for Once {
            type Data = std::io::Cursor<Vec<u8>>;
            type Error = std::convert::Infallible;

            fn poll_frame(
                mut self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
                if self.0 {
                    return Poll::Ready(None);
                }
                self.0 = true;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn observed(undone: &Arc<AtomicBool>) -> Observe<Handler> {
        let registry = Registry::new();
        let metrics = GrpcMetrics::register(&registry, "test").expect("metrics register");
        ObserveLayer::new(metrics, HashMap::new()).layer(Handler(undone.clone()))
    }

    #[tokio::test]
    async fn an_answer_never_sent_runs_the_handlers_undo_and_a_sent_one_does_not() {
        let undone = Arc::new(AtomicBool::new(false));
        let response = observed(&undone).call(http::Request::new(())).await.expect("answered");
        drop(response); // the client reset the stream before the status went out
        assert!(undone.load(Ordering::SeqCst), "the undo did not run");

        let delivered = Arc::new(AtomicBool::new(false));
        let response = observed(&delivered).call(http::Request::new(())).await.expect("answered");
        let mut body = Box::pin(response.into_body());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(_)) = body.as_mut().poll_frame(&mut cx) {}
        drop(body);
        assert!(!delivered.load(Ordering::SeqCst), "the undo ran after the status was sent");
    }
}
