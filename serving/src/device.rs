//! Device presets: the published numbers of real accelerators that both services size themselves
//! from. runtime-service turns them into step times (its roofline); memory-service turns a device's
//! memory into the three pools (`--device`) sized for what a bare runtime-service loads on it, so
//! a bare start of both on the same device fits together.

use serde::Deserialize;

const GIB: u64 = 1 << 30;

/// One accelerator, as its datasheet and measured serving runs describe it.
///
/// The achievable fractions are what inference engines actually reach, not the datasheet: vLLM
/// decoding Llama-3.1-8B at one request on an A100-40GB reaches about 77% of the memory-bandwidth
/// ceiling (docs/simulated-device.md, "Fidelity"), and large prefills reach 50–65% of dense tensor-core FLOP/s.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Preset name (`h100-sxm`), as given to `--device`.
    pub name: String,
    /// Device memory, bytes.
    pub memory_bytes: u64,
    /// Peak memory bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Peak dense FLOP/s for the weights' data type (BF16 tensor cores on datacenter GPUs).
    pub flops_per_s: f64,
    /// Fraction of the peak bandwidth the weight reads of a step (the GEMMs and GEMVs of a
    /// small batch) achieve, (0, 1].
    pub bandwidth_efficiency: f64,
    /// Fraction of the peak FLOP/s the GEMMs of a large batch (prefill) achieve, (0, 1].
    pub flops_efficiency: f64,
    /// Fraction of the peak bandwidth paged attention achieves reading the KV cache (scattered
    /// blocks, shorter bursts than weight reads), (0, 1]. Default: `bandwidth_efficiency`.
    #[serde(default)]
    pub kv_bandwidth_efficiency: Option<f64>,
    /// Fraction of the peak FLOP/s prefill attention (FlashAttention) achieves, (0, 1]. Default:
    /// `flops_efficiency`.
    #[serde(default)]
    pub attention_flops_efficiency: Option<f64>,
    /// Fixed GPU cost of one step (kernel launches, synchronisation), seconds.
    pub launch_overhead_s: f64,
    /// CPU cost of one step whatever its size (scheduling, batch building), seconds.
    pub cpu_per_step_s: f64,
    /// CPU cost per sequence in a step (sampling, detokenizing, streaming), seconds.
    pub cpu_per_seq_s: f64,
    /// CPU cost per prompt token a step computes (input ids, positions and slot mappings built
    /// and copied to the device), seconds. Default 0.
    #[serde(default)]
    pub cpu_per_prompt_token_s: f64,
    /// Fixed cost of the serving front end per request, before the engine core sees it (the
    /// API server's parsing, tokenization and request setup; vLLM runs it in another process,
    /// so it delays the request without holding the device), seconds. Default 0.
    #[serde(default)]
    pub frontend_s: f64,
}

impl DeviceSpec {
    /// The embedded preset called `name`.
    pub fn preset(name: &str) -> Option<DeviceSpec> {
        presets().into_iter().find(|d| d.name == name)
    }

    /// Names of the embedded presets.
    pub fn preset_names() -> Vec<String> {
        presets().into_iter().map(|d| d.name).collect()
    }

    /// The memory a serving engine may use on this device: all but a tenth (vLLM's default
    /// `gpu_memory_utilization` of 0.9; the rest is the CUDA context, the allocator's
    /// fragmentation and other processes). Every bound on a device's memory starts from it.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_bytes - self.memory_bytes / 10
    }

    /// Fraction of the peak bandwidth reading the KV cache achieves.
    pub fn kv_bandwidth_efficiency(&self) -> f64 {
        self.kv_bandwidth_efficiency.unwrap_or(self.bandwidth_efficiency)
    }

    /// Fraction of the peak FLOP/s prefill attention achieves.
    pub fn attention_flops_efficiency(&self) -> f64 {
        self.attention_flops_efficiency.unwrap_or(self.flops_efficiency)
    }

    /// Checks that every number is usable; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        // Floors well below any real device, so step times stay finite and in range.
        let rates =
            [("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s), ("flops_per_s", self.flops_per_s)];
        for (field, v) in rates {
            if !(v.is_finite() && (1e6..=1e18).contains(&v)) {
                return Err(format!("device {:?}: {field} = {v} must be between 1e6 and 1e18", self.name));
            }
        }
        for (field, v) in [
            ("bandwidth_efficiency", self.bandwidth_efficiency),
            ("flops_efficiency", self.flops_efficiency),
            ("kv_bandwidth_efficiency", self.kv_bandwidth_efficiency()),
            ("attention_flops_efficiency", self.attention_flops_efficiency()),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(format!("device {:?}: {field} = {v} must be in (0, 1]", self.name));
            }
        }
        for (field, v) in [
            ("launch_overhead_s", self.launch_overhead_s),
            ("cpu_per_step_s", self.cpu_per_step_s),
            ("cpu_per_seq_s", self.cpu_per_seq_s),
            ("cpu_per_prompt_token_s", self.cpu_per_prompt_token_s),
            ("frontend_s", self.frontend_s),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(format!("device {:?}: {field} = {v} must be between 0 and 1 s", self.name));
            }
        }
        if self.memory_bytes < (1 << 20) {
            return Err(format!("device {:?}: memory_bytes must be at least 1 MiB", self.name));
        }
        Ok(())
    }
}

