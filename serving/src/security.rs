//! A server's security settings (TLS, tokens, transport limits) from flags, environment and
//! file, turned into what `grpc::base` and `tls::incoming` take.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use tracing::{info, warn};

use crate::{
    auth::{AuthLayer, Authenticator, Policy, TokenFile},
    config::ConfigError,
    tls::{ServerTls, TlsFiles},
    transport::Transport,
};

/// Security settings of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// Certificate and key (TLS), and client CA (mutual TLS).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are checked for changes.
    pub tls_reload: std::time::Duration,
    /// Token file (identities, roles, token hashes).
    pub auth_tokens: Option<PathBuf>,
    /// Transport limits.
    pub transport: Transport,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            tls: None,
            tls_reload: crate::tls::RELOAD_INTERVAL,
            auth_tokens: None,
            transport: Transport::default(),
        }
    }
}

/// What a server runs with, files loaded.
#[derive(Debug)]
pub struct Prepared {
    /// TLS for the gRPC port, if on.
    pub tls: Option<ServerTls>,
    /// Authentication of every call (open if nothing is configured).
    pub auth: AuthLayer,
}

impl Security {
    /// Sets TLS and the token file from flag values, keeping the rest (transport limits from a
    /// file, the reload interval): TLS needs both a certificate and a key, and a client CA needs
    /// TLS.
    pub fn apply_flags(
        &mut self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
        auth_tokens: Option<PathBuf>,
    ) -> Result<(), String> {
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca }),
            (None, None) if client_ca.is_some() => {
                return Err("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)".into());
            }
            (None, None) => None,
            _ => return Err("--tls-cert and --tls-key go together".into()),
        };
        self.tls = tls;
        self.auth_tokens = auth_tokens;
        Ok(())
    }

    /// Loads the files and says plainly how the API is protected. `service` names the server in
    /// the log; `policy` gives its roles and what each method needs.
    pub fn prepare(&self, service: &str, policy: Box<dyn Policy>) -> Result<Prepared, ConfigError> {
        self.transport.validate().map_err(ConfigError::Invalid)?;
        let tls = self.tls.clone().map(ServerTls::load).transpose().map_err(ConfigError::Invalid)?;
        let roles = policy.roles();
        let tokens = match &self.auth_tokens {
            Some(path) => {
                let tokens = Arc::new(RwLock::new(TokenFile::load(path, roles)?));
                // Followed on disk like the certificates: a token added or revoked in the Secret
                // takes effect within the reload interval, without a restart.
                let file = path.clone();
                crate::reload::spawn(
                    vec![path.clone()],
                    self.tls_reload,
                    tokio_util::sync::CancellationToken::new(),
                    Arc::downgrade(&tokens),
                    move || TokenFile::load(&file, roles).map_err(|e| e.to_string()),
                );
                Some(tokens)
            }
            None => None,
        };
        let mutual = tls.as_ref().is_some_and(ServerTls::mutual);
        let auth = AuthLayer::new(Authenticator::new(tokens, mutual, policy));
        match (&tls, auth.enforced()) {
            (None, false) => warn!(
                service,
                "the API is OPEN: no TLS and no authentication; anyone who can reach the port can use every method. \
                 Fine on loopback; see docs/operations.md, \"Securing a deployment\", before exposing it"
            ),
            (Some(_), false) => warn!(
                service,
                "TLS is on but the API is open to any client: set --auth-tokens or --tls-client-ca"
            ),
            (None, true) => {
                warn!(service, "tokens are checked but travel in plaintext: set --tls-cert and --tls-key")
            }
            (Some(_), true) => info!(service, mutual, "TLS on, every call authenticated"),
        }
        Ok(Prepared { tls, auth })
    }
}

/// Declares a clap `Args` struct with the security flags of a service, their environment
/// variables prefixed with `$prefix` (`MEMORY_`, `RUNTIME_`).
#[macro_export]
macro_rules! security_args {
    ($name:ident, $prefix:literal) => {
        /// TLS and authentication of the gRPC port.
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            /// PEM certificate chain for the gRPC port: turns TLS on (with --tls-key). Files
            /// changed on disk are picked up within seconds, without a restart.
            #[arg(long, env = concat!($prefix, "TLS_CERT"))]
            pub tls_cert: Option<std::path::PathBuf>,
            /// PEM private key of --tls-cert.
            #[arg(long, env = concat!($prefix, "TLS_KEY"))]
            pub tls_key: Option<std::path::PathBuf>,
            /// PEM CA bundle: clients must present a certificate it signed (mutual TLS); the
            /// certificate's subject common name is the caller's identity.
            #[arg(long, env = concat!($prefix, "TLS_CLIENT_CA"))]
            pub tls_client_ca: Option<std::path::PathBuf>,
            /// TOML file of `[[token]]` entries (identity, roles, token_sha256): every call must
            /// then present `authorization: Bearer <token>` or a client certificate.
            #[arg(long, env = concat!($prefix, "AUTH_TOKENS"))]
            pub auth_tokens: Option<std::path::PathBuf>,
        }

        impl $name {
            /// Sets what these flags say on `security`, keeping the rest.
            pub fn apply(&self, security: &mut $crate::security::Security) -> Result<(), String> {
                security.apply_flags(
                    self.tls_cert.clone(),
                    self.tls_key.clone(),
                    self.tls_client_ca.clone(),
                    self.auth_tokens.clone(),
                )
            }
        }
    };
}
