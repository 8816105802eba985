//! Published vLLM measurements (`fidelity/published.toml`, sources in `SOURCES.md`): each point
//! becomes a scenario (a workload and the runtime flags for its GPU) or is skipped with a reason.

mod compare;
mod limits;
mod read;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::workload::{Arrival, RequestClass, WorkloadSpec};

pub use compare::{Comparison, Latency, Mape, MapeRow, Metric, Stat, compare, comparison_table, mape};
pub use limits::{VllmLimits, vllm_limits};
pub use read::{find_scenario, list, read_mappings};

/// The device presets runtime-service has (`--device`); a point on another GPU is skipped. A
/// test checks this list against serving's.
pub const RUNTIME_PRESETS: [&str; 6] = ["h100-sxm", "a100-80gb", "a100-40gb", "l40s", "l4", "webgpu-laptop"];

/// The runtime model that stands for the published one: Llama-3-8B and 3.1-8B share the
/// architecture (32 layers, d = 4096, GQA 32/8, vocab 128,256); 3.1 changes only RoPE scaling.
fn runtime_model(model: &str) -> Option<&'static str> {
    matches!(model, "llama-3-8b" | "llama-3.1-8b").then_some("llama-3.1-8b")
}

/// One `[[point]]`: the keys that describe it, typed (their meanings are in the header of
/// `published.toml`); the metrics and any key this struct does not know are in `rest`, so a new
/// key never breaks the bench ([`Point::unknown_keys`] lists what is neither, and a test checks
/// the real file has none, so a metric added there is noticed and mapped).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Point {
    pub id: String,
    pub source: String,
    #[serde(default)]
    pub source_note: String,
    pub engine: String,
    #[serde(default)]
    pub engine_note: String,
    pub gpu: String,
    #[serde(default)]
    pub gpu_note: String,
    pub model: String,
    #[serde(default)]
    pub model_id: String,
    #[serde(default)]
    pub dtype: String,
    pub tensor_parallel: Option<u32>,
    pub input_tokens: Option<u32>,
    pub output_tokens: Option<u32>,
    /// Per-request prompt lengths, in request order (benchmark_serving.py's `input_lens`).
    pub input_lens: Option<Vec<u32>>,
    /// Per-request generated lengths, same order (0 = empty text).
    pub output_lens: Option<Vec<u32>>,
    #[serde(default)]
    pub dataset: String,
    #[serde(default)]
    pub lengths_note: String,
    pub ignore_eos: Option<bool>,
    /// "offline" (in-process `LLM.generate`) or "openai-server".
    pub api: String,
    /// "sequential", "burst", "rate" or "concurrency".
    pub load: String,
    pub request_rate: Option<f64>,
    pub concurrency: Option<u32>,
    pub num_prompts: u32,
    #[serde(default)]
    pub regime: String,
    pub max_num_seqs: Option<u32>,
    pub max_num_batched_tokens: Option<u32>,
    pub max_model_len: Option<u32>,
    #[serde(default)]
    pub caveat: String,
    #[serde(default)]
    pub derived_note: String,
    /// The metrics, and keys nobody knows yet.
    #[serde(flatten)]
    pub rest: BTreeMap<String, toml::Value>,
}

impl Point {
    /// The published figure of `metric`, if the point has it.
    pub fn metric(&self, metric: Metric) -> Option<f64> {
        match self.rest.get(&metric.key())? {
            toml::Value::Float(v) => Some(*v),
            toml::Value::Integer(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// Keys that are neither a described field nor a known metric.
    pub fn unknown_keys(&self) -> Vec<&str> {
        let metrics: Vec<String> = Metric::all().into_iter().map(Metric::key).collect();
        self.rest.keys().filter(|k| !metrics.contains(k)).map(String::as_str).collect()
    }
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    point: Vec<Point>,
}

/// The points of a `published.toml`.
pub fn parse(text: &str) -> Result<Vec<Point>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(file.point)
}

/// What to do with a point.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapping {
    /// Replay it.
    Replay(Box<Scenario>),
    /// It cannot be replayed; why.
    Skip {
        /// The point's id.
        id: String,
        /// Its GPU.
        gpu: String,
        /// Why not.
        reason: String,
    },
}

/// A point to replay: the workload and the runtime it runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The published point.
    pub point: Point,
    /// Its load, with exact lengths.
    pub workload: WorkloadSpec,
    /// How to start runtime-service for it.
    pub runtime: RuntimeSettings,
    /// Where the replay departs from the published run, for the report.
    pub notes: Vec<String>,
}

