//! The `[[models]]` tables of the TOML file (`--config`), which replace the embedded list; the
//! file's other keys are [`super::Overrides`].

use serde::Deserialize;

use super::{ConfigError, ModelSpec, Overrides};
use serving::arch::Arch;

use crate::mock_lm::MockLmKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileModel {
    key: String,
    /// `engine` in files written before the mock language models were named for what they are.
    #[serde(alias = "engine")]
    mock_lm: MockLmKind,
    #[serde(default)]
    preload: bool,
    /// An embedded architecture (`llama-3.1-8b`, ...); defaults to the key.
    preset: Option<String>,
    /// A full architecture instead of a preset.
    arch: Option<Arch>,
    max_tokens_limit: Option<u32>,
    max_prompt_tokens: Option<u32>,
    /// The user's own `tokenizer.json`.
    tokenizer: Option<std::path::PathBuf>,
}

pub(super) fn models_of(file: Vec<FileModel>) -> Result<Vec<ModelSpec>, ConfigError> {
    file.into_iter()
        .map(|m| {
            let arch = Arch::for_model(&m.key, m.preset.as_deref(), m.arch).map_err(ConfigError::Invalid)?;
            // Defaults: the whole context for the prompt (capped), a quarter of it for the output.
            let context = arch.context_length;
            Ok(ModelSpec {
                key: m.key,
                mock_lm: m.mock_lm,
                preload: m.preload,
                max_tokens_limit: m.max_tokens_limit.unwrap_or((context / 4).clamp(1, 4096)),
                max_prompt_tokens: m.max_prompt_tokens.unwrap_or(context.min(8192)),
                arch,
                tokenizer: m.tokenizer,
            })
        })
        .collect()
}

/// Parses a `[[models]]` TOML document.
pub fn parse_models(text: &str) -> Result<Vec<ModelSpec>, ConfigError> {
    let file: Overrides = toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: "<models>".to_owned(), message: e.to_string() })?;
    models_of(file.models)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{KvReserve, SchedulerMode, find_device, layered};

    #[test]
    fn a_file_defines_a_device_and_models_by_preset_or_architecture() {
        let dir = std::env::temp_dir().join(format!("runtime-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("runtime.toml");
        std::fs::write(
            &path,
            r#"
device = "tiny"
scheduler = "sequential"
kv_reserve = "upfront"
[[devices]]
name = "tiny"
memory_bytes = 1073741824
bandwidth_bytes_per_s = 1e9
flops_per_s = 1e12
bandwidth_efficiency = 1.0
flops_efficiency = 1.0
launch_overhead_s = 0.002
cpu_per_step_s = 0.002
cpu_per_seq_s = 0.0
[[models]]
key = "llama-3.2-1b"
mock_lm = "webllm"
[[models]]
key = "toy"
mock_lm = "transformers-js"
max_tokens_limit = 64
[models.arch]
parameters = 1000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 256
dtype_bytes = 1
context_length = 512
"#,
        )
        .expect("write config");
        let config = layered(Some(&path), Overrides::default()).expect("parses").config;
        std::fs::remove_dir_all(&dir).ok();
        config.validate().expect("valid");
        assert_eq!(config.device.name, "tiny");
        assert_eq!(config.scheduler, SchedulerMode::Sequential);
        assert_eq!(config.kv_reserve, KvReserve::Upfront);
        assert_eq!(config.models.len(), 2);
        assert_eq!(config.models[1].arch.kv_bytes_per_token(), 2 * 2 * 2 * 32);
        assert!(find_device("h200", &[]).is_err());
    }

    #[test]
    fn the_example_file_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/runtime-service.toml");
        let layered = layered(Some(&path), Overrides::default()).expect("the example parses");
        assert!(layered.lists_models);
        let config = layered.config;
        config.validate().expect("the example is valid");
        assert_eq!(config.device.name, "h100-sxm");
        assert_eq!(config.models.len(), 2);
    }
}
