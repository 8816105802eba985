//! The models a bare runtime-service serves, and which of them a device holds. Both services read
//! this one place, so the pools of `memory-service --device D` hold exactly what
//! `runtime-service --device D` loads: the split cannot drift from the runtime's preloads.

use serde::Deserialize;

use crate::{arch::Arch, device::DeviceSpec};

/// The embedded default models (`serving/models.toml`): what runtime-service serves when no config
/// file lists any, and what memory-service sizes a device's pools for.
pub const DEFAULT_MODELS: &str = include_str!("../models.toml");

/// Tokens computed in one step at most unless configured (vLLM's `max_num_batched_tokens`): it
/// sizes the activation buffers, so memory-service must assume the runtime's default.
pub const DEFAULT_MAX_BATCHED_TOKENS: u32 = 2048;

/// The share of usable memory the KV cache keeps at least when default models are chosen: a
/// device full of weights serves few sequences, so a model that would leave less is left out.
/// A quarter keeps every default model on an H100 and Llama-3.1-8B on an L4, as vLLM serves them.
pub const MIN_KV_DIVISOR: u64 = 4;

/// One default model as both services see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultModel {
    /// Key clients name.
    pub key: String,
    /// Its architecture (weights, activations).
    pub arch: Arch,
    /// Whether a runtime loads it at start-up.
    pub preload: bool,
}

/// The keys of a `[[models]]` entry that sizes depend on; the others (mock_lm, token limits) are
/// runtime-service's alone, and it parses the whole file itself (a test keeps the two readings equal).
#[derive(Debug, Deserialize)]
struct Entry {
    key: String,
    #[serde(default)]
    preload: bool,
    preset: Option<String>,
    arch: Option<Arch>,
}

#[derive(Debug, Deserialize)]
struct File {
    models: Vec<Entry>,
}

/// The embedded default models, in file order; empty only if the embedded file were broken,
/// which the tests rule out.
pub fn default_models() -> Vec<DefaultModel> {
    let Ok(file) = toml::from_str::<File>(DEFAULT_MODELS) else { return Vec::new() };
    file.models
        .into_iter()
        .filter_map(|m| {
            let arch = Arch::for_model(&m.key, m.preset.as_deref(), m.arch).ok()?;
            Some(DefaultModel { key: m.key, arch, preload: m.preload })
        })
        .collect()
}

/// Activation bytes a device reserves for `archs`: the hungriest model's bytes per token for a
/// full step of `max_batched_tokens`, twice (double buffering: step N+1 is built while N runs).
pub fn activation_bytes<'a>(archs: impl IntoIterator<Item = &'a Arch>, max_batched_tokens: u32) -> u64 {
    let per_token = archs.into_iter().map(Arch::activation_bytes_per_token).max().unwrap_or(0);
    per_token.saturating_mul(u64::from(max_batched_tokens)).saturating_mul(2)
}

/// A device's memory as vLLM sizes it: weights first, then activations (its profiling peak), and
/// the rest of the usable memory ([`DeviceSpec::usable_bytes`]) to the KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// The device's usable memory.
    pub usable_bytes: u64,
    /// Weights of the chosen models.
    pub weight_bytes: u64,
    /// Activation buffers for the chosen models.
    pub activation_bytes: u64,
    /// What is left for the KV cache.
    pub kv_bytes: u64,
    /// Indices of the chosen models in the list given.
    pub chosen: Vec<usize>,
    /// The models left out, each with why (numbers included).
    pub left_out: Vec<(String, String)>,
}

/// Chooses which of `models` (key, architecture) a device holds, in list order: a model is taken
/// only if, with its weights added to those already taken and the activations of all of them,
/// the KV cache keeps at least 1/[`MIN_KV_DIVISOR`] of usable memory. Earlier models win, so the
/// list's order is its priority.
pub fn fit(device: &DeviceSpec, models: &[(&str, &Arch)], max_batched_tokens: u32) -> Fit {
    let usable = device.usable_bytes();
    let floor = usable / MIN_KV_DIVISOR;
    let (mut weights, mut archs) = (0u64, Vec::new());
    let (mut chosen, mut left_out) = (Vec::new(), Vec::new());
    for (index, &(key, arch)) in models.iter().enumerate() {
        let with = weights.saturating_add(arch.weight_bytes());
        let activations = activation_bytes(archs.iter().copied().chain([arch]), max_batched_tokens);
        let needed = with.saturating_add(activations);
        if needed.saturating_add(floor) <= usable {
            weights = with;
            archs.push(arch);
            chosen.push(index);
        } else {
            left_out.push((
                key.to_owned(),
                format!(
                    "weights {with} bytes (with the models before it) + activations {activations} bytes \
                     would leave {} of the {usable} usable bytes of device {:?} to the KV cache, less than \
                     the quarter ({floor} bytes) kept for it",
                    usable.saturating_sub(needed),
                    device.name
                ),
            ));
        }
    }
    let activations = activation_bytes(archs.iter().copied(), max_batched_tokens);
    Fit {
        usable_bytes: usable,
        weight_bytes: weights,
        activation_bytes: activations,
        kv_bytes: usable - weights - activations,
        chosen,
        left_out,
    }
}

