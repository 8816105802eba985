//! What a finished generation reports: its summary.

use std::time::Duration;

use proto::runtime::v1 as pb;

use super::{Generation, Timings};
use crate::core::{Report, SchedulerMode};

impl Generation {
    pub(super) fn summary(&self, report: &Report, timings: &Timings) -> pb::Summary {
        let duration = |d: Duration| prost_types::Duration::try_from(d).ok();
        // Wall durations measured here become simulated time; the device's busy times already are.
        let scale = self.shared.config.time_scale;
        let (first, last) =
            (timings.first_token.unwrap_or(self.started), timings.last_token.unwrap_or(self.started));
        let (to_first, to_last) =
            (scale.to_simulated(first - self.started), scale.to_simulated(last - self.started));
        let decode = (to_last - to_first).as_secs_f64();
        let n = report.generated;
        let tokens_per_second = if n >= 2 && decode > 0.0 { f64::from(n - 1) / decode } else { 0.0 };
        let tpot = if n >= 2 { (to_last - to_first) / (n - 1) } else { Duration::ZERO };
        let config = &self.shared.config;
        let overlapped = config.scheduler == SchedulerMode::Overlapped;
        let block_bytes = self.plan.model.spec.block_bytes(config.kv_block_tokens);
        #[allow(deprecated)] // pipeline_mode and pipeline_depth are still filled for older clients
        pb::Summary {
            finish_reason: if report.stopped { pb::FinishReason::Stop } else { pb::FinishReason::Length }
                .into(),
            prompt_tokens: self.plan.prompt_tokens,
            completion_tokens: n,
            time_to_first_token: duration(to_first),
            total_time: duration(to_last),
            tokens_per_second,
            cpu_busy: duration(report.cpu_busy),
            gpu_busy: duration(report.gpu_busy),
            gpu_idle_waiting_for_cpu: duration(report.gpu_waiting_for_cpu),
            memory_wait: duration(scale.to_simulated(timings.memory_wait)),
            queue_wait: duration(scale.to_simulated(report.queue_time)),
            pipeline_mode: if overlapped {
                pb::PipelineMode::Pipelined
            } else {
                pb::PipelineMode::Sequential
            }
            .into(),
            pipeline_depth: if overlapped { 2 } else { 1 },
            kv_cache_bytes: u64::from(report.peak_blocks) * block_bytes,
            activation_bytes: self.shared.activations.bytes(),
            request_id: self.plan.request_id.clone(),
            time_per_output_token: duration(tpot),
            mean_batch_size: if report.steps == 0 {
                0.0
            } else {
                report.batch_sum as f64 / report.steps as f64
            },
            preemptions: report.preemptions,
            peak_kv_blocks: report.peak_blocks,
            cached_tokens: report.cached_tokens,
            kv_block_tokens: config.kv_block_tokens,
            scheduler: config.scheduler.name().to_owned(),
        }
    }
}
