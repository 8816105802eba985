//! The models a runtime serves: each one's spec, and the checks on the list (keys, limits against
//! the architecture's context, the engine dialect's model). Apart from the device-wide settings
//! of [`Config`] because a model is its own unit: the file's `[[models]]` tables, the embedded
//! defaults and the fit against the device all deal in [`ModelSpec`].

use serving::arch::Arch;

use super::{Config, ConfigError, MAX_SCOPE_NAME, MAX_TOKENS};
use crate::mock_lm::MockLmKind;

/// One servable model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Key clients name in GenerateRequest.model.
    pub key: String,
    /// The mock language model its text comes from (the seed's engines): tokenization and words.
    pub mock_lm: MockLmKind,
    /// Load (lease its weights) at start-up; health waits for it.
    pub preload: bool,
    /// Its architecture: weights, KV and FLOPs follow from it.
    pub arch: Arch,
    /// Largest max_tokens accepted.
    pub max_tokens_limit: u32,
    /// Largest prompt, in tokens.
    pub max_prompt_tokens: u32,
    /// The user's own `tokenizer.json` to serve and tokenize with, instead of the engine's.
    pub tokenizer: Option<std::path::PathBuf>,
}

impl ModelSpec {
    /// Bytes of one KV block.
    pub fn block_bytes(&self, block_tokens: u32) -> u64 {
        self.arch.kv_bytes_per_token() * u64::from(block_tokens)
    }

    /// Longest sequence served, prompt and completion (vLLM's `max_model_len`).
    pub fn max_model_len(&self) -> u32 {
        self.max_prompt_tokens.saturating_add(self.max_tokens_limit).min(self.arch.context_length)
    }
}

impl Config {
    /// Checks the model list: at least one model, keys usable in scopes and listed once, token
    /// limits within the architecture's context, and the engine dialect's model among them.
    pub(super) fn validate_models(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.models.is_empty() {
            return invalid("at least one model is required".into());
        }
        let mut keys = std::collections::HashSet::new();
        for m in &self.models {
            let key_ok = !m.key.is_empty()
                && m.key.len() <= MAX_SCOPE_NAME
                && m.key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
            if !key_ok {
                return invalid(format!("model key {:?}: use 1 to 64 of a-z, 0-9, '-', '.', '_'", m.key));
            }
            if !keys.insert(&m.key) {
                return invalid(format!("model {:?} is listed twice", m.key));
            }
            m.arch.validate().map_err(|e| ConfigError::Invalid(format!("model {:?}: {e}", m.key)))?;
            if !(1..=MAX_TOKENS).contains(&m.max_tokens_limit)
                || !(1..=MAX_TOKENS).contains(&m.max_prompt_tokens)
            {
                return invalid(format!(
                    "model {:?}: token limits must be between 1 and {MAX_TOKENS}",
                    m.key
                ));
            }
            if m.max_prompt_tokens > m.arch.context_length || m.max_tokens_limit > m.arch.context_length {
                return invalid(format!(
                    "model {:?}: token limits must fit its context of {} tokens",
                    m.key, m.arch.context_length
                ));
            }
        }
        self.validate_engine_model()
    }
}
