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

impl Work {
    /// One new token on top of a cache: a decode (a prompt's first chunk or a recompute is not).
    pub fn is_decode(self) -> bool {
        self.tokens == 1 && self.context > 0
    }
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
    lm_head_flops_per_sample: f64,
    attention_flops_per_pair: f64,
    weight_bandwidth: f64,
    kv_bandwidth: f64,
    gemm_compute: f64,
    attention_compute: f64,
    launch: f64,
    cpu_per_step: f64,
    cpu_per_seq: f64,
    cpu_per_prompt_token: f64,
}

impl Roofline {
    /// The roofline of `arch` on `device`, at the device's achievable fractions.
    pub fn new(device: &DeviceSpec, arch: &Arch) -> Self {
        Roofline {
            weight_bytes: arch.step_weight_bytes() as f64,
            kv_bytes_per_token: arch.kv_bytes_per_token() as f64,
            dense_flops_per_token: arch.dense_flops_per_token(),
            lm_head_flops_per_sample: arch.lm_head_flops_per_sample(),
            attention_flops_per_pair: arch.attention_flops_per_pair(),
            weight_bandwidth: device.bandwidth_bytes_per_s * device.bandwidth_efficiency,
            kv_bandwidth: device.bandwidth_bytes_per_s * device.kv_bandwidth_efficiency(),
            gemm_compute: device.flops_per_s * device.flops_efficiency,
            attention_compute: device.flops_per_s * device.attention_flops_efficiency(),
            launch: device.launch_overhead_s,
            cpu_per_step: device.cpu_per_step_s,
            cpu_per_seq: device.cpu_per_seq_s,
            cpu_per_prompt_token: device.cpu_per_prompt_token_s,
        }
    }

    /// The cost of one step over `batch`, priced as the two kinds of kernel a forward pass
    /// launches one after the other, each at its own roofline:
    ///
    /// - the GEMMs, over every new token of the batch at once: max(weights read ÷ weight
    ///   bandwidth, FLOPs ÷ GEMM compute), where the weights are read once for the whole batch
    ///   (the input embedding is gathered, not read) and the LM head runs once per sequence;
    /// - attention, one kernel over every sequence (vLLM V1's unified attention): max(KV bytes ÷
    ///   KV bandwidth, attention FLOPs ÷ attention compute);
    ///
    /// plus the launch overhead. A mixed step therefore pays its prefill's GEMMs and its decodes'
    /// KV reads, where one roofline over the sums (the max of the two totals) would let the
    /// decodes ride free inside the prefill. CPU time is a per-step cost, a per-sequence cost
    /// and a cost per prompt token the step computes.
    ///
    /// The LM head is charged once per sequence in the step: every decode samples, and a prompt
    /// chunk samples when it ends the prompt; only a middle chunk of a prompt longer than the
    /// token budget is overcharged, by one row of logits against thousands of tokens of GEMMs.
    pub fn step(&self, batch: impl IntoIterator<Item = Work>) -> StepCost {
        let (mut seqs, mut tokens, mut kv_tokens, mut pairs) = (0u32, 0f64, 0f64, 0f64);
        let mut prompt_tokens = 0f64;
        let (mut decodes, mut prefills) = (false, false);
        for work in batch {
            let (c, p) = (f64::from(work.tokens), f64::from(work.context));
            seqs += 1;
            tokens += c;
            kv_tokens += p + c;
            // Query i of the chunk attends to the p cached tokens and to itself and those before it.
            pairs += c * p + c * (c + 1.0) / 2.0;
            if work.is_decode() {
                decodes = true;
            } else {
                prefills = true;
                prompt_tokens += c;
            }
        }
        let gemm_flops =
            self.dense_flops_per_token * tokens + self.lm_head_flops_per_sample * f64::from(seqs);
        let kv_bytes = self.kv_bytes_per_token * kv_tokens;
        let attention_flops = self.attention_flops_per_pair * pairs;
        let (gemm_memory, gemm_compute) =
            (self.weight_bytes / self.weight_bandwidth, gemm_flops / self.gemm_compute);
        let (attention_memory, attention_compute) =
            (kv_bytes / self.kv_bandwidth, attention_flops / self.attention_compute);
        let gpu = gemm_memory.max(gemm_compute) + attention_memory.max(attention_compute) + self.launch;
        let cpu = self.cpu_per_step
            + self.cpu_per_seq * f64::from(seqs)
            + self.cpu_per_prompt_token * prompt_tokens;
        let phase = match (decodes, prefills) {
            (true, false) => Phase::Decode,
            (false, _) => Phase::Prefill,
            (true, true) => Phase::Mixed,
        };
        StepCost {
            cpu: Duration::from_secs_f64(cpu),
            gpu: Duration::from_secs_f64(gpu),
            bytes: self.weight_bytes + kv_bytes,
            flops: gemm_flops + attention_flops,
            memory_bound: gemm_memory + attention_memory >= gemm_compute + attention_compute,
            phase,
        }
    }