/// [`fit`] of the embedded default models at the default token budget: what a bare runtime-service
/// on `device` serves, and how a bare memory-service splits it.
pub fn fit_defaults(device: &DeviceSpec) -> Fit {
    let models = default_models();
    let pairs: Vec<_> = models.iter().map(|m| (m.key.as_str(), &m.arch)).collect();
    fit(device, &pairs, DEFAULT_MAX_BATCHED_TOKENS)
}

/// How many runtimes' activation buffers a bare memory-service's `activations` pool holds: one
/// runtime's alone would leave nothing for a second engine's, a rolling update's new pod, or a
/// client sharing the device (the example clients take a few MiB). Four still leave every
/// preset's kv-cache above a quarter of its usable memory.
pub const ACTIVATION_SLOTS: u64 = 4;

/// The three pools memory-service holds for this device, as (name, bytes), sized as vLLM
/// sizes a GPU's memory for what a bare runtime-service on the same device loads
/// ([`fit_defaults`]): `uniforms` holds the weights of the default models that
/// fit, `activations` [`ACTIVATION_SLOTS`] times the runtime's double-buffered step buffers
/// for them, and `kv-cache` the rest of [`DeviceSpec::usable_bytes`].
pub fn pool_split(device: &DeviceSpec) -> [(&'static str, u64); 3] {
    let fit = fit_defaults(device);
    let activations = fit.activation_bytes * ACTIVATION_SLOTS;
    let kv = fit.usable_bytes - fit.weight_bytes - activations;
    [("kv-cache", kv), ("activations", activations), ("uniforms", fit.weight_bytes)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_split_ninety_percent() {
        for name in DeviceSpec::preset_names() {
            let device = DeviceSpec::preset(&name).expect("listed preset");
            device.validate().expect("valid preset");
            let pooled: u64 = pool_split(&device).iter().map(|(_, b)| b).sum();
            assert_eq!(pooled, device.usable_bytes(), "{name}");
        }
        assert!(DeviceSpec::preset("h200").is_none());
    }

    /// The split of each preset, in bytes: (kv-cache, activations, uniforms). Weights are the
    /// default models that fit (see `models::fit`); one runtime's activations are 45,056 bytes
    /// per token (Llama-3.1-8B) or 24,576 (Llama-3.2-1B) × 2048 tokens × 2, and the pool holds
    /// [`ACTIVATION_SLOTS`] of them.
    #[test]
    fn each_preset_splits_into_weights_activations_and_the_rest_for_kv() {
        let all_four = 16_060_522_496 + 2_471_628_800 + 7_642_159_104 + 327_650_304;
        let expected = [
            ("h100-sxm", 77_309_411_328, 184_549_376, all_four),
            ("a100-40gb", 38_654_705_664, 184_549_376, all_four),
            ("l4", 23_192_823_399, 184_549_376, 16_060_522_496 + 327_650_304),
            ("webgpu-laptop", 7_730_941_133, 100_663_296, 2_471_628_800 + 327_650_304),
        ];
        for (name, usable, activations, uniforms) in expected {
            let device = DeviceSpec::preset(name).expect("preset");
            assert_eq!(device.usable_bytes(), usable, "{name}");
            let activations = activations * ACTIVATION_SLOTS;
            let kv = usable - activations - uniforms;
            assert!(kv >= usable / 4, "{name}: the kv-cache keeps at least a quarter");
            assert_eq!(
                pool_split(&device),
                [("kv-cache", kv), ("activations", activations), ("uniforms", uniforms)],
                "{name}"
            );
        }
    }

    fn keys(fit: &Fit) -> Vec<&'static str> {
        fit.chosen.iter().map(|&i| Arch::PRESETS[i]).collect()
    }

    #[test]
    fn the_embedded_list_parses_in_preset_order() {
        let models = default_models();
        let listed: Vec<_> = models.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(listed, Arch::PRESETS, "keys() above relies on this order");
        let preloaded: Vec<_> = models.iter().filter(|m| m.preload).map(|m| m.key.as_str()).collect();
        assert_eq!(preloaded, ["llama-3.1-8b", "distilgpt2"]);
    }

    #[test]
    fn each_preset_keeps_the_models_that_leave_a_quarter_to_the_kv_cache() {
        let fit = |name: &str| fit_defaults(&DeviceSpec::preset(name).expect("preset"));
        let all = ["llama-3.1-8b", "llama-3.2-1b", "phi-3-mini", "distilgpt2"];
        assert_eq!(keys(&fit("h100-sxm")), all);
        assert_eq!(keys(&fit("a100-40gb")), all);
        // 16.06 GB of Llama-3.1-8B leaves 6.95 GB of the L4's 23.19; Llama-3.2-1B would leave 4.5.
        assert_eq!(keys(&fit("l4")), ["llama-3.1-8b", "distilgpt2"]);
        assert_eq!(keys(&fit("webgpu-laptop")), ["llama-3.2-1b", "distilgpt2"]);
        let laptop = fit("webgpu-laptop");
        assert_eq!(laptop.left_out.len(), 2);
        assert!(laptop.left_out[0].1.contains("16060522496"), "{}", laptop.left_out[0].1);
        for name in DeviceSpec::preset_names() {
            let fit = fit(&name);
            assert!(fit.kv_bytes >= fit.usable_bytes / MIN_KV_DIVISOR, "{name}: {fit:?}");
            assert_eq!(fit.weight_bytes + fit.activation_bytes + fit.kv_bytes, fit.usable_bytes);
        }
    }
}
