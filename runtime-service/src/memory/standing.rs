//! A standing lease: memory a runtime holds for as long as it serves (a model's weights, the
//! device's activation buffers), taken once, renewed by the keep-alive stream, taken again if
//! memory-service loses it, and returned at shutdown.

use std::{sync::Mutex, time::Duration};

use tokio_util::task::TaskTracker;

use super::{Ask, DeviceMemory, Lost, MemoryClient, Renewer, Reservation, unique_scope};
use crate::error::Error;

/// What taking a standing lease needs from the rest of the service.
#[derive(Debug, Clone)]
pub struct Loader {
    /// memory-service.
    pub client: MemoryClient,
    /// Renews the lease while held.
    pub renewer: Renewer,
    /// Tracks background frees.
    pub tracker: TaskTracker,
    /// Lease TTL.
    pub ttl: Duration,
    /// Server-side wait for room.
    pub max_wait: Duration,
    /// This instance's name (scopes are per instance).
    pub instance: String,
    /// The simulated device's own memory, taken before memory-service's.
    pub device_memory: DeviceMemory,
}

/// One standing lease of `bytes` in `pool`.
#[derive(Debug)]
pub struct Standing {
    pool: &'static str,
    bytes: u64,
    /// Scope kind and name: `<instance>/<kind>/<name>/<boot>-<nonce>`.
    kind: &'static str,
    name: String,
    /// A tokio mutex so concurrent first users share one Allocate.
    held: tokio::sync::Mutex<Option<Reservation>>,
    /// A copy of the held reservation's lost signal, readable without awaiting.
    lost: Mutex<Option<Lost>>,
}

impl Standing {
    /// A lease not yet taken.
    pub fn new(pool: &'static str, bytes: u64, kind: &'static str, name: &str) -> Self {
        Standing {
            pool,
            bytes,
            kind,
            name: name.to_owned(),
            held: tokio::sync::Mutex::new(None),
            lost: Mutex::new(None),
        }
    }

    /// Bytes it holds when taken.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether it is held and alive.
    pub fn is_held(&self) -> bool {
        self.lost_signal().is_some_and(|lost| !lost.is_cancelled())
    }

    /// The held lease's lost signal, if held.
    pub fn lost_signal(&self) -> Option<Lost> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the lease if it is not held (or was lost).
    pub async fn ensure(&self, loader: &Loader) -> Result<(), Error> {
        if self.is_held() {
            return Ok(());
        }
        let mut held = self.held.lock().await;
        if let Some(reservation) = held.as_ref()
            && !reservation.lost().is_cancelled()
        {
            return Ok(()); // taken by a concurrent caller while we waited
        }
        // A lost reservation may still hold some leases (only some expired): free them first.
        if let Some(old) = held.take() {
            old.release().await;
        }
        let ask = Ask {
            items: vec![(self.pool, self.bytes)],
            scope: unique_scope(&loader.instance, self.kind, &self.name),
            ttl: loader.ttl,
            max_wait: loader.max_wait,
        };
        let reservation = Reservation::acquire(loader, &ask).await?;
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reservation.lost().clone());
        *held = Some(reservation);
        tracing::info!(pool = self.pool, kind = self.kind, name = %self.name, bytes = self.bytes, "memory taken");
        Ok(())
    }

    /// Returns the lease (shutdown).
    pub async fn release(&self) {
        let held = self.held.lock().await.take();
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(held) = held {
            held.release().await;
        }
    }
}
