//! A workload: how requests arrive and what each one asks for, checked field by field and expanded
//! into a deterministic list of requests (the format is in the crate docs).

mod expand;
mod jsonl;
mod parse;
mod rng;

use std::fmt;

pub use expand::{Pacing, PlannedRequest, Schedule};

/// Requests in one workload at most: every replay loop is bounded by it, and the expanded plan
/// stays in memory.
pub const MAX_REQUESTS: usize = 100_000;
/// Largest `prompt_tokens`, `output_tokens` or `shared_prefix_tokens` of a request (2^20; no
/// served model has a longer context).
pub const MAX_TOKENS: u32 = 1 << 20;
/// Prompt token ids in one workload at most: the plan holds them all, 4 bytes each (256 MiB).
pub const MAX_TOTAL_PROMPT_TOKENS: u64 = 1 << 26;
/// Closed-loop clients at most: each is a task with a request in flight.
pub const MAX_CLIENTS: u32 = 10_000;
/// Latest arrival, in milliseconds (one week): `Duration`s built from later offsets could
/// overflow, and no replay is meant to run that long.
pub const MAX_ARRIVAL_MS: f64 = 7.0 * 24.0 * 3600.0 * 1000.0;

/// A validated workload: build one with [`WorkloadSpec::from_toml`] or
/// [`WorkloadSpec::from_jsonl`], or fill the fields and call [`WorkloadSpec::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// When requests are sent.
    pub arrival: Arrival,
    /// What is sent: the classes, expanded in this order.
    pub requests: Vec<RequestClass>,
    /// When set, the expanded requests are shuffled with this seed (classes interleave), before
    /// arrival times are given out in order.
    pub shuffle_seed: Option<u64>,
}

/// How requests arrive. Offsets count from the start of the replay; the first open-loop request
/// is sent at 0, as in vLLM's `benchmark_serving.py`.
#[derive(Debug, Clone, PartialEq)]
pub enum Arrival {
    /// `rate` requests per second, evenly spaced: request i at i / rate.
    FixedRate {
        /// Requests per second, > 0.
        rate: f64,
    },
    /// A Poisson process of `rate` requests per second: exponential gaps drawn from `seed`.
    Poisson {
        /// Requests per second, > 0.
        rate: f64,
        /// Seed of the gaps: the same seed gives the same arrival times.
        seed: u64,
    },
    /// `clients` clients, each sending its next request when its previous one ends.
    ClosedLoop {
        /// Clients, each with at most one request in flight.
        clients: u32,
    },
    /// Every request at t = 0.
    Burst,
    /// Request i (in expansion order) at `at_ms[i]` milliseconds; one entry per request.
    Trace {
        /// Arrival offsets in milliseconds, any order.
        at_ms: Vec<f64>,
    },
}

impl Arrival {
    /// The name used in the file's `kind` key.
    pub fn kind(&self) -> &'static str {
        match self {
            Arrival::FixedRate { .. } => "fixed-rate",
            Arrival::Poisson { .. } => "poisson",
            Arrival::ClosedLoop { .. } => "closed-loop",
            Arrival::Burst => "burst",
            Arrival::Trace { .. } => "trace",
        }
    }
}

/// `count` requests of the same shape.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestClass {
    /// Requests of this class, ≥ 1.
    pub count: u32,
    /// Prompt length in tokens, exact.
    pub prompt_tokens: u32,
    /// Tokens to generate (`max_tokens`); exact when `ignore_eos`.
    pub output_tokens: u32,
    /// Whether the model may not stop before `output_tokens`.
    pub ignore_eos: bool,
    /// The leading prompt tokens shared with the rest of a group, if any.
    pub prefix: Option<SharedPrefix>,
    /// Seed of the prompt tokens after the shared prefix.
    pub seed: u64,
}

/// Requests naming the same group start with the same tokens: the group's token sequence is
/// fixed by its name, and each request takes its first `tokens`, so classes of one group with
/// different lengths still share the shorter prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPrefix {
    /// Group name.
    pub group: String,
    /// Leading prompt tokens taken from the group, ≤ `prompt_tokens`.
    pub tokens: u32,
}

/// Why a workload was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum SpecError {
    /// The text is not TOML (or a JSONL line is not JSON): the parser's message.
    Syntax(String),
    /// Every field with a bad value, in the order found.
    Invalid(Vec<Violation>),
}

