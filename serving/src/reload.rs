//! Following files on disk (certificates, token files): a change (a Secret update) rebuilds what
//! is built from them, used from then on; a broken update is logged and the previous one stays
//! in force.

use std::{
    path::PathBuf,
    sync::{RwLock, Weak},
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Modification time and length of each file: what changes when a Secret is updated (its files
/// are symlinks swapped atomically; metadata follows them).
fn stamps(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Checks `paths` every `every`; when they change, stores `build()`'s result in `target`. Ends at
/// `stop`, or when `target` is gone (its owner dropped it).
pub(crate) fn spawn<T: Send + Sync + 'static>(
    paths: Vec<PathBuf>,
    every: Duration,
    stop: CancellationToken,
    target: Weak<RwLock<T>>,
    build: impl Fn() -> Result<T, String> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut seen = stamps(&paths);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            let Some(target) = target.upgrade() else { return };
            let now = stamps(&paths);
            if now == seen {
                continue;
            }
            match build() {
                Ok(config) => {
                    *target.write().unwrap_or_else(|p| p.into_inner()) = config;
                    seen = now;
                    info!(files = ?paths, "reloaded after a change on disk");
                }
                // Half-written files (a Secret update in flight) fail here; the next check
                // retries, and the previous configuration serves meanwhile.
                Err(err) => {
                    warn!(error = %err, "files changed but cannot be loaded; keeping the previous ones")
                }
            }
        }
    });
}
