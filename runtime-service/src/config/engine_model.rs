//! Which model the engine dialect serves: `vllm.grpc.engine.VllmEngine` requests name no model,
//! so one runtime serves one of its models through that door.

use super::{Config, ConfigError, ModelSpec};

impl Config {
    /// The model the engine dialect serves: `engine_model`, else the first preloaded model, else
    /// the first (validation ensures there is one).
    pub fn engine_model(&self) -> Option<&ModelSpec> {
        match &self.engine_model {
            Some(key) => self.models.iter().find(|m| &m.key == key),
            None => self.models.iter().find(|m| m.preload).or_else(|| self.models.first()),
        }
    }

    /// `engine_model`, if given, must be a configured model: refused before any port is bound
    /// rather than served as a door that refuses every request.
    pub(super) fn validate_engine_model(&self) -> Result<(), ConfigError> {
        match &self.engine_model {
            Some(key) if !self.models.iter().any(|m| &m.key == key) => {
                let known: Vec<&str> = self.models.iter().map(|m| m.key.as_str()).collect();
                Err(ConfigError::Invalid(format!(
                    "engine model {key:?} (--engine-model) is not a configured model; choose one of {}",
                    known.join(", ")
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_model_defaults_to_the_first_preloaded_and_must_be_configured() {
        let config = Config::default();
        let first_preloaded = config.models.iter().find(|m| m.preload).map(|m| m.key.clone());
        assert_eq!(config.engine_model().map(|m| m.key.clone()), first_preloaded);
        let unknown = Config { engine_model: Some("nope".into()), ..Config::default() };
        let err = unknown.validate().expect_err("unknown model").to_string();
        assert!(err.contains("--engine-model"), "{err}");
    }
}
