//! A `vllm.grpc.engine.GenerateRequest` checked field by field and turned into the core's
//! [`Plan`]: what the simulator can honour is honoured, everything else is refused by name.

use std::sync::Arc;

use proto::vllm::grpc::engine::{self as vllm, generate_request::Input};

use crate::{
    error::Error,
    generate::{MAX_PROMPT_BYTES, Plan, Violations, is_valid_request_id, new_request_id, request_id_rule},
    mock_lm::{Stops, hash_ids, text::Sampling},
    models::Model,
};

/// What the adapter needs beyond the plan to answer in the dialect.
#[derive(Debug)]
pub struct Translated {
    /// The core's request.
    pub plan: Plan,
    /// Chunks per step, or only the final `GenerateComplete`.
    pub stream: bool,
}

/// Checks `req` against `model` (the one this door serves) and builds the plan. Every violation
/// is listed at once, each naming its field (`sampling_params.n`...) and what to change.
pub fn translate(model: &Arc<Model>, req: vllm::GenerateRequest) -> Result<Translated, Error> {
    let mut bad = Violations::default();
    if !is_valid_request_id(&req.request_id) {
        bad.add("request_id", request_id_rule());
    }
    refuse_unsupported(&req, &mut bad);
    let spec = &model.spec;
    let (prompt_hash, prompt_tokens, prompt_ids) = match &req.input {
        None => {
            bad.add("input", "is required: set tokenized.input_ids (the prompt's token ids) or text");
            (0, 0, Arc::from([]))
        }
        Some(Input::Tokenized(tokenized)) => {
            let (hash, tokens) = prompt_of_ids(model, &tokenized.input_ids, &mut bad);
            (hash, tokens, Arc::from(tokenized.input_ids.as_slice()))
        }
        Some(Input::Text(text)) => {
            if text.len() > MAX_PROMPT_BYTES {
                bad.add("text", format!("is {} bytes; the limit is {MAX_PROMPT_BYTES} bytes", text.len()));
            }
            let (hash, tokens, ids) = model.prompt(text);
            if tokens == 0 {
                bad.add("text", "has no tokens; give at least one word");
            }
            (hash, tokens, ids)
        }
    };
    let params = req.sampling_params.unwrap_or_default();
    // vLLM's default when max_tokens is unset: whatever the context leaves after the prompt,
    // here also capped by the model's completion limit.
    let room = spec.arch.context_length.saturating_sub(prompt_tokens);
    let max_tokens = params.max_tokens.unwrap_or_else(|| spec.max_tokens_limit.min(room).max(1));
    if max_tokens == 0 {
        bad.add("sampling_params.max_tokens", "is 0; ask for at least 1 token (or leave it unset)");
    }
    let prompt_field = match req.input {
        Some(Input::Text(_)) => "text",
        _ => "tokenized.input_ids",
    };
    bad.check_lengths(spec, (prompt_field, prompt_tokens), ("sampling_params.max_tokens", max_tokens));
    if params.min_tokens > max_tokens {
        bad.add(
            "sampling_params.min_tokens",
            format!("{} exceeds max_tokens {max_tokens}", params.min_tokens),
        );
    }
    let sampling = sampling(&params, &mut bad);
    if !bad.is_empty() {
        return Err(bad.into_error());
    }
    let stops = Stops {
        min_tokens: params.min_tokens,
        ignore_eos: params.ignore_eos,
        stop_token_ids: params.stop_token_ids.clone(),
    };
    // vLLM draws a random seed when none is given; the simulator does the same, so unseeded
    // requests differ from one another as they would on an engine.
    let seed = params.seed.map_or_else(crate::memory::random_u64, |s| u64::from(s as u32));
    let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
    let plan = Plan {
        model: model.clone(),
        prompt_hash,
        prompt_tokens,
        prompt_ids,
        max_tokens,
        seed,
        sampling,
        stops,
        request_id,
    };
    Ok(Translated { plan, stream: req.stream })
}

