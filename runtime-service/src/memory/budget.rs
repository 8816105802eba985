//! The simulated device's own memory: what this runtime holds (weights, activation buffers,
//! kv-cache slabs) never exceeds what the device has, whatever memory-service would grant. A
//! memory-service sized for an H100 must not let a runtime simulating an L4 hold 36 GiB of KV.
//!
//! The device's usable memory is 90% of it (vLLM's default `gpu_memory_utilization`). Every
//! lease the runtime takes is first taken here, and given back when the lease is dropped.

use std::sync::{Arc, Mutex};

use prometheus::IntGaugeVec;

use crate::error::Error;

/// What a piece of device memory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A model's weights (memory-service's `uniforms`).
    Weights,
    /// The device's activation buffers.
    Activations,
    /// Paged KV blocks.
    KvCache,
}

impl Use {
    /// The use of memory-service pool `pool` (another pool counts as weights: it is not paged).
    pub fn of_pool(pool: &str) -> Use {
        match pool {
            super::KV_CACHE => Use::KvCache,
            super::ACTIVATIONS => Use::Activations,
            _ => Use::Weights,
        }
    }

    /// Label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Use::Weights => "weights",
            Use::Activations => "activations",
            Use::KvCache => "kv_cache",
        }
    }
}

/// The device's memory book. Cheap to clone; taking is rare (a model load, a slab), so a plain
/// mutex over three numbers is enough.
#[derive(Debug, Clone)]
pub struct DeviceMemory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    device: String,
    usable: u64,
    /// Bytes held per use: weights, activations, kv-cache.
    held: Mutex<[u64; 3]>,
    /// `runtime_device_memory_bytes{use}`.
    gauge: Option<IntGaugeVec>,
}

/// Device memory taken for one lease; given back when dropped.
#[derive(Debug)]
pub struct Held {
    memory: DeviceMemory,
    uses: Vec<(Use, u64)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.memory.lock();
        for &(used, bytes) in &self.uses {
            held[used as usize] -= bytes;
        }
        self.memory.export(&held);
    }
}

impl DeviceMemory {
    /// The memory of `device` (its name, for messages), `usable` bytes of it, exported to
    /// `gauge` when given.
    pub fn new(device: &str, usable: u64, gauge: Option<IntGaugeVec>) -> Self {
        let memory = DeviceMemory {
            inner: Arc::new(Inner { device: device.to_owned(), usable, held: Mutex::new([0; 3]), gauge }),
        };
        if let Some(gauge) = &memory.inner.gauge {
            gauge.with_label_values(&["usable"]).set(usable as i64);
        }
        memory.export(&[0; 3]);
        memory
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [u64; 3]> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn export(&self, held: &[u64; 3]) {
        if let Some(gauge) = &self.inner.gauge {
            for used in [Use::Weights, Use::Activations, Use::KvCache] {
                gauge.with_label_values(&[used.name()]).set(held[used as usize] as i64);
            }
        }
    }

    /// Usable bytes of the device.
    pub fn usable(&self) -> u64 {
        self.inner.usable
    }

    /// Bytes held for `used`.
    pub fn held(&self, used: Use) -> u64 {
        self.lock()[used as usize]
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.device
    }

    /// Usable bytes nothing holds now.
    pub fn free(&self) -> u64 {
        self.inner.usable.saturating_sub(self.lock().iter().sum())
    }

    /// The most the kv-cache could ever hold: what weights and activations leave.
    pub fn kv_room(&self) -> u64 {
        let held = self.lock();
        self.inner.usable.saturating_sub(held[Use::Weights as usize] + held[Use::Activations as usize])
    }

    /// Takes `items` ((use, bytes)) together, or nothing. Refused FAILED_PRECONDITION if they
    /// could never fit beside the weights and activations held (the kv-cache gives way, but
    /// nothing else does), RESOURCE_EXHAUSTED if only the kv-cache held now is in the way.
    pub fn take(&self, items: &[(Use, u64)]) -> Result<Held, Error> {
        let mut held = self.lock();
        let asked: u64 = items.iter().map(|&(_, bytes)| bytes).sum();
        let standing = held[Use::Weights as usize] + held[Use::Activations as usize];
        let total = standing + held[Use::KvCache as usize];
        let usable = self.inner.usable;
        if standing.saturating_add(asked) > usable {
            return Err(Error::Unservable(format!(
                "{asked} bytes do not fit the device {}: {usable} bytes usable (90% of its memory), {standing} held by weights and activations",
                self.inner.device
            )));
        }
        if total.saturating_add(asked) > usable {
            return Err(Error::MemoryExhausted {
                detail: format!(
                    "the device {} is full: {asked} bytes asked, {total} of {usable} usable bytes held ({} by the kv-cache)",
                    self.inner.device,
                    held[Use::KvCache as usize]
                ),
                attempts: 1,
                waited: std::time::Duration::ZERO,
            });
        }
        for &(used, bytes) in items {
            held[used as usize] += bytes;
        }
        self.export(&held);
        Ok(Held { memory: self.clone(), uses: items.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_refuses_what_the_device_cannot_hold_and_gives_back_on_drop() {
        let memory = DeviceMemory::new("l4", 1000, None);
        let weights = memory.take(&[(Use::Weights, 600)]).expect("fits");
        let kv = memory.take(&[(Use::KvCache, 300)]).expect("fits");
        assert_eq!(memory.kv_room(), 400);
        // The kv-cache is in the way: retry later.
        assert!(matches!(memory.take(&[(Use::KvCache, 200)]), Err(Error::MemoryExhausted { .. })));
        // Never fits beside the weights.
        let err = memory.take(&[(Use::Weights, 500)]).unwrap_err();
        assert!(matches!(&err, Error::Unservable(m) if m.contains("l4")), "{err:?}");
        drop(kv);
        let more = memory.take(&[(Use::KvCache, 400)]).expect("room again");
        assert_eq!((memory.held(Use::KvCache), memory.held(Use::Weights)), (400, 600));
        drop((weights, more));
        assert_eq!(memory.kv_room(), 1000);
        assert_eq!(memory.held(Use::KvCache), 0);
    }
}
