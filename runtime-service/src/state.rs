//! State shared by every handler and background task of runtime-service, and the wiring of the
//! device: one lane per model, each with its slab leaser.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    core::{Device, DeviceSettings},
    error::Error,
    executor::Executor,
    kv,
    kv_events::{KvEventHub, MAX_SUBSCRIBERS, SubscriberSlot},
    memory::{DeviceMemory, Loader, MemoryClient, PoolCapacity, Renewer, Standing},
    metrics::Metrics,
    models::{ACTIVATIONS, KV_CACHE, Models},
};

/// Everything a generation needs, built once at start-up.
#[derive(Debug)]
pub struct Shared {
    /// Validated configuration.
    pub config: Config,
    /// Configured models.
    pub models: Models,
    /// memory-service client.
    pub memory: MemoryClient,
    /// Keeps this instance's leases alive.
    pub renewer: Renewer,
    /// Generation tasks: a drain waits for them to finish.
    pub generations: TaskTracker,
    /// The device loop, slab leases and background frees; shutdown waits for them after the
    /// generations.
    pub tracker: TaskTracker,
    /// Admission control and Cancel registry.
    pub executor: Arc<Executor>,
    /// The simulated device.
    pub device: Device,
    /// The device's double-buffered activations, leased at start.
    pub activations: Standing,
    /// Capacity of memory-service's kv-cache pool, as last learned (asked again when the
    /// server's epoch changes).
    kv_capacity: Mutex<Option<PoolCapacity>>,
    /// Cancelled when a drain starts: new generations are refused, running ones go on.
    pub draining: CancellationToken,
    /// Cancelled when the drain's grace period is over: whatever still runs is cancelled.
    pub shutdown: CancellationToken,
    /// Prometheus instruments.
    pub metrics: Metrics,
    /// The simulated device's own memory: every lease is taken here first.
    pub device_memory: DeviceMemory,
    /// Each model's prefix-cache events, by lane.
    pub kv_events: Vec<Arc<KvEventHub>>,
    /// Open subscriptions to them, both front doors together.
    kv_subscribers: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shared {
    /// Lane `lane`'s event hub and a subscriber's place: FAILED_PRECONDITION with the prefix
    /// cache off (no event is ever published), RESOURCE_EXHAUSTED when every place is taken.
    pub fn kv_subscription(&self, lane: usize) -> Result<(Arc<KvEventHub>, SubscriberSlot), tonic::Status> {
        if !self.config.prefix_caching {
            return Err(tonic::Status::failed_precondition(
                "prefix caching is off (--prefix-caching off), so no block is ever cached and no KV \
                 event published; turn it on to follow the cache",
            ));
        }
        let hub =
            self.kv_events.get(lane).cloned().ok_or_else(|| tonic::Status::internal("no such model lane"))?;
        let slot = SubscriberSlot::take(&self.kv_subscribers).ok_or_else(|| {
            tonic::Status::resource_exhausted(format!(
                "{MAX_SUBSCRIBERS} KV event subscriptions are open, the most this runtime serves; close one first"
            ))
        })?;
        Ok((hub, slot))
    }

    /// Builds the state; starts the renewal task, the device loop and the slab leasers.
    pub fn new(config: Config, shutdown: CancellationToken, metrics: Metrics) -> Result<Arc<Self>, Error> {
        let memory = MemoryClient::new(
            &config.memory_addr,
            &config.instance,
            config.memory_call_timeout(),
            &config.memory_auth,
        )?;
        let renewer = Renewer::spawn(memory.clone(), config.lease_ttl, shutdown.clone());
        let usable = config.device.usable_bytes();
        let device_memory =
            DeviceMemory::new(&config.device.name, usable, Some(metrics.device_memory.clone()));
        let executor = Executor::new(config.max_batch_size, config.queue_capacity, shutdown.clone());
        let tracker = TaskTracker::new();
        let loader = Loader {
            client: memory.clone(),
            renewer: renewer.clone(),
            tracker: tracker.clone(),
            ttl: config.lease_ttl,
            max_wait: config.memory_wait,
            instance: config.instance.clone(),
            device_memory: device_memory.clone(),
        };
        let wake = Arc::new(Notify::new());
        let mut lanes = Vec::with_capacity(config.models.len());
        let mut kv_events = Vec::with_capacity(config.models.len());
        for parts in crate::core::lanes(&config, &wake) {
            kv::spawn(parts.leaser, parts.slabs, loader.clone(), shutdown.clone());
            kv_events.push(parts.lane.kv_events.clone());
            lanes.push((parts.lane, parts.link));
        }
        let settings = DeviceSettings::of(&config);
        let inbox = crate::core::inbox_capacity(&config);
        let device = Device::spawn(
            settings,
            lanes,
            inbox,
            wake,
            metrics.clone(),
            crate::core::Signals {
                shutdown: shutdown.clone(),
                memory: renewer.fence(),
                reclaim: renewer.take_reclaims().filter(|_| config.prefix_caching).map(|requests| {
                    crate::core::Reclaim {
                        renewer: renewer.clone(),
                        requests,
                        freeing: tokio::task::JoinSet::new(),
                        offered: Vec::new(),
                    }
                }),
            },
            &tracker,
        );
        let activations =
            Standing::new(ACTIVATIONS, config.activation_bytes(), "device", &config.device.name);
        Ok(Arc::new(Shared {
            models: Models::new(&config),
            memory,
            renewer,
            generations: TaskTracker::new(),
            tracker,
            executor,
            device,
            activations,
            kv_capacity: Mutex::new(None),
            draining: CancellationToken::new(),
            shutdown,
            config,
            metrics,
            kv_events,
            kv_subscribers: Arc::default(),
            device_memory,
        }))
    }

    /// What taking a standing lease needs.
    pub fn loader(&self) -> Loader {
        Loader {
            client: self.memory.clone(),
            renewer: self.renewer.clone(),
            tracker: self.tracker.clone(),
            ttl: self.config.lease_ttl,
            max_wait: self.config.memory_wait,
            instance: self.config.instance.clone(),
            device_memory: self.device_memory.clone(),
        }
    }

    /// Capacity of memory-service's kv-cache pool: asked once per server epoch (a running
    /// memory-service never resizes a pool; one restarted in memory may have other pools).
    pub async fn kv_capacity(&self) -> Result<u64, Error> {
        let cached = *self.kv_capacity.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = cached
            && known.epoch == self.renewer.epoch()
        {
            return Ok(known.bytes);
        }
        // An answer from a new epoch proves the restart: what the old one granted is gone.
        let fresh = self.renewer.learn_epoch(self.memory.pool_capacity(KV_CACHE), |c| c.epoch).await?;
        // Cached only if it is the epoch now known: a late answer from a previous process is
        // used for this call and asked again by the next.
        if fresh.epoch == self.renewer.epoch() {
            *self.kv_capacity.lock().unwrap_or_else(PoisonError::into_inner) = Some(fresh);
        }
        Ok(fresh.bytes)
    }
}
