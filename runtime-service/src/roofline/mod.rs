//! The roofline that prices one scheduler step from a device's and a model's numbers (their
//! presets live in `serving`: memory-service sizes its pools from them too). Pure functions of plain numbers, so a reader can check any step
//! time by hand (inference-sim's `docs/concepts/roofline.md` does the same).

use std::time::Duration;

use serving::{arch::Arch, device::DeviceSpec};

/// One sequence's share of a step: `tokens` new tokens (1 for a decode, a chunk for a prefill)
/// on top of `context` tokens already in its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Tokens computed this step.
    pub tokens: u32,
    /// Tokens already in the KV cache.
    pub context: u32,
}

/// What a step is doing, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Only decodes (one token per sequence).
    Decode,
    /// Only prompt chunks.
    Prefill,
    /// Both in one batch (chunked prefill).
    Mixed,
}

impl Phase {
    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Prefill => "prefill",
            Phase::Mixed => "mixed",
        }
    }
}

/// The price of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    /// CPU time to prepare it (schedule, sample, detokenize).
    pub cpu: Duration,
    /// GPU time to run it.
    pub gpu: Duration,
    /// Bytes it reads from device memory.
    pub bytes: f64,
    /// FLOPs it performs.
    pub flops: f64,
    /// Whether the bandwidth term (not the compute term) set the GPU time.
    pub memory_bound: bool,
    /// Decode, prefill or both.
    pub phase: Phase,
}

/// Prices steps of one model on one device.
#[derive(Debug, Clone)]
pub struct Roofline {
    weight_bytes: f64,
    kv_bytes_per_token: f64,
    dense_flops_per_token: f64,
    attention_flops_per_pair: f64,
    bandwidth: f64,
    compute: f64,
    launch: f64,
    cpu_per_step: f64,
    cpu_per_seq: f64,
}

impl Roofline {
    /// The roofline of `arch` on `device`, at the device's achievable fractions.
    pub fn new(device: &DeviceSpec, arch: &Arch) -> Self {
        Roofline {
            weight_bytes: arch.weight_bytes() as f64,
            kv_bytes_per_token: arch.kv_bytes_per_token() as f64,
            dense_flops_per_token: arch.dense_flops_per_token(),
            attention_flops_per_pair: arch.attention_flops_per_pair(),
            bandwidth: device.bandwidth_bytes_per_s * device.bandwidth_efficiency,
            compute: device.flops_per_s * device.flops_efficiency,
            launch: device.launch_overhead_s,
            cpu_per_step: device.cpu_per_step_s,
            cpu_per_seq: device.cpu_per_seq_s,
        }
    }

    /// The cost of one step over `batch`: GPU time is max(bytes / bandwidth, FLOPs / compute)
    /// plus the launch overhead, where bytes are the weights (read once for the whole batch) plus
    /// every sequence's KV cache, and FLOPs are the weight matmuls of every new token plus
    /// attention over its context. CPU time is a per-step cost plus a per-sequence cost.
    pub fn step(&self, batch: impl IntoIterator<Item = Work>) -> StepCost {
        let (mut seqs, mut tokens, mut kv_tokens, mut pairs) = (0u32, 0f64, 0f64, 0f64);
        let (mut decodes, mut prefills) = (false, false);
        for work in batch {
            let (c, p) = (f64::from(work.tokens), f64::from(work.context));
            seqs += 1;
            tokens += c;
            kv_tokens += p + c;
            // Query i of the chunk attends to the p cached tokens and to itself and those before it.
            pairs += c * p + c * (c + 1.0) / 2.0;
            if work.tokens == 1 && work.context > 0 {
                decodes = true;
            } else {
                prefills = true;
            }
        }
        let bytes = self.weight_bytes + self.kv_bytes_per_token * kv_tokens;
        let flops = self.dense_flops_per_token * tokens + self.attention_flops_per_pair * pairs;
        let (memory_time, compute_time) = (bytes / self.bandwidth, flops / self.compute);
        let gpu = memory_time.max(compute_time) + self.launch;
        let cpu = self.cpu_per_step + self.cpu_per_seq * f64::from(seqs);
        let phase = match (decodes, prefills) {
            (true, false) => Phase::Decode,
            (false, _) => Phase::Prefill,
            (true, true) => Phase::Mixed,
        };
        StepCost {
            cpu: Duration::from_secs_f64(cpu),
            gpu: Duration::from_secs_f64(gpu),
            bytes,
            flops,
            memory_bound: memory_time >= compute_time,
            phase,
        }
    }

    /// The physical floor of a decode step at batch 1: the weights read at the datasheet bandwidth.
    pub fn weights_floor(device: &DeviceSpec, arch: &Arch) -> Duration {
        Duration::from_secs_f64(arch.weight_bytes() as f64 / device.bandwidth_bytes_per_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100_llama() -> (DeviceSpec, Arch, Roofline) {
        let device = DeviceSpec::preset("h100-sxm").expect("preset");
        let arch = Arch::preset("llama-3.1-8b").expect("preset");
        let roofline = Roofline::new(&device, &arch);
        (device, arch, roofline)
    }

    #[test]
    fn a_decode_step_never_beats_weights_over_bandwidth() {
        let (device, arch, roofline) = h100_llama();
        let floor = Roofline::weights_floor(&device, &arch);
        for batch in [1, 8, 64, 256] {
            let step = roofline.step((0..batch).map(|_| Work { tokens: 1, context: 1024 }));
            assert!(step.gpu > floor, "batch {batch}: {:?} <= {floor:?}", step.gpu);
            assert_eq!(step.phase, Phase::Decode);
            assert!(step.memory_bound, "decode is memory-bound at batch {batch}");
        }
        // Batch 1 on an H100: 16.06 GB / (3.35 TB/s × 0.72) + 0.4 ms ≈ 7.06 ms.
        let one = roofline.step([Work { tokens: 1, context: 1024 }]).gpu.as_secs_f64() * 1e3;
        assert!((6.9..7.2).contains(&one), "{one} ms");
    }

    #[test]
    fn decode_steps_grow_sublinearly_and_prefill_is_compute_bound() {
        let (_, _, roofline) = h100_llama();
        let at = |n: u32| roofline.step((0..n).map(|_| Work { tokens: 1, context: 1024 })).gpu;
        // 64× the sequences cost far less than 64× the time: the weights are read once.
        assert!(at(64) < at(1) * 4 && at(64) > at(1));
        let prefill = roofline.step([Work { tokens: 1024, context: 0 }]);
        assert!(!prefill.memory_bound);
        assert_eq!(prefill.phase, Phase::Prefill);
        let mixed = roofline.step([Work { tokens: 512, context: 0 }, Work { tokens: 1, context: 9 }]);
        assert_eq!(mixed.phase, Phase::Mixed);
    }
}
