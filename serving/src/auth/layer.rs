//! The tower layer that authenticates every call and checks its method's roles.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::Status;
use tower::{Layer, Service};

use super::{Caller, Policy, TokenFile, standard_required};

/// How callers are authenticated. Built once at start-up.
#[derive(Debug)]
pub struct Authenticator {
    /// Swapped when the file changes on disk.
    tokens: Option<Arc<std::sync::RwLock<TokenFile>>>,
    /// Client certificates are verified by TLS (mutual TLS is on).
    client_certs: bool,
    policy: Box<dyn Policy>,
}

impl Authenticator {
    /// `None` if neither tokens nor client certificates are configured: the API is open.
    pub fn new(
        tokens: Option<Arc<std::sync::RwLock<TokenFile>>>,
        client_certs: bool,
        policy: Box<dyn Policy>,
    ) -> Option<Self> {
        (tokens.is_some() || client_certs).then_some(Authenticator { tokens, client_certs, policy })
    }

    /// The caller of a request with `headers` and `extensions`, or why it is refused.
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            let tokens = self.tokens.as_ref().ok_or_else(|| {
                Status::unauthenticated("this server takes no bearer tokens; present a client certificate")
            })?;
            let tokens = tokens.read().unwrap_or_else(|p| p.into_inner());
            return tokens
                .caller_for_token(token.trim())
                .ok_or_else(|| Status::unauthenticated("unknown bearer token"));
        }
        if self.client_certs
            && let Some(identity) = extensions.get::<crate::tls::PeerInfo>().and_then(|p| p.identity.clone())
        {
            return Ok(match &self.tokens {
                Some(tokens) => tokens
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .caller_for_identity(&identity)
                    .unwrap_or_else(|| Caller { identity: identity.clone(), roles: Arc::from([]) }),
                // Mutual TLS without a token file: the CA is the only gate, and a certificate it
                // signed may do everything.
                None => {
                    Caller { identity, roles: self.policy.roles().iter().map(|r| Arc::from(*r)).collect() }
                }
            });
        }
        Err(Status::unauthenticated(if self.client_certs {
            "credentials required: present a client certificate or `authorization: Bearer <token>`"
        } else {
            "credentials required: send `authorization: Bearer <token>`"
        }))
    }

    /// Admits or refuses a call to `path`; on success, the caller to attach.
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<Option<Caller>, Status> {
        let required = standard_required(path).unwrap_or_else(|| self.policy.required(path));
        let Some(roles) = required else { return Ok(None) };
        let caller = self.authenticate(headers, ext)?;
        if !roles.is_empty() && !roles.iter().any(|r| caller.has(r)) {
            return Err(Status::permission_denied(format!(
                "identity {:?} may not call {}: it needs one of the roles {}",
                crate::echo::echo(&caller.identity),
                crate::echo::echo(path),
                roles.join(", ")
            )));
        }
        Ok(Some(caller))
    }
}

/// Authenticates each call (see the module docs). Open when built from `None`.
#[derive(Debug, Clone)]
pub struct AuthLayer(Option<Arc<Authenticator>>);

impl AuthLayer {
    /// Enforces `auth`, or lets everything through for `None`.
    pub fn new(auth: Option<Authenticator>) -> Self {
        AuthLayer(auth.map(Arc::new))
    }

    /// Whether callers must authenticate.
    pub fn enforced(&self) -> bool {
        self.0.is_some()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, auth: self.0.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(auth) = &self.auth else { return AuthFuture::Inner { inner: self.inner.call(request) } };
        match auth.admit(request.uri().path(), request.headers(), request.extensions()) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                AuthFuture::Inner { inner: self.inner.call(request) }
            }
            Err(status) => {
                AuthFuture::Refused { response: Some(status.into_http()), _error: std::marker::PhantomData }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call, or a refusal answered at once.
    #[project = AuthFutureProj]
    #[allow(missing_docs)]
    pub enum AuthFuture<F, E> {
        Inner { #[pin] inner: F },
        Refused { response: Option<http::Response<tonic::body::Body>>, _error: std::marker::PhantomData<E> },
    }
}

impl<F, E> Future for AuthFuture<F, E>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Inner { inner } => inner.poll(cx),
            AuthFutureProj::Refused { response, .. } => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| Status::internal("polled twice").into_http()))),
        }
    }
}
