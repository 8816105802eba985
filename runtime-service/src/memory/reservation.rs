//! A guard over memory held under one scope: it is freed on every path, explicitly on success
//! and from `Drop` on error, cancellation, deadline and shutdown.

use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use super::{
    Ask, Loader, Lost, MemoryClient, Renewer,
    budget::{Held, Use},
};
use crate::error::Error;

/// Attempts at freeing a scope from `Drop` before leaving it to lease expiry.
const FREE_ATTEMPTS: u32 = 3;

/// Memory leased under one scope (a generation's kv-cache and activations, or a model's
/// uniforms), renewed while held. Like text-generation-inference's `BlockAllocation`, it gives
/// the memory back when dropped; lease expiry is only the backstop for a crashed process.
#[derive(Debug)]
pub struct Reservation {
    client: MemoryClient,
    renewer: Renewer,
    tracker: TaskTracker,
    scope: String,
    /// Its lease ids, one per item asked.
    leases: Vec<String>,
    lost: Lost,
    released: bool,
    /// The device memory it occupies, given back with it.
    _device: Held,
}

impl Reservation {
    /// Allocates `ask` in one atomic call and starts renewing it. `ask.scope` must be unique to
    /// this attempt (see [`super::unique_scope`]): if the call is dropped, or fails in a way that
    /// leaves its outcome unknown (memory-service unreachable mid-call), the scope is freed in the
    /// background in case it was granted, and that free must not hit anyone else's leases.
    ///
    /// The device's own memory is taken first: nothing is asked of memory-service that the
    /// simulated device could not hold.
    pub async fn acquire(loader: &Loader, ask: &Ask) -> Result<Self, Error> {
        let (client, renewer, tracker) = (&loader.client, &loader.renewer, &loader.tracker);
        let uses: Vec<_> = ask.items.iter().map(|&(pool, bytes)| (Use::of_pool(pool), bytes)).collect();
        let device = loader.device_memory.take(&uses)?;
        let mut pending = PendingScope { client, tracker, scope: Some(&ask.scope) };
        // The leases live at least until the TTL from the moment the call was sent.
        let sent = tokio::time::Instant::now();
        let (epoch, leases) = match client.allocate(ask, &ask.scope).await {
            Ok(granted) => granted,
            // Definitive refusals: nothing was granted, nothing to free.
            Err(err @ (Error::MemoryExhausted { .. } | Error::Unservable(_) | Error::MemoryProtocol(_))) => {
                pending.scope = None;
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        pending.scope = None;
        let lost = renewer.register(ask.scope.clone(), epoch, sent);
        Ok(Reservation {
            client: client.clone(),
            renewer: renewer.clone(),
            tracker: tracker.clone(),
            scope: ask.scope.clone(),
            leases,
            lost,
            released: false,
            _device: device,
        })
    }

    /// Cancelled if the leases are lost (memory-service restarted or they expired).
    /// Its lease ids (what memory-service names when it asks for memory back).
    pub fn leases(&self) -> &[String] {
        &self.leases
    }

    pub fn lost(&self) -> &Lost {
        &self.lost
    }

    /// Frees the memory now and waits for memory-service to confirm, so that a caller told "done"
    /// can already see the memory back in the pools. On failure the free is retried in the
    /// background, like a drop.
    pub async fn release(mut self) {
        self.released = true;
        self.renewer.unregister(&self.scope);
        if let Err(err) = self.client.free_scope(&self.scope).await {
            debug!(scope = %self.scope, cause = %err, "free failed; retrying in the background");
            spawn_free(&self.tracker, self.client.clone(), self.scope.clone());
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.renewer.unregister(&self.scope);
        // Tracked, so shutdown waits for these frees before the process exits.
        spawn_free(&self.tracker, self.client.clone(), std::mem::take(&mut self.scope));
    }
}

/// Frees a scope whose Allocate was sent but whose outcome is unknown, unless disarmed.
struct PendingScope<'a> {
    client: &'a MemoryClient,
    tracker: &'a TaskTracker,
    scope: Option<&'a String>,
}

impl Drop for PendingScope<'_> {
    fn drop(&mut self) {
        if let Some(scope) = self.scope {
            spawn_free(self.tracker, self.client.clone(), scope.clone());
        }
    }
}

fn spawn_free(tracker: &TaskTracker, client: MemoryClient, scope: String) {
    // A `Drop` may run outside a runtime (e.g. at process teardown); then expiry is the backstop.
    if tokio::runtime::Handle::try_current().is_err() {
        warn!(%scope, "no runtime to free memory; its leases will expire");
        return;
    }
    // In the trace of whatever dropped the reservation, not a trace of its own.
    tracker.spawn(
        async move {
            for attempt in 1..=FREE_ATTEMPTS {
                match client.free_scope(&scope).await {
                    Ok(_) => return,
                    Err(err) if attempt == FREE_ATTEMPTS => {
                        warn!(%scope, cause = %err, "cannot free memory; its leases will expire");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100) * attempt).await,
                }
            }
        }
        .instrument(tracing::Span::current()),
    );
}
