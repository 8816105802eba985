//! The shape both binaries' `main` shares: flags → telemetry → validated config → bound
//! listeners → serve until SIGTERM/SIGINT → flush traces, with the exit codes operators rely on
//! (64 for any configuration mistake, before a port is bound; 1 for a failure to bind or serve).

use std::{fmt::Display, future::Future, net::SocketAddr, pin::Pin, process::ExitCode};

use tokio::net::TcpListener;

use crate::telemetry::{self, LogFormat};

/// Parses the process's flags. `Err` carries the exit code: 64 for a usage or value error, 0
/// for `--help` and `--version` (whose text clap has printed).
pub fn parse_args<A: clap::Parser>() -> Result<A, ExitCode> {
    A::try_parse().map_err(|err| {
        let _ = err.print();
        if err.use_stderr() { ExitCode::from(crate::EXIT_CONFIG as u8) } else { ExitCode::SUCCESS }
    })
}

/// The flags every service has, with its environment prefix and default ports: the gRPC and
/// admin addresses and the log format. `$name::launch(service)` turns them into a [`Launch`].
#[macro_export]
macro_rules! launch_args {
    ($name:ident, $prefix:literal, $listen:literal, $admin:literal) => {
        /// Where the service listens and how it logs.
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            /// Address to serve gRPC on.
            #[arg(long, env = concat!($prefix, "LISTEN"), default_value = $listen)]
            pub listen: std::net::SocketAddr,
            /// Address of the admin HTTP port (Prometheus metrics at /metrics), or "off".
            #[arg(long, env = concat!($prefix, "ADMIN_LISTEN"), default_value = $admin)]
            pub admin_listen: String,
            /// Log format: "text" (human-readable) or "json" (one object per line).
            #[arg(long, env = "LOG_FORMAT", default_value = "text")]
            pub log_format: $crate::telemetry::LogFormat,
        }

        impl $name {
            /// What [`$crate::launch::launch`] needs to start `service`.
            pub fn launch(&self, service: &'static str) -> $crate::launch::Launch {
                $crate::launch::Launch {
                    service,
                    listen: self.listen,
                    admin_listen: self.admin_listen.clone(),
                    log_format: self.log_format,
                }
            }
        }
    };
}

/// A `--print-*` flag: prints `render` of the validated configuration on stdout and exits 0,
/// or the configuration's error on stderr and exits 64, without binding anything.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the output is the point
pub fn print_config<C>(config: Result<C, String>, render: impl FnOnce(&C) -> String) -> ExitCode {
    match config {
        Ok(config) => {
            println!("{}", render(&config));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            ExitCode::from(crate::EXIT_CONFIG as u8)
        }
    }
}

/// What every service's command line has in common.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Service name (logs, default OpenTelemetry service name).
    pub service: &'static str,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Admin (metrics) address, or `off`.
    pub admin_listen: String,
    /// Log format.
    pub log_format: LogFormat,
}

/// The shutdown signal handed to a server.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a service binary: installs telemetry, validates the configuration built by `config`
/// before binding anything, binds, serves with `run` until SIGTERM or SIGINT, and flushes traces.
pub async fn launch<C, Fut, E>(
    launch: Launch,
    config: impl FnOnce() -> Result<C, String>,
    run: impl FnOnce(TcpListener, Option<TcpListener>, C, Shutdown) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let telemetry = telemetry::init(launch.service, "info", launch.log_format);
    let code = async {
        // Validate everything before binding: a bad config must not briefly hold the port.
        let checked =
            crate::admin::parse_listen(&launch.admin_listen).and_then(|admin| Ok((admin, config()?)));
        let (admin, config) = match checked {
            Ok(checked) => checked,
            Err(message) => {
                tracing::error!(%message, "bad configuration, not starting");
                return ExitCode::from(crate::EXIT_CONFIG as u8);
            }
        };
        let (listener, admin) = match crate::grpc::bind(launch.listen, admin).await {
            Ok(bound) => bound,
            Err(message) => {
                tracing::error!(%message, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        match run(listener, admin, config, Box::pin(crate::shutdown::signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(cause = %err, service = launch.service, "failed");
                ExitCode::FAILURE
            }
        }
    }
    .await;
    // Spans of the last calls are exported before the process exits.
    telemetry.shutdown().await;
    code
}
