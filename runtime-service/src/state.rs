//! State shared by every handler and background task of runtime-service.

use std::sync::Arc;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    error::Error,
    executor::Executor,
    memory::{MemoryClient, Renewer},
    metrics::Metrics,
    models::{Loader, Models},
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
    /// Generation tasks and background frees; shutdown waits for them.
    pub tracker: TaskTracker,
    /// Admission control and Cancel registry.
    pub executor: Arc<Executor>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// Prometheus instruments.
    pub metrics: Metrics,
}

impl Shared {
    /// Builds the state; starts the renewal task.
    pub fn new(config: Config, shutdown: CancellationToken, metrics: Metrics) -> Result<Arc<Self>, Error> {
        let memory = MemoryClient::new(&config.memory_addr, &config.instance, config.memory_timeout)?;
        let renewer = Renewer::spawn(memory.clone(), config.lease_ttl / 3, shutdown.clone());
        let executor = Executor::new(config.max_concurrent, config.queue_capacity, shutdown.clone());
        Ok(Arc::new(Shared {
            models: Models::new(&config),
            memory,
            renewer,
            tracker: TaskTracker::new(),
            executor,
            shutdown,
            config,
            metrics,
        }))
    }

    /// What model loading needs.
    pub fn loader(&self) -> Loader {
        Loader {
            client: self.memory.clone(),
            renewer: self.renewer.clone(),
            tracker: self.tracker.clone(),
            ttl: self.config.lease_ttl,
            max_wait: self.config.memory_wait,
            instance: self.config.instance.clone(),
        }
    }
}
