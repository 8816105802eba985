//! GetModelInfo, GetServerInfo and GetLoads answered from the configuration and the device's
//! live state, in the dialect's terms.

use std::{
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use proto::vllm::grpc::engine as vllm;
use tokio::time::Instant;

use crate::config::TimeScale;

use crate::{metrics::Metrics, models::Model, state::Shared, tokenizer};

/// What vLLM calls its server type in GetServerInfo.
pub const SERVER_TYPE: &str = "vllm-grpc";

/// GetModelInfo: the served model's limits and vocabulary; the special ids are the ones its
/// GetTokenizer bundle declares, so the gateway's tokenizer and this answer agree.
pub fn model_info(model: &Model) -> vllm::GetModelInfoResponse {
    let spec = &model.spec;
    let (bos, eos) = (model.bundle.bos, model.bundle.eos);
    vllm::GetModelInfoResponse {
        model_path: spec.key.clone(),
        is_generation: true,
        max_context_length: spec.arch.context_length,
        vocab_size: model.vocab_size(),
        supports_vision: false,
        served_model_name: spec.key.clone(),
        tokenizer_path: String::new(),
        model_type: "simulated".into(),
        architectures: vec![format!("Simulated{}ForCausalLM", tokenizer::title(model.lm))],
        eos_token_ids: vec![eos as i32],
        // The end token pads, as in Llama's tokenizers, which have no pad token of their own.
        pad_token_id: eos as i32,
        bos_token_id: bos as i32,
        max_req_input_len: spec.max_prompt_tokens as i32,
        default_sampling_params_json: String::new(),
    }
}

/// GetServerInfo.
pub fn server_info(shared: &Shared, started: Instant, last_receive: f64) -> vllm::GetServerInfoResponse {
    vllm::GetServerInfoResponse {
        active_requests: shared.executor.admitted() as u32,
        is_paused: shared.draining.is_cancelled(),
        last_receive_timestamp: last_receive,
        uptime_seconds: started.elapsed().as_secs_f64(),
        server_type: SERVER_TYPE.into(),
        data_parallel_size: 1,
        ..Default::default()
    }
}

/// Generated tokens counted at the previous GetLoads: throughput is measured between calls.
#[derive(Debug, Default)]
pub struct Throughput(Mutex<Option<(Instant, u64)>>);

impl Throughput {
    /// Tokens per simulated second since the previous call (0 on the first).
    fn sample(&self, tokens: u64, scale: TimeScale) -> f64 {
        let now = Instant::now();
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = match *last {
            Some((then, before)) if now > then => {
                tokens.saturating_sub(before) as f64 / scale.simulated_secs(now - then)
            }
            _ => 0.0,
        };
        *last = Some((now, tokens));
        rate
    }
}

/// GetLoads for `model`, from the gauges the device loop sets from its scheduler at every
/// iteration (the same live state `runtime_*` exports): running and waiting sequences, KV blocks
/// used against what the whole kv-cache pool could hold.
pub fn loads(shared: &Shared, model: &Model, throughput: &Throughput) -> vllm::GetLoadsResponse {
    let m: &Metrics = &shared.metrics;
    let key = model.spec.key.as_str();
    let block = i64::from(shared.config.kv_block_tokens);
    let running = m.running.with_label_values(&[key]).get();
    let waiting = m.waiting.with_label_values(&[key]).get();
    let used = m.kv_blocks.with_label_values(&[key, "used"]).get() * block;
    let capacity = m.kv_blocks.with_label_values(&[key, "capacity"]).get() * block;
    let max_seqs = shared.config.max_batch_size;
    let clamp = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
    let load = vllm::SchedulerLoad {
        dp_rank: 0,
        num_running_reqs: clamp(running),
        num_waiting_reqs: clamp(waiting),
        num_total_reqs: clamp(running + waiting),
        num_used_tokens: clamp(used),
        max_total_num_tokens: clamp(capacity),
        token_usage: m.kv_utilization.with_label_values(&[key]).get(),
        gen_throughput: throughput.sample(m.tokens.with_label_values(&[key]).get(), shared.config.time_scale),
        // No prefix cache yet: nothing is ever a hit.
        cache_hit_rate: 0.0,
        // Batch occupancy: the share of max_num_seqs running.
        utilization: running as f64 / max_seqs.max(1) as f64,
        max_running_requests: clamp(max_seqs as i64),
    };
    vllm::GetLoadsResponse {
        timestamp: iso8601(SystemTime::now()),
        version: concat!("runtime-service ", env!("CARGO_PKG_VERSION")).into(),
        dp_rank_count: 1,
        loads: vec![load],
    }
}

/// `2025-01-31T12:34:56.789Z`: UTC, milliseconds.
pub fn iso8601(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(iso8601(leap), "2000-02-29T12:34:56.789Z");
    }
}
