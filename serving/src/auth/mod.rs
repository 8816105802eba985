//! Who is calling, and what they may do.
//!
//! A caller proves an identity with a bearer token (`authorization: Bearer <token>`, checked
//! against the SHA-256 hashes of a token file) or with a client certificate verified by mutual
//! TLS (its subject's common name is the identity). Each identity carries roles; each method
//! requires one of a set of roles ([`Policy`]). [`AuthLayer`] checks both before any handler runs
//! and hands the handler a [`Caller`] in the request's extensions, for ownership checks.
//!
//! With neither a token file nor client certificates configured the API is open: no [`Caller`]
//! is attached and every method is allowed, as for a local bare start.

mod layer;
pub use self::layer::{Auth, AuthFuture, Authenticator};
mod tokens;

use std::sync::Arc;

pub use self::{
    layer::AuthLayer,
    tokens::{TokenEntry, TokenFile, sha256_hex},
};

/// An authenticated caller, attached to each request's extensions when authentication is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity: a token entry's `identity`, or a client certificate's subject common name.
    pub identity: Arc<str>,
    /// Roles granted to it.
    pub roles: Arc<[Arc<str>]>,
}

impl Caller {
    /// Whether the caller holds `role`.
    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }

    /// The caller of `request`, if authentication is on.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Caller> {
        request.extensions().get::<Caller>().cloned()
    }
}

/// Which roles each method needs, by gRPC path (`/package.Service/Method`).
pub trait Policy: Send + Sync + std::fmt::Debug + 'static {
    /// Every role this service knows (a token file naming another role is refused at start-up,
    /// so a typo cannot silently grant nothing).
    fn roles(&self) -> &'static [&'static str];
    /// `None`: no credential needed (health). `Some(&[])`: any authenticated caller
    /// (reflection). `Some(roles)`: a caller holding one of `roles`.
    fn required(&self, path: &str) -> Option<&'static [&'static str]>;
}

/// The standard services every server carries: health is open (probes and load balancers speak
/// no credentials), reflection needs any valid credential.
pub fn standard_required(path: &str) -> Option<Option<&'static [&'static str]>> {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Some(None);
    }
    if path.starts_with("/grpc.reflection.") {
        return Some(Some(&[]));
    }
    None
}