/// The prompt's hash and length from its token ids, which must be in the model's vocabulary.
fn prompt_of_ids(model: &Model, ids: &[u32], bad: &mut Violations) -> (u64, u32) {
    if ids.is_empty() {
        bad.add("tokenized.input_ids", "is empty; the prompt needs at least one token");
    }
    let vocab = model.vocab_size();
    if let Some((at, id)) = ids.iter().enumerate().find(|(_, id)| **id >= vocab) {
        bad.add(
            "tokenized.input_ids",
            format!(
                "token {id} at position {at} is outside model {}'s vocabulary of {vocab}",
                model.spec.key
            ),
        );
    }
    (hash_ids(ids), u32::try_from(ids.len()).unwrap_or(u32::MAX))
}

/// Temperature (unset: 1, vLLM's default), top_p and top_k, checked.
fn sampling(params: &vllm::SamplingParams, bad: &mut Violations) -> Sampling {
    let temperature = f64::from(params.temperature.unwrap_or(1.0));
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        bad.add("sampling_params.temperature", format!("{temperature} is outside 0..=2"));
    }
    // proto3 sends 0 for "unset": no truncation, as vLLM reads it.
    let top_p = if params.top_p == 0.0 { 1.0 } else { f64::from(params.top_p) };
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        bad.add("sampling_params.top_p", format!("{top_p} is outside (0, 1]"));
    }
    Sampling { temperature, top_p, top_k: params.top_k }
}

/// Fields asking for what the simulator does not do: refused, never silently dropped, so a
/// gateway test that relies on one fails loudly instead of passing on a wrong answer. Values
/// equal to "off" (the gateway's defaults: penalties 0, repetition 1, n 1) are accepted.
fn refuse_unsupported(req: &vllm::GenerateRequest, bad: &mut Violations) {
    const NOT_SIMULATED: &str = "is not simulated by runtime-service; leave it unset";
    if let Some(p) = &req.sampling_params {
        if p.n > 1 {
            bad.add("sampling_params.n", format!("{} parallel samples are not simulated; use n = 1", p.n));
        }
        if p.logprobs.is_some() {
            bad.add("sampling_params.logprobs", NOT_SIMULATED);
        }
        if p.prompt_logprobs.is_some() {
            bad.add("sampling_params.prompt_logprobs", NOT_SIMULATED);
        }
        if p.constraint.is_some() {
            bad.add(
                "sampling_params.constraint",
                format!("structured output (json_schema, regex, grammar, choice...) {NOT_SIMULATED}"),
            );
        }
        if !p.stop.is_empty() {
            bad.add(
                "sampling_params.stop",
                "stop strings are not simulated (the output is token ids); use stop_token_ids",
            );
        }
        if p.min_p != 0.0 {
            bad.add("sampling_params.min_p", format!("{} {NOT_SIMULATED} (or 0)", p.min_p));
        }
        if p.frequency_penalty != 0.0 {
            bad.add(
                "sampling_params.frequency_penalty",
                format!("{} {NOT_SIMULATED} (or 0)", p.frequency_penalty),
            );
        }
        if p.presence_penalty != 0.0 {
            bad.add(
                "sampling_params.presence_penalty",
                format!("{} {NOT_SIMULATED} (or 0)", p.presence_penalty),
            );
        }
        if p.repetition_penalty != 0.0 && p.repetition_penalty != 1.0 {
            bad.add(
                "sampling_params.repetition_penalty",
                format!("{} {NOT_SIMULATED} (or 1)", p.repetition_penalty),
            );
        }
        if !p.logit_bias.is_empty() {
            bad.add("sampling_params.logit_bias", NOT_SIMULATED);
        }
        if p.truncate_prompt_tokens.is_some() {
            bad.add("sampling_params.truncate_prompt_tokens", NOT_SIMULATED);
        }
    }
    if req.mm_inputs.is_some() {
        bad.add("mm_inputs", "multimodal inputs are not simulated: the models are text-only");
    }
    if req.kv_transfer_params.is_some() {
        bad.add("kv_transfer_params", format!("KV transfer (disaggregated prefill) {NOT_SIMULATED}"));
    }
    if req.kv_transfer_params_json.is_some() {
        bad.add("kv_transfer_params_json", format!("KV transfer (disaggregated prefill) {NOT_SIMULATED}"));
    }
    if let Some(rank) = req.data_parallel_rank.filter(|&r| r != 0) {
        bad.add("data_parallel_rank", format!("{rank}: this engine has one data-parallel rank, 0"));
    }
}
