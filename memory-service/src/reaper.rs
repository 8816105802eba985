//! The expiry driver: sleeps until the earliest lease deadline, then reclaims everything due.

use std::sync::Arc;

use tokio::time::{Instant, sleep_until};

use crate::service::Shared;

/// Runs until shutdown. It sleeps on the next deadline, not a fixed tick, so expiry is exact to
/// the timer's resolution and costs nothing while no lease is due; the ledger wakes it when a new
/// deadline becomes the earliest. Reclamation between wake-ups also happens lazily in every ledger
/// call, so a late reaper never lets a dead lease be renewed or its bytes stay taken.
pub(crate) async fn run(shared: Arc<Shared>) {
    let wake = shared.ledger().reaper_notify();
    loop {
        let next = shared.ledger().next_deadline();
        tokio::select! {
            () = shared.shutdown().cancelled() => return,
            () = wake.notified() => continue,
            () = sleep_or_forever(next) => {
                let expired = shared.ledger().reap(Instant::now());
                if expired > 0 {
                    tracing::debug!(expired, "reclaimed expired leases");
                    shared.durability().nudge();
                }
            }
        }
    }
}

async fn sleep_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