/// The runtime-service settings that stand for the published setup.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    /// `--device`: the GPU's preset.
    pub device: String,
    /// `--engine-model`: the model the engine dialect serves.
    pub engine_model: String,
    /// `--max-batch-size` (vLLM's `max_num_seqs`), `--max-batched-tokens`
    /// (`max_num_batched_tokens`), `--prefix-caching`, and where they come from.
    pub limits: VllmLimits,
    /// `--queue-capacity`, when the burst is larger than a full batch plus the default queue
    /// (vLLM queues without limit).
    pub queue_capacity: Option<u32>,
    /// `--scheduler`: "sequential" for vLLM before V1, whose CPU work between steps (scheduling,
    /// sampling, output processing) stalls the GPU, multi-step scheduling included (it spreads
    /// the scheduling over N steps, not the sampling); "overlapped" from V1 on.
    pub scheduler: &'static str,
    /// `--decode-steps`: vLLM 0.6's `--num-scheduler-steps` (decode steps per schedule).
    pub decode_steps: u32,
}

/// The runtime's TTFT, idle-gap and stream-lifetime limits in a replay: an hour, past any
/// published run (a preempted sequence waits between two tokens as long as it takes).
pub const SUITE_TIME_LIMIT_MS: u64 = 3_600_000;

/// runtime-service's default `--queue-capacity`.
const RUNTIME_QUEUE_CAPACITY: u32 = 1024;

impl RuntimeSettings {
    /// The flags, ready for a command line.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--device".to_owned(),
            self.device.clone(),
            "--engine-model".to_owned(),
            self.engine_model.clone(),
            "--max-batch-size".to_owned(),
            self.limits.max_num_seqs.to_string(),
            "--max-batched-tokens".to_owned(),
            self.limits.max_num_batched_tokens.to_string(),
            "--prefix-caching".to_owned(),
            if self.limits.prefix_caching { "on" } else { "off" }.to_owned(),
            "--scheduler".to_owned(),
            self.scheduler.to_owned(),
            "--chunked-prefill".to_owned(),
            if self.limits.chunked_prefill { "on" } else { "off" }.to_owned(),
            "--decode-steps".to_owned(),
            self.decode_steps.to_string(),
            // vLLM has no time limits of its own: a burst larger than the KV cache waits and is
            // preempted for minutes before it finishes, and must not be cut off for it.
            "--ttft-timeout-ms".to_owned(),
            SUITE_TIME_LIMIT_MS.to_string(),
            "--idle-timeout-ms".to_owned(),
            SUITE_TIME_LIMIT_MS.to_string(),
            "--max-stream-lifetime-ms".to_owned(),
            SUITE_TIME_LIMIT_MS.to_string(),
        ];
        if let Some(capacity) = self.queue_capacity {
            flags.extend(["--queue-capacity".to_owned(), capacity.to_string()]);
        }
        flags
    }
}

/// The scenario of `point`, or why it has none.
pub fn map_point(point: &Point) -> Mapping {
    match scenario(point) {
        Ok(scenario) => Mapping::Replay(Box::new(scenario)),
        Err(reason) => Mapping::Skip { id: point.id.clone(), gpu: point.gpu.clone(), reason },
    }
}

