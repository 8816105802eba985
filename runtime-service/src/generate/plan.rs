//! A validated Generate request: what to run.

use std::sync::Arc;

use proto::runtime::v1 as pb;

use crate::{
    error::Error,
    mock_lm::{Stops, text::Sampling},
    models::{Model, Models},
};

pub use crate::models::MAX_PROMPT_BYTES;
/// Longest request id. Gateways build theirs from a prefix, a UUID and suffixes (smg sends
/// `chatcmpl-<uuid>` and longer); the bound only keeps the executor's table of live ids small.
/// A memory scope shortens the id it embeds, so it does not constrain this one.
const MAX_REQUEST_ID: usize = 256;

/// Whether `id` may name a generation (empty: Generate assigns one). Cancel applies the same
/// rule, so an id no generation could have is a caller's mistake, not a missing generation.
pub fn is_valid_request_id(id: &str) -> bool {
    id.chars().count() <= MAX_REQUEST_ID && !id.chars().any(char::is_control)
}

/// Why [`is_valid_request_id`] refused an id.
pub fn request_id_rule() -> String {
    format!("must be at most {MAX_REQUEST_ID} printable characters")
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The model.
    pub model: Arc<Model>,
    /// Hash of the prompt (its text or its token ids): primes the simulated model.
    pub prompt_hash: u64,
    /// Its length in the model's tokens.
    pub prompt_tokens: u32,
    /// Its token ids, when known (for the prefix cache).
    pub prompt_ids: Arc<[u32]>,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling seed.
    pub seed: u64,
    /// Sampling knobs.
    pub sampling: Sampling,
    /// When the sequence may end before max_tokens.
    pub stops: Stops,
    /// Given or assigned request id.
    pub request_id: String,
}

impl Plan {
    /// Validates `req` against the configured models. Every violation is listed at once, each
    /// naming the field and what to change; an unknown model is NOT_FOUND when nothing else is
    /// wrong with the request.
    pub fn new(models: &Models, req: pb::GenerateRequest) -> Result<Self, Error> {
        let mut bad = Violations::default();
        if req.model.is_empty() {
            bad.add("model", "is required; ListModels shows the configured models");
        }
        if req.prompt.len() > MAX_PROMPT_BYTES {
            bad.add(
                "prompt",
                format!("is {} bytes; the limit is {MAX_PROMPT_BYTES} bytes", req.prompt.len()),
            );
        }
        if req.max_tokens == 0 {
            bad.add("max_tokens", "is required: at least 1");
        }
        let temperature = f64::from(req.temperature);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            bad.add("temperature", format!("{temperature} is outside 0..=2"));
        }
        let top_p = if req.top_p == 0.0 { 1.0 } else { f64::from(req.top_p) };
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            bad.add("top_p", format!("{top_p} is outside (0, 1]"));
        }
        // pipeline_mode is deprecated and ignored (the device's --scheduler decides), so it is
        // not validated either: refusing values this version does not know would make a
        // request fail over a field that changes nothing, and enums must stay open to growth.
        if !is_valid_request_id(&req.request_id) {
            bad.add("request_id", request_id_rule());
        }
        let model = match models.get(&req.model) {
            Ok(model) => model.clone(),
            Err(_) if req.model.is_empty() || !bad.is_empty() => return Err(bad.into_error()),
            Err(err) => return Err(err),
        };
        let spec = &model.spec;
        let (prompt_hash, prompt_tokens, prompt_ids) = model.prompt(&req.prompt);
        if prompt_tokens == 0 && req.prompt.len() <= MAX_PROMPT_BYTES {
            bad.add("prompt", "is empty; give at least one word");
        }
        bad.check_lengths(spec, ("prompt", prompt_tokens), ("max_tokens", req.max_tokens));
        if !bad.is_empty() {
            return Err(bad.into_error());
        }
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        Ok(Plan {
            prompt_tokens,
            max_tokens: req.max_tokens,
            seed: req.seed,
            sampling: Sampling { temperature, top_p, top_k: 0 },
            stops: Stops::default(),
            request_id,
            prompt_hash,
            prompt_ids,
            model,
        })
    }
}

/// The violations found so far: every front door lists them all at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<(&'static str, String)>);

impl Violations {
    /// Adds one: the field (its path in the request) and what to change.
    pub fn add(&mut self, field: &'static str, reason: impl Into<String>) {
        self.0.push((field, reason.into()));
    }

    /// Whether none was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// INVALID_ARGUMENT listing them.
    pub fn into_error(self) -> Error {
        Error::InvalidArgument(self.0)
    }

    /// The model's limits on a prompt of `prompt.1` tokens and a completion of `max.1` tokens,
    /// violations named after the fields `prompt.0` and `max.0`: one rule for both doors.
    pub fn check_lengths(
        &mut self,
        spec: &crate::config::ModelSpec,
        prompt: (&'static str, u32),
        max: (&'static str, u32),
    ) {
        let ((prompt_field, prompt_tokens), (max_field, max_tokens)) = (prompt, max);
        if prompt_tokens > spec.max_prompt_tokens {
            self.add(
                prompt_field,
                format!(
                    "is {prompt_tokens} tokens; model {} accepts at most {}",
                    spec.key, spec.max_prompt_tokens
                ),
            );
        }
        if max_tokens > spec.max_tokens_limit {
            self.add(
                max_field,
                format!("{max_tokens} is outside 1..={} for model {}", spec.max_tokens_limit, spec.key),
            );
        }
        let context = spec.arch.context_length;
        if u64::from(prompt_tokens) + u64::from(max_tokens) > u64::from(context) {
            self.add(
                max_field,
                format!(
                    "{prompt_tokens} prompt tokens + {max_tokens} exceed model {}'s context of {context} tokens",
                    spec.key
                ),
            );
        }
    }
}

/// A fresh request id: 64 random bits in hex.
pub fn new_request_id() -> String {
    format!("gen-{:016x}", crate::memory::random_u64())
}
