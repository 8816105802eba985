//! The device's memory against the models: a bare start serves the default models that fit the
//! device (the rule and the numbers are `serving::models`, shared with memory-service's split);
//! models a config file preloads must fit, or the runtime refuses to start.

use super::{Config, ConfigError, DEFAULT_MODELS, parse_models};

impl Config {
    /// Replaces the models with the embedded defaults that fit this device (see
    /// [`serving::models::fit`]), for a start whose config file lists none. Returns the models
    /// left out, each with why, for the caller to log: a default model that cannot fit a small
    /// device is not served there, rather than keeping the runtime from ever becoming ready.
    pub fn serve_fitting_defaults(&mut self) -> Result<Vec<(String, String)>, ConfigError> {
        let models = parse_models(DEFAULT_MODELS)?;
        let pairs: Vec<_> = models.iter().map(|m| (m.key.as_str(), &m.arch)).collect();
        let fit = serving::models::fit(&self.device, &pairs, self.max_batched_tokens);
        let chosen = fit.chosen.iter().filter_map(|&i| models.get(i).cloned()).collect();
        self.models = chosen;
        self.fit_prompts_to_one_step();
        if self.models.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "no default model fits device {:?} ({} usable bytes); list models under [[models]] in --config",
                self.device.name,
                self.device.usable_bytes()
            )));
        }
        Ok(fit.left_out)
    }

    /// With chunked prefill off a whole prompt is computed in one step: each model's longest
    /// prompt is capped at the token budget, as vLLM V0 keeps max_model_len within
    /// max_num_batched_tokens. With it on, nothing changes.
    pub fn fit_prompts_to_one_step(&mut self) {
        if !self.chunked_prefill {
            for model in &mut self.models {
                model.max_prompt_tokens = model.max_prompt_tokens.min(self.max_batched_tokens);
            }
        }
    }

    /// Refuses models a config file preloads that the device cannot hold: their weights and the
    /// activations must leave room for a KV cache in the device's usable memory, as vLLM refuses
    /// to start when no memory is left for cache blocks. Without this the runtime would start
    /// and never become ready.
    pub(super) fn validate_fit(&self) -> Result<(), ConfigError> {
        let preloaded: Vec<_> = self.models.iter().filter(|m| m.preload).collect();
        let weights: u64 = preloaded.iter().map(|m| m.arch.weight_bytes()).sum();
        let activations = self.activation_bytes();
        let usable = self.device.usable_bytes();
        if weights.saturating_add(activations) < usable {
            return Ok(());
        }
        let keys: Vec<_> = preloaded.iter().map(|m| m.key.as_str()).collect();
        Err(ConfigError::Invalid(format!(
            "preloaded models {} need {weights} bytes of weights + {activations} bytes of activations, \
             at least the {usable} usable bytes (90%) of device {:?}'s {} bytes, leaving nothing for the KV \
             cache: preload fewer (preload = false), or choose a larger device",
            keys.join(", "),
            self.device.name,
            self.device.memory_bytes
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serving::device::DeviceSpec;

    fn bare(device: &str) -> (Config, Vec<(String, String)>) {
        let mut config = Config { device: DeviceSpec::preset(device).expect("preset"), ..Config::default() };
        let left_out = config.serve_fitting_defaults().expect("some default fits");
        config.validate().expect("a bare start is valid on every preset");
        (config, left_out)
    }

    /// What catches the two services disagreeing: on every preset, a bare runtime's preloaded
    /// weights (and those it loads on demand) fit a bare memory-service's `uniforms`, and the
    /// `activations` pool holds the buffers it reserves, `ACTIVATION_SLOTS` times.
    #[test]
    fn a_bare_runtime_fits_memory_services_split_on_every_preset() {
        for name in DeviceSpec::preset_names() {
            let (config, _) = bare(&name);
            let pools = serving::models::pool_split(&config.device);
            let pool = |n: &str| pools.iter().find(|(p, _)| *p == n).map_or(0, |(_, b)| *b);
            let preloaded: u64 =
                config.models.iter().filter(|m| m.preload).map(|m| m.arch.weight_bytes()).sum();
            let all: u64 = config.models.iter().map(|m| m.arch.weight_bytes()).sum();
            assert!(preloaded > 0, "{name}: something is preloaded");
            assert!(preloaded <= pool("uniforms"), "{name}: {preloaded} > {pools:?}");
            assert_eq!(all, pool("uniforms"), "{name}: the pool holds exactly the served models");
            let slots = serving::models::ACTIVATION_SLOTS;
            assert_eq!(config.activation_bytes() * slots, pool("activations"), "{name}");
        }
    }

    #[test]
    fn a_bare_start_leaves_out_what_its_device_cannot_hold_and_says_why() {
        let keys = |c: &Config| c.models.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
        let (h100, left_out) = bare("h100-sxm");
        assert_eq!(keys(&h100), keys(&Config::default()), "an H100 serves every default model");
        assert!(left_out.is_empty());
        let (laptop, left_out) = bare("webgpu-laptop");
        assert_eq!(keys(&laptop), ["llama-3.2-1b", "distilgpt2"]);
        assert_eq!(
            left_out.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["llama-3.1-8b", "phi-3-mini"]
        );
        assert!(left_out[0].1.contains("webgpu-laptop"), "{}", left_out[0].1);
    }

    #[test]
    fn the_two_readings_of_the_default_models_agree() {
        let runtime = parse_models(DEFAULT_MODELS).expect("parses");
        let shared = serving::models::default_models();
        let pick = |k: &str, a: &serving::arch::Arch, p: bool| (k.to_owned(), a.clone(), p);
        let runtime: Vec<_> = runtime.iter().map(|m| pick(&m.key, &m.arch, m.preload)).collect();
        let shared: Vec<_> = shared.iter().map(|m| pick(&m.key, &m.arch, m.preload)).collect();
        assert_eq!(runtime, shared);
    }

    #[test]
    fn a_config_file_preloading_more_than_the_device_holds_is_refused_with_the_numbers() {
        let mut config =
            Config { device: DeviceSpec::preset("webgpu-laptop").expect("preset"), ..Config::default() };
        let err = config.validate().expect_err("16 GB of Llama-3.1-8B on an 8 GiB device").to_string();
        for number in ["16388172800", "184549376", "7730941133", "llama-3.1-8b"] {
            assert!(err.contains(number), "{err}");
        }
        // Loaded on demand only, the same list passes this check (a load would fail, not the start).
        config.models.iter_mut().for_each(|m| m.preload = m.key == "distilgpt2");
        config.validate_fit().expect("only distilgpt2 preloaded");
    }
}
