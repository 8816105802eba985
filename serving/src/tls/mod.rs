//! TLS and mutual TLS for the gRPC servers, with certificates that rotate without a restart.
//!
//! rustls (the ring provider, which tonic's TLS support already builds) does the protocol. The
//! server's certificate, key and client CA are files, as a mounted Kubernetes Secret provides
//! them; a background task re-reads them when they change on disk and swaps the configuration
//! used for new connections (existing connections keep theirs). A broken update is logged and
//! the previous configuration stays in force. The client side ([`client`]) does the same for a
//! client certificate and CA.

pub mod client;

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpIncoming};
use tracing::debug;

/// The files of a server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle; set, clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// How often the files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Most TLS handshakes in progress at once; more connections wait for a slot.
const MAX_HANDSHAKES: usize = 256;

/// A server TLS configuration that follows its files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads `files`; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let config = build(&files)?;
        Ok(ServerTls { files, current: Arc::new(RwLock::new(config)) })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the files every `every` while they change, until `stop`.
    pub fn spawn_reload(&self, every: Duration, stop: CancellationToken) {
        let files = self.files.clone();
        let paths = [Some(files.cert.clone()), Some(files.key.clone()), files.client_ca.clone()];
        crate::reload::spawn(
            paths.into_iter().flatten().collect(),
            every,
            stop,
            Arc::downgrade(&self.current),
            move || build(&files),
        );
    }
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!("TLS certificate {} with key {}: {e}", files.cert.display(), files.key.display())
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("TLS certificate {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS certificate {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// What a handler can learn of the connection it came on (in the request's extensions).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's subject common name (mutual TLS only).
    pub identity: Option<Arc<str>>,
}

/// An accepted connection, in plaintext or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, handshake done.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(tcp) => PeerInfo { remote: tcp.peer_addr().ok(), identity: None },
            Conn::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let identity = session
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| common_name(cert))
                    .map(Arc::from);
                PeerInfo { remote: tcp.peer_addr().ok(), identity }
            }
        }
    }
}

/// The subject common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `tcp`: as they are without `tls`; with it, after a TLS handshake
/// bounded by `handshake_timeout` (a port with TLS serves no plaintext: a client that does not
/// complete a handshake never reaches gRPC). Handshakes run concurrently, so a slow client does
/// not hold up the accept loop. The stream ends when `tcp` does or at `stop`.
pub fn incoming(
    tcp: TcpIncoming,
    tls: Option<ServerTls>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) -> Pin<Box<dyn Stream<Item = Result<Conn, io::Error>> + Send>> {
    let Some(tls) = tls else { return Box::pin(tcp.map(|conn| conn.map(Conn::Plain))) };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let mut tcp = tcp;
        loop {
            let next = tokio::select! {
                next = tcp.next() => next,
                () = stop.cancelled() => return,
            };
            let Some(accepted) = next else { return };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(err) => {
                    debug!(error = %err, "accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(conn)))).await;
                    }
                    Ok(Err(err)) => debug!(?peer, error = %err, "TLS handshake failed"),
                    Err(_) => debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The connections of `listener` for a server with `tls` (if any) and `transport`'s limits;
/// with TLS, its files are followed every `reload` until `stop`.
pub fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    transport: &crate::transport::Transport,
    reload: Duration,
    stop: CancellationToken,
) -> Pin<Box<dyn Stream<Item = Result<Conn, io::Error>> + Send>> {
    if let Some(tls) = &tls {
        tls.spawn_reload(reload, stop.clone());
    }
    incoming(
        transport.incoming(listener),
        tls,
        Duration::from_millis(transport.tls_handshake_timeout_ms),
        stop,
    )
}
