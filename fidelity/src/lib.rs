//! Fidelity of the simulated device: replay a workload against a live runtime-service, measure
//! it as vLLM's `benchmark_serving.py` does, and compare with published vLLM measurements.
//!
//! The pieces, in the order a bench uses them:
//! - [`WorkloadSpec`] reads a workload ([`WorkloadSpec::from_toml`], [`WorkloadSpec::from_jsonl`])
//!   and [`WorkloadSpec::expand`]s it into a [`Schedule`] for a model's vocabulary;
//! - [`Target`] connects to runtime-service's engine dialect, reads the vocabulary
//!   ([`Target::model_info`]) and [`Target::replay`]s a plan into a [`Run`] of [`RequestRecord`]s;
//! - [`ReplayReport`] summarises a run (TTFT, TPOT, ITL, E2E; throughput);
//! - [`simulate`] runs the same replay on the offline simulator's device, with no network;
//! - [`published`] reads `published.toml`, turns each point into a [`published::Scenario`] (a
//!   workload plus the runtime flags for that GPU) and compares a report with the point.
//!
//! # Workload format (TOML)
//!
//! ```toml
//! # Optional: shuffle the expanded requests (classes interleave) with this seed.
//! shuffle_seed = 7
//!
//! [arrival]
//! kind = "poisson"   # fixed-rate | poisson | closed-loop | burst | trace
//! rate = 4.0         # fixed-rate, poisson: requests per second (> 0)
//! seed = 1           # poisson: seed of the gaps (default 0)
//! # clients = 8      # closed-loop: clients, each sends its next request when its last ends
//! # at_ms = [0, 250] # trace: one arrival offset (ms) per request, in expansion order
//!
//! [[requests]]
//! count = 90             # requests of this class (≥ 1)
//! prompt_tokens = 1024   # exact prompt length
//! output_tokens = 128    # max_tokens; exact with ignore_eos
//! ignore_eos = true      # default true
//! prefix_group = "sys"   # optional: requests of a group share their first...
//! shared_prefix_tokens = 512  # ...this many prompt tokens; the rest are their own
//! seed = 3               # seed of the tokens after the shared prefix (default 0)
//!
//! [[requests]]
//! count = 10
//! prompt_tokens = 128
//! output_tokens = 512
//! ```
//!
//! The first open-loop request goes at t = 0; fixed-rate sends request i at i / rate; `burst`
//! sends everything at 0. Classes expand in file order (then the optional shuffle), and arrival
//! offsets are handed out in that order. Unknown keys, and keys the arrival kind does not use,
//! are refused by name.
//!
//! # Trace format (JSONL)
//!
//! One request per line, arrival in milliseconds from the start (any order):
//!
//! ```text
//! {"at_ms": 0, "prompt_tokens": 512, "output_tokens": 64, "prefix_group": "sys", "shared_prefix_tokens": 256}
//! {"at_ms": 12.5, "prompt_tokens": 300, "output_tokens": 20, "ignore_eos": false}
//! ```
//!
//! # Determinism and bounds
//!
//! A spec and a vocabulary size always expand to the same requests (token ids from SplitMix64,
//! below `vocab_size − 2`). A workload holds at most [`workload::MAX_REQUESTS`] requests and
//! [`workload::MAX_TOTAL_PROMPT_TOKENS`] prompt tokens, so every replay loop is bounded.
#![forbid(unsafe_code)]

mod door;
mod drive;
pub mod published;
mod record;
mod report;
pub mod simulate;
pub mod workload;

pub use drive::{DriveError, MAX_TIME_SCALE, MIN_TIME_SCALE, ReplayOptions, Run, Target};
pub use record::{Chunk, Failure, RequestRecord};
pub use report::{ReplayReport, Stats, percentile};
pub use workload::{
    Arrival, Pacing, PlannedRequest, RequestClass, Schedule, SharedPrefix, SpecError, Violation, WorkloadSpec,
};