/// The serving front end's cost per request on the datacenter presets: fitted to the Lambda
/// vLLM 0.6.0 server runs in `fidelity/published.toml` (a burst of ten ShareGPT prompts: the
/// first tokens came about 25–30 ms after one prefill step of them all, on the H100 and the
/// A100-80GB alike). vLLM V1's front end is lighter; set `frontend_s` in a `[[devices]]` table
/// to match a measurement of your own (docs/fidelity.md).
const FRONTEND_S: f64 = 0.025;

/// A datacenter GPU as vLLM drives it: its datasheet memory, bandwidth and dense BF16 FLOP/s,
/// the (weight bandwidth, GEMM FLOP/s) fractions it achieves, its launch overhead, and the CPU
/// and front-end costs of the Python engine, which are the same on every card.
fn datacenter(
    name: &str,
    memory_bytes: u64,
    bandwidth_bytes_per_s: f64,
    flops_per_s: f64,
    (bandwidth_efficiency, flops_efficiency): (f64, f64),
    launch_overhead_s: f64,
) -> DeviceSpec {
    DeviceSpec {
        name: name.into(),
        memory_bytes,
        bandwidth_bytes_per_s,
        flops_per_s,
        bandwidth_efficiency,
        flops_efficiency,
        kv_bandwidth_efficiency: None,
        attention_flops_efficiency: None,
        launch_overhead_s,
        cpu_per_step_s: 1.0e-3,
        cpu_per_seq_s: 25e-6,
        cpu_per_prompt_token_s: 0.0,
        frontend_s: FRONTEND_S,
    }
}

/// The embedded presets. Bandwidth and FLOP/s are NVIDIA's datasheet figures (H100 SXM5: 3.35 TB/s
/// HBM3, 989 TFLOP/s dense BF16; A100 40GB: 1.555 TB/s, 312 TFLOP/s; A100 80GB SXM: 2.039 TB/s
/// HBM2e, 312 TFLOP/s; L40S: 864 GB/s GDDR6, 362 TFLOP/s; L4: 300 GB/s, 121 TFLOP/s);
/// the laptop is an integrated GPU as WebGPU sees it. CPU costs are what a Python engine spends per
/// step and per sequence (vLLM's v0.6 notes put its CPU share near half of a small decode step
/// before overlap); the browser engines pay more per step (JavaScript and WebGPU dispatch).
fn presets() -> Vec<DeviceSpec> {
    vec![
        datacenter("h100-sxm", 80 * GIB, 3.35e12, 989e12, (0.72, 0.6), 0.4e-3),
        datacenter("a100-80gb", 80 * GIB, 2.039e12, 312e12, (0.78, 0.6), 0.4e-3),
        datacenter("a100-40gb", 40 * GIB, 1.555e12, 312e12, (0.78, 0.6), 0.4e-3),
        // 48 GB of GDDR6, of which the driver shows 46,068 MiB.
        datacenter("l40s", 46_068 << 20, 864e9, 362e12, (0.8, 0.5), 0.5e-3),
        datacenter("l4", 24 * GIB, 300e9, 121e12, (0.8, 0.5), 0.5e-3),
        DeviceSpec {
            name: "webgpu-laptop".into(),
            memory_bytes: 8 * GIB,
            bandwidth_bytes_per_s: 100e9,
            flops_per_s: 4.5e12,
            bandwidth_efficiency: 0.6,
            flops_efficiency: 0.35,
            kv_bandwidth_efficiency: None,
            attention_flops_efficiency: None,
            launch_overhead_s: 2.0e-3,
            cpu_per_step_s: 3.0e-3,
            cpu_per_seq_s: 0.5e-3,
            cpu_per_prompt_token_s: 0.0,
            frontend_s: 0.0,
        },
    ]
}
