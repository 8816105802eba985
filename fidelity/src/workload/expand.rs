//! Expansion of a validated workload into the requests a replay sends, in arrival order: prompt
//! token ids, `max_tokens` and an arrival offset for each.

use std::{collections::BTreeMap, time::Duration};

use super::{Arrival, SpecError, Violations, WorkloadSpec, rng::SplitMix64};

/// The expanded workload. Only [`WorkloadSpec::expand`] makes one, so its invariants hold for
/// the replay: indices are `0..len` once each, offsets are within the spec's bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pacing: Pacing,
    requests: Vec<PlannedRequest>,
}

impl Schedule {
    /// Open loop (each request at its offset) or closed loop (offsets unused).
    pub fn pacing(&self) -> Pacing {
        self.pacing
    }

    /// The requests, sorted by arrival offset (ties in expansion order).
    pub fn requests(&self) -> &[PlannedRequest] {
        &self.requests
    }
}

/// How a replay paces the plan's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Each request is sent at its `at` offset, whatever is still in flight.
    Open,
    /// `clients` senders, each waiting for its request to end before taking the next.
    ClosedLoop {
        /// Senders.
        clients: u32,
    },
}

/// One request of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    /// Position in expansion order (after any shuffle): unique, and the request id's suffix.
    pub index: usize,
    /// Index of its `[[requests]]` class.
    pub class: usize,
    /// Arrival offset from the start of the replay (zero in a closed loop).
    pub at: Duration,
    /// Prompt token ids, all below `vocab_size - 2`.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_tokens: u32,
    /// Whether generation runs to `max_tokens` regardless of end-of-sequence.
    pub ignore_eos: bool,
}

impl WorkloadSpec {
    /// The requests this workload sends to a model of `vocab_size` token ids (GetModelInfo's
    /// `vocab_size`). Ids are drawn from `0..vocab_size - 2`: the last two are the special
    /// begin/end ids, which would end a sequence or confuse a tokenizer. The same spec and
    /// vocabulary always give the same plan.
    pub fn expand(&self, vocab_size: u32) -> Result<Schedule, SpecError> {
        self.validate()?;
        if vocab_size < 3 {
            let mut bad = Violations::default();
            bad.push("vocab_size", format!("{vocab_size} leaves no ordinary token id"));
            bad.into_result()?;
        }
        let ordinary = vocab_size - 2;
        let prefixes = group_prefixes(self, ordinary);
        let mut requests = Vec::new();
        for (class_index, class) in self.requests.iter().enumerate() {
            // One stream per class, so adding a class never changes another's prompts.
            let mut rng =
                SplitMix64::new(class.seed ^ (class_index as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03));
            for _ in 0..class.count {
                let shared = class
                    .prefix
                    .as_ref()
                    .map_or(&[][..], |p| &prefixes[p.group.as_str()][..p.tokens as usize]);
                let mut prompt = Vec::with_capacity(class.prompt_tokens as usize);
                prompt.extend_from_slice(shared);
                prompt.extend((shared.len()..class.prompt_tokens as usize).map(|_| rng.below(ordinary)));
                requests.push(PlannedRequest {
                    index: 0,
                    class: class_index,
                    at: Duration::ZERO,
                    prompt,
                    max_tokens: class.output_tokens,
                    ignore_eos: class.ignore_eos,
                });
            }
        }
        if let Some(seed) = self.shuffle_seed {
            shuffle(&mut requests, seed);
        }
        let offsets = arrival_offsets(&self.arrival, requests.len());
        for (index, (request, at)) in requests.iter_mut().zip(offsets).enumerate() {
            request.index = index;
            request.at = at;
        }
        requests.sort_by_key(|r| r.at);
        let pacing = match self.arrival {
            Arrival::ClosedLoop { clients } => Pacing::ClosedLoop { clients },
            _ => Pacing::Open,
        };
        Ok(Schedule { pacing, requests })
    }
}

/// Each group's token sequence, as long as its longest use: a deterministic stream seeded by the
/// group's name.
fn group_prefixes(spec: &WorkloadSpec, ordinary: u32) -> BTreeMap<&str, Vec<u32>> {
    let mut longest: BTreeMap<&str, u32> = BTreeMap::new();
    for prefix in spec.requests.iter().filter_map(|c| c.prefix.as_ref()) {
        let len = longest.entry(prefix.group.as_str()).or_default();
        *len = (*len).max(prefix.tokens);
    }
    longest
        .into_iter()
        .map(|(group, len)| {
            let mut rng = SplitMix64::for_name(group);
            (group, (0..len).map(|_| rng.below(ordinary)).collect())
        })
        .collect()
}

/// Fisher–Yates.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u32 + 1) as usize;
        items.swap(i, j);
    }
}

/// The offset of the i-th request (in expansion order). Values are bounded by validation (at
/// most a week), so the conversions cannot overflow.
fn arrival_offsets(arrival: &Arrival, n: usize) -> Vec<Duration> {
    match arrival {
        Arrival::FixedRate { rate } => (0..n).map(|i| Duration::from_secs_f64(i as f64 / rate)).collect(),
        Arrival::Poisson { rate, seed } => {
            let mut rng = SplitMix64::new(*seed);
            let mut t = 0.0;
            (0..n)
                .map(|i| {
                    if i > 0 {
                        // Exponential gap by inversion: -ln(U) / rate, U in (0, 1].
                        t += -rng.unit_open_closed().ln() / rate;
                    }
                    Duration::from_secs_f64(t)
                })
                .collect()
        }
        Arrival::ClosedLoop { .. } | Arrival::Burst => vec![Duration::ZERO; n],
        Arrival::Trace { at_ms } => at_ms.iter().map(|ms| Duration::from_secs_f64(ms / 1000.0)).collect(),
    }
}
