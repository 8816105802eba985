//! The configured models and their load state. Loading a model leases its uniforms (weights)
//! from memory-service under a per-model scope, renewed for as long as it stays loaded.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::task::TaskTracker;

use crate::{
    config::{Config, ModelSpec},
    engine::Engine,
    error::Error,
    memory::{Ask, Lost, MemoryClient, Renewer, Reservation, unique_scope},
};

/// Pool names in memory-service.
pub const KV_CACHE: &str = "kv-cache";
/// Pool of per-token activations.
pub const ACTIVATIONS: &str = "activations";
/// Pool of model weights.
pub const UNIFORMS: &str = "uniforms";

/// What loading needs from the rest of the service.
#[derive(Debug, Clone)]
pub struct Loader {
    /// memory-service.
    pub client: MemoryClient,
    /// Renews the uniforms while loaded.
    pub renewer: Renewer,
    /// Tracks background frees.
    pub tracker: TaskTracker,
    /// Lease TTL.
    pub ttl: Duration,
    /// Server-side wait for room.
    pub max_wait: Duration,
    /// This instance's name (scopes are per instance).
    pub instance: String,
}

/// One configured model.
#[derive(Debug)]
pub struct Model {
    /// Its configuration.
    pub spec: ModelSpec,
    /// Its engine.
    pub engine: &'static dyn Engine,
    /// Held while loaded; a tokio mutex so concurrent first requests share one load.
    uniforms: tokio::sync::Mutex<Option<Reservation>>,
    /// A copy of the loaded reservation's lost signal, readable without awaiting.
    lost: Mutex<Option<Lost>>,
}

impl Model {
    /// Whether the model's uniforms are leased and alive.
    pub fn is_loaded(&self) -> bool {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|lost| !lost.is_cancelled())
    }

    /// The loaded reservation's lost signal, if loaded.
    pub fn lost_signal(&self) -> Option<Lost> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the model if it is not loaded (or its leases were lost).
    pub async fn ensure_loaded(&self, loader: &Loader) -> Result<(), Error> {
        if self.is_loaded() {
            return Ok(());
        }
        let mut uniforms = self.uniforms.lock().await;
        if let Some(held) = uniforms.as_ref()
            && !held.lost().is_cancelled()
        {
            return Ok(()); // loaded by a concurrent request while we waited
        }
        // A lost reservation may still hold some leases (only some expired): free them first.
        if let Some(old) = uniforms.take() {
            old.release().await;
        }
        let ask = Ask {
            items: vec![(UNIFORMS, self.spec.memory.uniform_bytes)],
            scope: unique_scope(&loader.instance, "model", &self.spec.key),
            ttl: loader.ttl,
            max_wait: loader.max_wait,
        };
        let held = Reservation::acquire(&loader.client, &loader.renewer, &loader.tracker, &ask).await?;
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(held.lost().clone());
        *uniforms = Some(held);
        tracing::info!(model = %self.spec.key, bytes = self.spec.memory.uniform_bytes, "model loaded");
        Ok(())
    }

    /// Frees the model's uniforms (shutdown).
    pub async fn unload(&self) {
        let held = self.uniforms.lock().await.take();
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(held) = held {
            held.release().await;
        }
    }
}

/// Every configured model, by key.
#[derive(Debug)]
pub struct Models {
    by_key: BTreeMap<String, Arc<Model>>,
}

impl Models {
    /// Models of `config`.
    pub fn new(config: &Config) -> Self {
        let by_key = config
            .models
            .iter()
            .map(|spec| {
                let model = Model {
                    spec: spec.clone(),
                    engine: spec.engine.engine(),
                    uniforms: tokio::sync::Mutex::new(None),
                    lost: Mutex::new(None),
                };
                (spec.key.clone(), Arc::new(model))
            })
            .collect();
        Models { by_key }
    }

    /// The model with `key`.
    pub fn get(&self, key: &str) -> Result<&Arc<Model>, Error> {
        self.by_key.get(key).ok_or_else(|| Error::ModelNotFound(key.to_owned()))
    }

    /// All models, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.by_key.values()
    }
}