fn scenario(point: &Point) -> Result<Scenario, String> {
    if !RUNTIME_PRESETS.contains(&point.gpu.as_str()) {
        let presets = RUNTIME_PRESETS.join(", ");
        return Err(format!("runtime-service has no device preset for {} (presets: {presets})", point.gpu));
    }
    let model =
        runtime_model(&point.model).ok_or_else(|| format!("no runtime model stands for {}", point.model))?;
    if point.tensor_parallel.unwrap_or(1) != 1 {
        return Err("tensor parallel > 1: the runtime simulates one device".into());
    }
    let mut notes = Vec::new();
    let requests = match (&point.input_lens, &point.output_lens, point.input_tokens, point.output_tokens) {
        (Some(inputs), Some(outputs), _, _) => per_request(point, inputs, outputs, &mut notes)?,
        (_, _, Some(prompt_tokens), Some(output_tokens)) => vec![RequestClass {
            count: point.num_prompts,
            prompt_tokens,
            output_tokens,
            // Exact lengths are what the point measured; only a source that says otherwise
            // lets the model stop early.
            ignore_eos: point.ignore_eos.unwrap_or(true),
            prefix: None,
            seed: 0,
        }],
        _ => {
            return Err(format!(
                "lengths not published (dataset {:?}): an exact-length replay would not be the same load",
                point.dataset
            ));
        }
    };
    let arrival = match (point.load.as_str(), point.request_rate, point.concurrency) {
        ("sequential", _, _) => Arrival::ClosedLoop { clients: 1 },
        ("burst", _, _) => Arrival::Burst,
        // vLLM's and SGLang's benchmarks draw Poisson arrivals at --request-rate.
        ("rate", Some(rate), _) => Arrival::Poisson { rate, seed: 0 },
        ("concurrency", _, Some(clients)) => Arrival::ClosedLoop { clients },
        (load, _, _) => {
            return Err(format!("load {load:?} without what it needs (request_rate, concurrency)"));
        }
    };
    let steps = limits::scheduler_steps(point);
    if steps > 1 {
        notes.push(format!(
            "vLLM streamed {steps} tokens per chunk (multi-step), the runtime one: ITL not compared"
        ));
    }
    let workload = WorkloadSpec { arrival, requests, shuffle_seed: None };
    workload.validate().map_err(|e| e.to_string())?;
    let limits = vllm_limits(point);
    let full = u64::from(limits.max_num_seqs) + u64::from(RUNTIME_QUEUE_CAPACITY);
    let queue_capacity = (u64::from(point.num_prompts) > full).then_some(point.num_prompts);
    Ok(Scenario {
        point: point.clone(),
        workload,
        notes,
        runtime: RuntimeSettings {
            device: point.gpu.clone(),
            engine_model: model.into(),
            limits,
            queue_capacity,
            scheduler: if limits::is_v1(point) { "overlapped" } else { "sequential" },
            decode_steps: steps,
        },
    })
}

/// One class per request, in the published order, each forced to its published lengths: the
/// source's model stopped at EOS, ours must stop at the same token count.
fn per_request(
    point: &Point,
    inputs: &[u32],
    outputs: &[u32],
    notes: &mut Vec<String>,
) -> Result<Vec<RequestClass>, String> {
    let n = point.num_prompts as usize;
    if inputs.len() != n || outputs.len() != n {
        let (i, o) = (inputs.len(), outputs.len());
        return Err(format!("input_lens ({i}) and output_lens ({o}) do not list num_prompts ({n}) requests"));
    }
    if point.ignore_eos != Some(true) {
        notes.push("replayed with ignore_eos so each request generates its published output_lens".into());
    }
    let empty = outputs.iter().filter(|&&o| o == 0).count();
    if empty > 0 {
        notes.push(format!("{empty} requests with output_lens 0 (empty text) are replayed with 1 token"));
    }
    Ok(inputs
        .iter()
        .zip(outputs)
        .map(|(&prompt_tokens, &output_tokens)| RequestClass {
            count: 1,
            prompt_tokens,
            output_tokens: output_tokens.max(1),
            ignore_eos: true,
            prefix: None,
            seed: 0,
        })
        .collect())
}