    /// The physical floor of a decode step at batch 1: the weights one step reads, at the
    /// datasheet bandwidth.
    pub fn weights_floor(device: &DeviceSpec, arch: &Arch) -> Duration {
        Duration::from_secs_f64(arch.step_weight_bytes() as f64 / device.bandwidth_bytes_per_s)
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
        // Batch 1 on an H100: the weights but the gathered embedding, 15.01 GB / (3.35 TB/s ×
        // 0.72), plus 1,025 tokens of KV (134 MB) at the same rate, plus 0.4 ms ≈ 6.68 ms.
        let one = roofline.step([Work { tokens: 1, context: 1024 }]).gpu.as_secs_f64() * 1e3;
        assert!((6.6..6.8).contains(&one), "{one} ms");
    }

    #[test]
    fn decode_time_grows_with_context_by_exactly_the_kv_bytes() {
        let (device, arch, roofline) = h100_llama();
        let kv_rate = device.bandwidth_bytes_per_s * device.kv_bandwidth_efficiency();
        for batch in [1u32, 16, 128] {
            let at = |context: u32| {
                roofline.step((0..batch).map(|_| Work { tokens: 1, context })).gpu.as_secs_f64()
            };
            let grown = at(4096) - at(1024);
            let expected = f64::from(batch) * 3072.0 * arch.kv_bytes_per_token() as f64 / kv_rate;
            assert!((grown - expected).abs() < 1e-9, "batch {batch}: {grown} s vs {expected} s");
        }
    }

    #[test]
    fn prefill_cost_follows_the_formula_in_tokens_and_context() {
        let (device, arch, roofline) = h100_llama();
        let gemm = device.flops_per_s * device.flops_efficiency;
        let attention = device.flops_per_s * device.attention_flops_efficiency();
        let kv_rate = device.bandwidth_bytes_per_s * device.kv_bandwidth_efficiency();
        let weights =
            arch.step_weight_bytes() as f64 / (device.bandwidth_bytes_per_s * device.bandwidth_efficiency);
        for (c, p) in [(512u32, 0u32), (2048, 0), (1024, 3072), (256, 8192)] {
            let (cf, pf) = (f64::from(c), f64::from(p));
            let flops = arch.dense_flops_per_token() * cf + arch.lm_head_flops_per_sample();
            let pairs = cf * pf + cf * (cf + 1.0) / 2.0;
            let kv = arch.kv_bytes_per_token() as f64 * (cf + pf);
            let expected = weights.max(flops / gemm)
                + (kv / kv_rate).max(pairs * arch.attention_flops_per_pair() / attention)
                + device.launch_overhead_s;
            let got = roofline.step([Work { tokens: c, context: p }]).gpu.as_secs_f64();
            assert!((got - expected).abs() < 1e-9, "{c} tokens on {p}: {got} vs {expected}");
        }
        // Twice the tokens, about twice the time once compute-bound; context adds attention.
        let t = |c: u32, p: u32| roofline.step([Work { tokens: c, context: p }]).gpu.as_secs_f64();
        assert!((t(4096, 0) / t(2048, 0) - 2.0).abs() < 0.1);
        assert!(t(1024, 8192) > t(1024, 0));
    }

    #[test]
    fn a_mixed_step_pays_its_prefill_gemms_and_its_decodes_kv_reads() {
        let (_, _, roofline) = h100_llama();
        let prefill = [Work { tokens: 2048, context: 0 }];
        let decodes = || (0..64).map(|_| Work { tokens: 1, context: 2048 });
        let alone = roofline.step(prefill).gpu;
        let mixed = roofline.step(prefill.into_iter().chain(decodes())).gpu;
        // The decodes' 17 GB of KV (7.2 ms at the H100's KV rate) are read by the attention
        // kernel whatever the GEMMs cost: 5 ms more at least, where one roofline over the sums
        // hid them under the prefill's compute and charged only their 64 tokens of GEMMs (~2 ms).
        assert!(mixed > alone + Duration::from_millis(5), "{mixed:?} vs {alone:?}");
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

    #[test]
    fn cpu_time_grows_with_the_prompt_tokens_a_step_computes() {
        let (mut device, arch, _) = h100_llama();
        device.cpu_per_prompt_token_s = 1e-6;
        let roofline = Roofline::new(&device, &arch);
        let cpu = |work: Work| roofline.step([work]).cpu.as_secs_f64();
        let decode = cpu(Work { tokens: 1, context: 100 });
        let prefill = cpu(Work { tokens: 2000, context: 0 });
        assert!((prefill - decode - 2000e-6).abs() < 1e-9, "{prefill} vs {decode}");
    }
}
