//! The configured models and their load state. Loading a model leases its weights (`uniforms`)
//! from memory-service under a per-model scope, renewed for as long as it stays loaded.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    config::{Config, ConfigError, ModelSpec},
    error::Error,
    memory::{Loader, Lost, Standing},
    mock_lm::{MockLm, hash_ids},
    rng::fnv1a,
    tokenizer::Bundle,
};

pub use crate::memory::{ACTIVATIONS, KV_CACHE, UNIFORMS};

/// Longest prompt accepted, in bytes, whatever the model.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// One configured model.
#[derive(Debug)]
pub struct Model {
    /// Its configuration.
    pub spec: ModelSpec,
    /// Its mock language model: sampling style, and how words become tokens when the tokenizer is its own.
    pub lm: &'static dyn MockLm,
    /// Its tokenizer bundle: what GetTokenizer serves and what prompts are counted with.
    pub bundle: Bundle,
    /// Index of its lane on the device.
    pub lane: usize,
    /// Its weights, held while loaded.
    weights: Standing,
}

impl Model {
    /// Ids a prompt may use: the mock model's, or more if the model's tokenizer (a user's own)
    /// knows more, since a gateway tokenizes with it.
    pub fn vocab_size(&self) -> u32 {
        self.lm.vocab_size().max(self.bundle.vocab_size())
    }

    /// A text prompt as the model's tokenizer (the one a gateway fetches) reads it: the hash
    /// of its token ids, the very hash a gateway's ids for that text get (so both doors generate
    /// the same text for it), their count, and the ids (for the prefix cache). The mock model's own
    /// splitter is the fallback should the tokenizer fail to encode; such a prompt has no ids.
    pub fn prompt(&self, text: &str) -> (u64, u32, Arc<[u32]>) {
        // A prompt past the byte limit is refused anyway: not worth a tokenizer's pass.
        let encoded = (text.len() <= MAX_PROMPT_BYTES).then(|| self.bundle.encode(text)).flatten();
        match encoded {
            Some(ids) => (hash_ids(&ids), u32::try_from(ids.len()).unwrap_or(u32::MAX), ids.into()),
            None => (fnv1a(text.as_bytes()), self.lm.count_prompt_tokens(text), Arc::from([])),
        }
    }

    /// Whether the model's weights are leased and alive.
    pub fn is_loaded(&self) -> bool {
        self.weights.is_held()
    }

    /// The loaded weights' lost signal, if loaded.
    pub fn lost_signal(&self) -> Option<Lost> {
        self.weights.lost_signal()
    }

    /// Loads the model if it is not loaded (or its weights were lost).
    pub async fn ensure_loaded(&self, loader: &Loader) -> Result<(), Error> {
        self.weights.ensure(loader).await
    }

    /// Frees the model's weights (shutdown).
    pub async fn unload(&self) {
        self.weights.release().await;
    }
}

/// Every configured model, by key.
#[derive(Debug)]
pub struct Models {
    by_key: BTreeMap<String, Arc<Model>>,
}

impl Models {
    /// Models of `config`; lanes are numbered in configuration order.
    pub fn new(config: &Config) -> Self {
        let by_key = config
            .models
            .iter()
            .enumerate()
            .map(|(lane, spec)| {
                // Config::validate loaded a user's tokenizer already; should the file change
                // under us, the mock model's own keeps the model served.
                let bundle = Bundle::for_model(spec).unwrap_or_else(|e| {
                    tracing::warn!(model = %spec.key, "{e}; serving the mock model's own tokenizer");
                    Bundle::generate(spec.mock_lm.lm(), &spec.key, spec.arch.context_length)
                });
                let model = Model {
                    bundle,
                    spec: spec.clone(),
                    lm: spec.mock_lm.lm(),
                    lane,
                    weights: Standing::new(UNIFORMS, spec.arch.weight_bytes(), "model", &spec.key),
                };
                (spec.key.clone(), Arc::new(model))
            })
            .collect();
        Models { by_key }
    }

    /// The model with `key`.
    pub fn get(&self, key: &str) -> Result<&Arc<Model>, Error> {
        self.by_key.get(key).ok_or_else(|| Error::ModelNotFound(serving::echo::echo(key)))
    }

    /// The model the engine dialect serves (`config.engine_model()`).
    pub fn engine_model(&self, config: &Config) -> Result<Arc<Model>, ConfigError> {
        config
            .engine_model()
            .and_then(|spec| self.get(&spec.key).ok())
            .cloned()
            .ok_or_else(|| ConfigError::Invalid("no model for the engine dialect".into()))
    }

    /// All models, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.by_key.values()
    }
}
