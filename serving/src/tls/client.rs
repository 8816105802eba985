//! The client side: TLS (and mutual TLS) to a server, through a connector that reads the current
//! configuration at each new connection, so a rotated client certificate or CA is used from the
//! next connection on, without a restart.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{PrivateKeyDer, ServerName, pem::PemObject},
    },
};
use tokio_util::sync::CancellationToken;
use tower::Service;

/// The files of a client's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM certificate and key presented to the server (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A client TLS configuration that follows its files.
#[derive(Debug, Clone)]
pub struct ClientTls {
    current: Arc<RwLock<Arc<ClientConfig>>>,
}

impl ClientTls {
    /// Loads `files`, and re-reads them every `every` while they change until `stop` or until
    /// every clone of the result is dropped.
    pub fn load(files: ClientTlsFiles, every: Duration, stop: CancellationToken) -> Result<Self, String> {
        let current = Arc::new(RwLock::new(build(&files)?));
        let mut paths = vec![files.ca.clone()];
        if let Some((cert, key)) = &files.identity {
            paths.extend([cert.clone(), key.clone()]);
        }
        crate::reload::spawn(paths, every, stop, Arc::downgrade(&current), move || build(&files));
        Ok(ClientTls { current })
    }

    /// A connector for tonic (`Endpoint::connect_with_connector_lazy`) that opens TCP to the
    /// URI's authority and does a TLS handshake verifying `server_name`.
    pub fn connector(&self, server_name: ServerName<'static>) -> TlsConnect {
        TlsConnect { tls: self.clone(), server_name }
    }

    fn config(&self) -> Arc<ClientConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn build(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in super::read_certs(&files.ca)? {
        roots.add(cert).map_err(|e| format!("TLS CA {}: {e}", files.ca.display()))?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some((cert, key)) => {
            let certs = super::read_certs(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("TLS client certificate {}: {e}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// See [`ClientTls::connector`].
#[derive(Debug, Clone)]
pub struct TlsConnect {
    tls: ClientTls,
    server_name: ServerName<'static>,
}

impl Service<http::Uri> for TlsConnect {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = TlsConnector::from(self.tls.config());
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the address"))?;
            let port = uri.port_u16().unwrap_or(443);
            // IPv6 literals come bracketed in URIs.
            let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(connector.connect(server_name, tcp).await?))
        })
    }
}
