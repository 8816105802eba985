//! Whole-scope work in bounded slices: the ledger lock is taken for at most `SLICE` leases at a
//! time, so freeing or renewing a 100,000-lease scope never stalls other calls for long.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Shared, convert::Clock};
use crate::ledger::LeaseSet;

/// Leases handled per lock hold.
pub const SLICE: usize = 1024;

/// Frees every lease of `holder`'s scope `scope`; returns (leases, bytes) freed. Runs as its own
/// task, so a caller that leaves halfway does not leave the scope half freed.
pub(super) async fn free(shared: &Arc<Shared>, holder: &str, scope: &str) -> (u64, u64) {
    let ids = shared.ledger().scope_ids(holder, scope, Clock::now().instant());
    if ids.len() <= SLICE {
        let (count, bytes) = shared.ledger().free_ids(&ids, Clock::now().instant());
        return (count, u64::try_from(bytes).unwrap_or(u64::MAX));
    }
    let shared = shared.clone();
    let task = tokio::spawn(async move {
        let (mut count, mut bytes) = (0u64, 0u128);
        for slice in ids.chunks(SLICE) {
            let (c, b) = {
                let mut ledger = shared.ledger();
                let freed = ledger.free_ids(slice, Clock::now().instant());
                // Hand the lock to a waiting caller, if any, before the next slice.
                parking_lot::MutexGuard::unlock_fair(ledger);
                freed
            };
            count += c;
            bytes += b;
            tokio::task::yield_now().await;
        }
        (count, u64::try_from(bytes).unwrap_or(u64::MAX))
    });
    task.await.unwrap_or_default()
}

/// Renews every lease of `holder`'s scope `scope` not in `done`, slice by slice. Returns the
/// scope's live leases, how many this call renewed, and the latest new expiry.
pub(super) async fn renew(
    shared: &Shared,
    holder: &str,
    scope: &str,
    done: &mut LeaseSet,
) -> (u64, u64, Option<Instant>) {
    let ids = shared.ledger().scope_ids(holder, scope, Clock::now().instant());
    let (mut live, mut renewed, mut latest) = (0, 0, None);
    for slice in ids.chunks(SLICE) {
        let (l, r, at) = {
            let mut ledger = shared.ledger();
            let renewed = ledger.renew_ids(slice, Clock::now().instant(), done);
            // Hand the lock to a waiting caller, if any, before the next slice.
            parking_lot::MutexGuard::unlock_fair(ledger);
            renewed
        };
        live += l;
        renewed += r;
        latest = latest.max(at);
        if ids.len() > SLICE {
            tokio::task::yield_now().await;
        }
    }
    (live, renewed, latest)
}
