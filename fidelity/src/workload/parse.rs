//! The TOML form of a workload: read loosely (every value optional, integers signed), then
//! checked into a [`WorkloadSpec`] so each mistake is reported with its field's name.

use serde::Deserialize;

use super::{Arrival, RequestClass, SharedPrefix, SpecError, Violations, WorkloadSpec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    arrival: Option<RawArrival>,
    #[serde(default)]
    requests: Vec<RawClass>,
    shuffle_seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArrival {
    kind: Option<String>,
    rate: Option<f64>,
    seed: Option<u64>,
    clients: Option<i64>,
    at_ms: Option<Vec<f64>>,
}

/// One `[[requests]]` table, or one JSONL line (which adds `at_ms`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClass {
    pub(super) count: Option<i64>,
    pub(super) prompt_tokens: Option<i64>,
    pub(super) output_tokens: Option<i64>,
    pub(super) ignore_eos: Option<bool>,
    pub(super) prefix_group: Option<String>,
    pub(super) shared_prefix_tokens: Option<i64>,
    pub(super) seed: Option<u64>,
}

pub(super) fn from_toml(text: &str) -> Result<WorkloadSpec, SpecError> {
    let raw: RawWorkload = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
    let mut bad = Violations::default();
    let arrival = match raw.arrival {
        Some(arrival) => arrival.check(&mut bad),
        None => {
            bad.push("arrival", "an [arrival] table with a kind is needed");
            None
        }
    };
    let requests: Vec<_> =
        raw.requests.iter().enumerate().map(|(i, c)| c.check(&format!("requests[{i}]."), &mut bad)).collect();
    bad.into_result()?;
    let spec = WorkloadSpec {
        arrival: arrival.unwrap_or(Arrival::Burst),
        requests: requests.into_iter().flatten().collect(),
        shuffle_seed: raw.shuffle_seed,
    };
    spec.validate()?;
    Ok(spec)
}

impl RawArrival {
    fn check(self, bad: &mut Violations) -> Option<Arrival> {
        let kind = self.kind.as_deref().unwrap_or_default();
        // Keys each kind reads; any other key given is a mistake worth naming (a `rate` on a
        // closed loop would otherwise be silently ignored).
        let (arrival, used): (Option<Arrival>, &[&str]) = match kind {
            "fixed-rate" => (self.rate.map(|rate| Arrival::FixedRate { rate }), &["rate"]),
            "poisson" => (
                self.rate.map(|rate| Arrival::Poisson { rate, seed: self.seed.unwrap_or(0) }),
                &["rate", "seed"],
            ),
            // Out of u32's range becomes 0, which validation refuses with the bounds.
            "closed-loop" => (
                self.clients.map(|c| Arrival::ClosedLoop { clients: u32::try_from(c).unwrap_or(0) }),
                &["clients"],
            ),
            "burst" => (Some(Arrival::Burst), &[]),
            "trace" => (self.at_ms.clone().map(|at_ms| Arrival::Trace { at_ms }), &["at_ms"]),
            "" => {
                bad.push("arrival.kind", "required: fixed-rate, poisson, closed-loop, burst or trace");
                return None;
            }
            other => {
                bad.push(
                    "arrival.kind",
                    format!("{other:?} is not one of fixed-rate, poisson, closed-loop, burst, trace"),
                );
                return None;
            }
        };
        let given = [
            ("rate", self.rate.is_some()),
            ("seed", self.seed.is_some()),
            ("clients", self.clients.is_some()),
            ("at_ms", self.at_ms.is_some()),
        ];
        for (key, present) in given {
            if present && !used.contains(&key) {
                bad.push(format!("arrival.{key}"), format!("not used by kind = {kind:?}"));
            }
        }
        if arrival.is_none() {
            bad.push(format!("arrival.{}", used[0]), format!("required by kind = {kind:?}"));
        }
        arrival
    }
}

impl RawClass {
    /// The class, or `None` with its problems pushed; `path` prefixes the field names.
    pub(super) fn check(&self, path: &str, bad: &mut Violations) -> Option<RequestClass> {
        let before = bad.0.len();
        let count = required(self.count, &format!("{path}count"), bad);
        let prompt = required(self.prompt_tokens, &format!("{path}prompt_tokens"), bad);
        let output = required(self.output_tokens, &format!("{path}output_tokens"), bad);
        let prefix = match (&self.prefix_group, self.shared_prefix_tokens) {
            (None, None) => None,
            (Some(group), Some(tokens)) => positive(tokens, &format!("{path}shared_prefix_tokens"), bad)
                .map(|tokens| SharedPrefix { group: group.clone(), tokens }),
            (Some(_), None) => {
                bad.push(format!("{path}shared_prefix_tokens"), "required with prefix_group");
                None
            }
            (None, Some(_)) => {
                bad.push(format!("{path}prefix_group"), "required with shared_prefix_tokens");
                None
            }
        };
        let class = RequestClass {
            count: count?,
            prompt_tokens: prompt?,
            output_tokens: output?,
            ignore_eos: self.ignore_eos.unwrap_or(true),
            prefix,
            seed: self.seed.unwrap_or(0),
        };
        class.check(path, bad);
        (bad.0.len() == before).then_some(class)
    }
}

fn required(value: Option<i64>, field: &str, bad: &mut Violations) -> Option<u32> {
    match value {
        Some(v) => positive(v, field, bad),
        None => {
            bad.push(field, "required");
            None
        }
    }
}

/// A count or length: 1 to u32::MAX here; tighter bounds are [`RequestClass::check`]'s.
fn positive(value: i64, field: &str, bad: &mut Violations) -> Option<u32> {
    match u32::try_from(value) {
        Ok(v) if v >= 1 => Some(v),
        _ => {
            bad.push(field, format!("{value} must be at least 1"));
            None
        }
    }
}
