//! The JSONL form of a workload: a trace, one request per line with its own arrival time.

use serde::Deserialize;

use super::{Arrival, MAX_ARRIVAL_MS, MAX_REQUESTS, SpecError, Violations, WorkloadSpec, parse::RawClass};

/// One line: `{"at_ms": 0, "prompt_tokens": 128, "output_tokens": 64}`, plus optionally
/// `ignore_eos`, `prefix_group` with `shared_prefix_tokens`, and `seed`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    at_ms: Option<f64>,
    prompt_tokens: Option<i64>,
    output_tokens: Option<i64>,
    ignore_eos: Option<bool>,
    prefix_group: Option<String>,
    shared_prefix_tokens: Option<i64>,
    seed: Option<u64>,
}

pub(super) fn from_jsonl(text: &str) -> Result<WorkloadSpec, SpecError> {
    let mut bad = Violations::default();
    let mut at_ms = Vec::new();
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let number = n + 1;
        let raw: RawLine =
            serde_json::from_str(line).map_err(|e| SpecError::Syntax(format!("line {number}: {e}")))?;
        let path = format!("line {number}: ");
        match raw.at_ms {
            Some(t) if t.is_finite() && (0.0..=MAX_ARRIVAL_MS).contains(&t) => at_ms.push(t),
            Some(t) => {
                bad.push(format!("{path}at_ms"), format!("{t} is not between 0 and {MAX_ARRIVAL_MS} ms"))
            }
            None => bad.push(format!("{path}at_ms"), "required"),
        }
        let class = RawClass {
            count: Some(1),
            prompt_tokens: raw.prompt_tokens,
            output_tokens: raw.output_tokens,
            ignore_eos: raw.ignore_eos,
            prefix_group: raw.prefix_group,
            shared_prefix_tokens: raw.shared_prefix_tokens,
            seed: raw.seed,
        };
        requests.extend(class.check(&path, &mut bad));
        // The bound holds while reading, so a huge file is refused before it is all in memory.
        if requests.len() > MAX_REQUESTS {
            bad.push(format!("line {number}"), format!("more than {} requests", MAX_REQUESTS));
            break;
        }
    }
    if requests.is_empty() && at_ms.is_empty() {
        bad.push("requests", "the trace has no request line");
    }
    bad.into_result()?;
    let spec = WorkloadSpec { arrival: Arrival::Trace { at_ms }, requests, shuffle_seed: None };
    spec.validate()?;
    Ok(spec)
}
