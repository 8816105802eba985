//! vLLM's default batch limits for a published point, from the engine generation that ran it
//! (the tables and their code locations are in `fidelity/SOURCES.md`).

use super::Point;

/// The limits a point ran with, and why we think so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VllmLimits {
    /// `max_num_seqs`: sequences in one step.
    pub max_num_seqs: u32,
    /// `max_num_batched_tokens`: tokens in one step.
    pub max_num_batched_tokens: u32,
    /// Automatic prefix caching (off by default before V1).
    pub prefix_caching: bool,
    /// Chunked prefill: always in V1; before, only above 32K of context without multi-step.
    pub chunked_prefill: bool,
    /// Where the numbers come from: "stated" or the rule that inferred them.
    pub basis: String,
}

/// Llama-3 models' native context, vLLM's `max_model_len` when not given.
fn native_context(model: &str) -> u32 {
    match model {
        "llama-3.1-8b" => 131_072,
        _ => 8192,
    }
}

/// The number after `--name N` or `--name=N` in free text (an engine_note's command line).
fn flag_value(text: &str, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|name| {
        let rest = &text[text.find(name)? + name.len()..];
        let digits: String =
            rest.trim_start_matches(['=', ' ']).chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// `(major, minor)` of "vllm 0.6.0"; `None` when the source does not print it.
fn engine_version(engine: &str) -> Option<(u32, u32)> {
    let version = engine.strip_prefix("vllm ")?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Whether the point ran vLLM's V1 engine (0.8 and later); an unstated version is taken as older.
pub(super) fn is_v1(point: &Point) -> bool {
    engine_version(&point.engine).is_some_and(|v| v >= (0, 8))
}

/// `--num-scheduler-steps` (vLLM 0.6 multi-step scheduling): tokens streamed per chunk.
pub(super) fn scheduler_steps(point: &Point) -> u32 {
    flag_value(&point.engine_note, &["--num-scheduler-steps", "--num_scheduler_steps"]).unwrap_or(1)
}

/// The point's `max_num_seqs` / `max_num_batched_tokens`: as stated if the point states them,
/// else vLLM's defaults for its engine generation, GPU and API.
pub fn vllm_limits(point: &Point) -> VllmLimits {
    let v1 = is_v1(point);
    let mut chunked_prefill = true;
    let (seqs, tokens, rule) = if v1 {
        // EngineArgs defaults: ≥ 70 GiB and not an A100 gets the large table.
        let large = point.gpu.starts_with("h100");
        let offline = point.api == "offline";
        let (seqs, tokens) = match (large, offline) {
            (true, true) => (1024, 16384),
            (true, false) => (1024, 8192),
            (false, true) => (256, 8192),
            (false, false) => (256, 2048),
        };
        (seqs, tokens, "inferred: vLLM V1 defaults for this GPU and API")
    } else {
        // V0 (≤ 0.6; an unprinted version here is 2024, V0 too): 256 sequences; without
        // chunked prefill, max(max_model_len, 2048) tokens; chunked prefill (on by default
        // above 32K of context, but not with multi-step scheduling) gives 512.
        let max_model_len = point
            .max_model_len
            .or_else(|| flag_value(&point.engine_note, &["--max_model_len", "--max-model-len"]))
            .unwrap_or_else(|| native_context(&point.model));
        let chunked = max_model_len > 32_768 && scheduler_steps(point) == 1;
        chunked_prefill = chunked;
        let tokens = if chunked { 512 } else { max_model_len.max(2048) };
        (256, tokens, "inferred: vLLM V0 defaults for the point's max_model_len")
    };
    let stated = point.max_num_seqs.is_some() || point.max_num_batched_tokens.is_some();
    let tokens = point.max_num_batched_tokens.unwrap_or(tokens);
    VllmLimits {
        // vLLM caps sequences at the token budget; runtime-service refuses the opposite.
        max_num_seqs: point.max_num_seqs.unwrap_or(seqs).min(tokens),
        max_num_batched_tokens: tokens,
        prefix_caching: v1,
        chunked_prefill,
        basis: if stated { "stated by the source".into() } else { rule.into() },
    }
}
