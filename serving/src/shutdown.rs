//! Process shutdown: the first SIGTERM or SIGINT starts a graceful drain.

use tracing::{info, warn};

/// Resolves when the process receives SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C). If a
/// handler cannot be installed, that signal is ignored with a warning instead of failing start-up:
/// the other one still works, and a hard kill always does.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => Some(term),
            Err(err) => {
                warn!(cause = %err, "cannot listen for SIGTERM");
                None
            }
        };
        let term = async {
            match term.as_mut() {
                Some(term) => {
                    term.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => info!("received SIGTERM, shutting down"),
            _ = ctrl_c() => info!("received SIGINT, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c().await;
        info!("received Ctrl-C, shutting down");
    }
}

async fn ctrl_c() {
    if let Err(err) = tokio::signal::ctrl_c().await {
        warn!(cause = %err, "cannot listen for SIGINT");
        std::future::pending::<()>().await;
    }
}