/// A field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where: `arrival.rate`, `requests[1].count`, `line 3: prompt_tokens`, `vocab_size`.
    pub field: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl SpecError {
    /// The fields named, in order (what tests check).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            SpecError::Syntax(_) => Vec::new(),
            SpecError::Invalid(violations) => violations.iter().map(|v| v.field.as_str()).collect(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::Syntax(message) => write!(f, "not a workload: {message}"),
            SpecError::Invalid(violations) => {
                write!(f, "invalid workload: ")?;
                for (i, v) in violations.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{}: {}", v.field, v.problem)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for SpecError {}

/// Collects violations so one pass reports them all, as the services' BadRequest does.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<Violation>);

impl Violations {
    pub(crate) fn push(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(Violation { field: field.into(), problem: problem.into() });
    }

    pub(crate) fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() { Ok(()) } else { Err(SpecError::Invalid(self.0)) }
    }
}

impl WorkloadSpec {
    /// Reads a workload file: a JSONL trace when its name ends in `.jsonl`, else TOML.
    pub fn read(path: &std::path::Path) -> Result<WorkloadSpec, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let spec = if path.extension().is_some_and(|e| e == "jsonl") {
            WorkloadSpec::from_jsonl(&text)
        } else {
            WorkloadSpec::from_toml(&text)
        };
        spec.map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a workload from TOML (see the crate docs) and validates it.
    pub fn from_toml(text: &str) -> Result<WorkloadSpec, SpecError> {
        parse::from_toml(text)
    }

    /// Reads a JSONL trace, one request per line (see the crate docs), and validates it.
    pub fn from_jsonl(text: &str) -> Result<WorkloadSpec, SpecError> {
        jsonl::from_jsonl(text)
    }

    /// Requests in the workload.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().map(|c| u64::from(c.count)).sum()
    }

    /// Checks every bound; the error names each bad field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut bad = Violations::default();
        if self.requests.is_empty() {
            bad.push("requests", "at least one [[requests]] table is needed");
        }
        for (i, class) in self.requests.iter().enumerate() {
            class.check(&format!("requests[{i}]."), &mut bad);
        }
        let total = self.total_requests();
        if total > MAX_REQUESTS as u64 {
            bad.push("requests", format!("{total} requests in all; at most {MAX_REQUESTS}"));
        }
        let prompt_tokens: u64 =
            self.requests.iter().map(|c| u64::from(c.count) * u64::from(c.prompt_tokens)).sum();
        if prompt_tokens > MAX_TOTAL_PROMPT_TOKENS {
            bad.push(
                "requests",
                format!("{prompt_tokens} prompt tokens in all; at most {MAX_TOTAL_PROMPT_TOKENS}"),
            );
        }
        self.arrival.check(total, &mut bad);
        bad.into_result()
    }
}

impl RequestClass {
    /// Checks this class; `path` prefixes each field name (`requests[0].`, `line 3: `).
    pub(crate) fn check(&self, path: &str, bad: &mut Violations) {
        if self.count == 0 {
            bad.push(format!("{path}count"), "must be at least 1");
        }
        for (field, value) in [("prompt_tokens", self.prompt_tokens), ("output_tokens", self.output_tokens)] {
            if !(1..=MAX_TOKENS).contains(&value) {
                bad.push(format!("{path}{field}"), format!("{value} is not between 1 and {MAX_TOKENS}"));
            }
        }
        if let Some(prefix) = &self.prefix {
            if prefix.group.is_empty() {
                bad.push(format!("{path}prefix_group"), "must not be empty");
            }
            if prefix.tokens == 0 || prefix.tokens > self.prompt_tokens {
                bad.push(
                    format!("{path}shared_prefix_tokens"),
                    format!("{} is not between 1 and prompt_tokens ({})", prefix.tokens, self.prompt_tokens),
                );
            }
        }
    }
}

impl Arrival {
    fn check(&self, total: u64, bad: &mut Violations) {
        match self {
            Arrival::FixedRate { rate } | Arrival::Poisson { rate, .. } => {
                if !(rate.is_finite() && *rate > 0.0) {
                    bad.push("arrival.rate", format!("{rate} is not a positive number of requests/s"));
                } else if total as f64 / rate * 1000.0 > MAX_ARRIVAL_MS {
                    bad.push(
                        "arrival.rate",
                        format!("{total} requests at {rate}/s take longer than a week to send"),
                    );
                }
            }
            Arrival::ClosedLoop { clients } => {
                if !(1..=MAX_CLIENTS).contains(clients) {
                    bad.push("arrival.clients", format!("{clients} is not between 1 and {MAX_CLIENTS}"));
                }
            }
            Arrival::Burst => {}
            Arrival::Trace { at_ms } => {
                if at_ms.len() as u64 != total {
                    bad.push(
                        "arrival.at_ms",
                        format!("{} timestamps for {total} requests; one per request", at_ms.len()),
                    );
                }
                if let Some((i, t)) = at_ms
                    .iter()
                    .enumerate()
                    .find(|(_, t)| !(t.is_finite() && (0.0..=MAX_ARRIVAL_MS).contains(*t)))
                {
                    bad.push(
                        format!("arrival.at_ms[{i}]"),
                        format!("{t} is not between 0 and {MAX_ARRIVAL_MS} ms"),
                    );
                }
            }
        }
    }
}
