//! Process shutdown: the first SIGTERM or SIGINT starts a graceful drain.

use tracing::{info, warn};

/// Resolves when the process receives SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C). The
/// handlers are installed by this call, not when the future is first polled: a SIGTERM that
/// arrives between the listener's bind and the first poll of the serve loop must drain, not kill
/// the process with the default action (a test that stops a service right after its first calls
/// saw that). If a handler cannot be installed, that signal is ignored with a warning instead of
/// failing start-up: the other one still works, and a hard kill always does. Call it inside a
/// tokio runtime.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(err) => {
                warn!(cause = %err, "cannot listen for {name}");
                None
            }
        };
        let (mut term, mut int) =
            (install(SignalKind::terminate(), "SIGTERM"), install(SignalKind::interrupt(), "SIGINT"));
        async move {
            tokio::select! {
                () = received(term.as_mut()) => info!("received SIGTERM, shutting down"),
                () = received(int.as_mut()) => info!("received SIGINT, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            ctrl_c().await;
            info!("received Ctrl-C, shutting down");
        }
    }
}

/// Resolves on the next signal `stream` delivers; never, when its handler could not be installed.
#[cfg(unix)]
async fn received(stream: Option<&mut tokio::signal::unix::Signal>) {
    match stream {
        Some(stream) => {
            stream.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn ctrl_c() {
    if let Err(err) = tokio::signal::ctrl_c().await {
        warn!(cause = %err, "cannot listen for SIGINT");
        std::future::pending::<()>().await;
    }
}
