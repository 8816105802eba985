//! Which lease TTLs the device can work with.

use std::time::Duration;

use super::{Config, ConfigError};

/// The shortest lease TTL accepted (see `Config::validate_lease_ttl`).
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);

impl Config {
    /// How long a call to memory-service may take: the memory timeout, or a quarter of the
    /// lease TTL if that is shorter. A renewal answered later than that could not keep the
    /// device stepping (the lease timer would close first), so failing it sooner tells the
    /// truth sooner: health turns NOT_SERVING and the stream reconnects.
    pub fn memory_call_timeout(&self) -> Duration {
        self.memory_timeout.min(self.lease_ttl / 4)
    }

    /// A bound on one step of model `m`: a prefill chunk of the token budget at the end of its
    /// longest prompt, plus a decode of a full batch at its longest context — or of as much
    /// context as the device's memory can hold beside the weights and activations, if less (a
    /// mixed step costs no more than its parts run apart) — stretched by the largest jitter.
    fn longest_step(&self, m: &super::ModelSpec) -> Duration {
        let roofline = crate::roofline::Roofline::new(&self.device, &m.arch);
        let chunk = self.max_batched_tokens.min(m.max_prompt_tokens);
        let prefill = roofline.step([crate::roofline::Work {
            tokens: chunk,
            context: m.max_prompt_tokens.saturating_sub(chunk),
        }]);
        let standing = m.arch.weight_bytes().saturating_add(self.activation_bytes());
        let kv_tokens =
            self.device.usable_bytes().saturating_sub(standing) / m.arch.kv_bytes_per_token().max(1);
        let longest = m.max_model_len();
        let per_seq = kv_tokens / self.max_batch_size.max(1) as u64;
        let context = u64::from(longest).min(per_seq) as u32;
        let decodes = roofline
            .step(std::iter::repeat_n(crate::roofline::Work { tokens: 1, context }, self.max_batch_size));
        (prefill.cpu + prefill.gpu + decodes.cpu + decodes.gpu).mul_f64(1.0 + self.jitter.clamp(0.0, 1.0))
    }

    /// A lease TTL the device can work with. Leases are renewed every third of the TTL, and
    /// the device runs a step only if it ends before the local lease timer (the last renewal's
    /// send time + TTL − a tenth): so the longest step must fit between two renewals, or the
    /// device would stop for good. (A renewal must also be answered well within the TTL: see
    /// [`Config::memory_call_timeout`].)
    pub(super) fn validate_lease_ttl(&self) -> Result<(), ConfigError> {
        let ttl = self.lease_ttl;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if ttl < MIN_LEASE_TTL {
            return invalid(format!(
                "lease TTL {ttl:?} must be at least {MIN_LEASE_TTL:?}: renewed every third of it, a shorter one leaves no time for a renewal round (with memory-service's commit) before the leases expire"
            ));
        }
        // Between two renewals the device has TTL − TTL/3 − TTL/10 of lease ahead of it.
        let window = ttl - ttl / 3 - ttl / 10;
        for m in &self.models {
            let longest = self.longest_step(m);
            if longest >= window {
                return invalid(format!(
                    "lease TTL {ttl:?} is too short for model {:?} on {}: its longest step (a full prefill chunk beside a full batch of decodes at its longest context, with jitter) takes about {longest:?}, more than the {window:?} of lease the device is sure of between two renewals; raise --lease-ttl-ms",
                    m.key, self.device.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serving::device::DeviceSpec;

    fn with_ttl(ttl_ms: u64) -> Config {
        Config { lease_ttl: Duration::from_millis(ttl_ms), ..Config::default() }
    }

    #[test]
    fn a_ttl_too_short_to_renew_or_to_fit_the_longest_step_is_refused_with_the_numbers() {
        let err = with_ttl(10).validate().unwrap_err().to_string();
        assert!(err.contains("at least 100ms"), "{err}");
        // On an L4, llama-3.1-8b's longest step is well over half a second: a 1 s lease leaves
        // 567 ms between renewals, so the device could stop for good.
        let mut slow = with_ttl(1000);
        slow.device = DeviceSpec::preset("l4").expect("preset");
        let err = slow.validate().unwrap_err().to_string();
        assert!(err.contains("llama-3.1-8b") && err.contains("raise --lease-ttl-ms"), "{err}");
        slow.lease_ttl = Duration::from_secs(30);
        slow.validate().expect("the default 30 s leaves room for the longest step");
        for preset in ["h100-sxm", "a100-40gb", "l4", "webgpu-laptop"] {
            let mut config =
                Config { device: DeviceSpec::preset(preset).expect("preset"), ..Config::default() };
            config.models.retain(|m| m.key == "distilgpt2" || preset != "webgpu-laptop");
            let longest = config.models.iter().map(|m| config.longest_step(m)).max().unwrap_or_default();
            assert!(longest < Duration::from_secs(17), "{preset}: {longest:?}");
        }
    }

    #[test]
    fn memory_calls_time_out_within_a_quarter_of_the_ttl() {
        assert_eq!(with_ttl(30_000).memory_call_timeout(), Duration::from_secs(2));
        assert_eq!(with_ttl(1000).memory_call_timeout(), Duration::from_millis(250));
    }
}
