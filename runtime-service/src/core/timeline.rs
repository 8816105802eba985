//! When each step's CPU and GPU work happen on the simulated device.
//!
//! Overlapped (SGLang's `event_loop_overlap`, vLLM's async scheduling): the CPU prepares step N+1
//! (schedule, sample, detokenize, build the batch) as soon as it has launched step N, so it works
//! while the GPU computes, and a steady stream of steps costs max(cpu, gpu) each instead of
//! cpu + gpu. Sequential: the CPU prepares step N+1 only once step N is done, as engines without
//! overlap do. Same work, same tokens; only the timeline differs.

use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::SchedulerMode;

/// How far behind its own schedule the loop may find itself before it concludes that the host
/// (not the simulated device) held it up: above tokio's 1 ms timer granularity, so timer
/// lateness never accumulates into the simulated throughput.
pub const SLACK: Duration = Duration::from_millis(2);

/// One step placed on the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// When the CPU began preparing the step.
    pub cpu_start: Instant,
    /// When the GPU began it (the CPU was done and the GPU free).
    pub gpu_start: Instant,
    /// When the GPU finished it: its tokens are out.
    pub gpu_done: Instant,
    /// How long the GPU sat idle before it, waiting for the CPU to hand it over.
    pub gpu_waited: Duration,
}

/// Where the device's time went, cumulatively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Busy {
    /// CPU preparing steps.
    pub cpu_busy: Duration,
    /// GPU computing steps.
    pub gpu_busy: Duration,
    /// GPU idle while work was waiting on the CPU (a stall the overlap removes).
    pub gpu_waiting_for_cpu: Duration,
    /// CPU done with the next step but waiting for the GPU to take it.
    pub cpu_waiting_for_gpu: Duration,
    /// Time the host fell behind the simulated clock (the serving path could not keep up).
    pub lag: Duration,
}

/// The device's timeline: where the last step sits, and the accounting.
#[derive(Debug, Clone)]
pub struct Timeline {
    mode: SchedulerMode,
    last: Option<Slot>,
    busy: Busy,
}

impl Timeline {
    /// An idle device.
    pub fn new(mode: SchedulerMode) -> Self {
        Timeline { mode, last: None, busy: Busy::default() }
    }

    /// The scheduling mode.
    pub fn mode(&self) -> SchedulerMode {
        self.mode
    }

    /// Accounting so far.
    pub fn busy(&self) -> Busy {
        self.busy
    }

    /// Whether a step was just placed (the device has not gone idle since).
    pub fn is_busy(&self) -> bool {
        self.last.is_some()
    }

    /// The device ran out of work: the next step starts from scratch (its CPU work cannot have
    /// overlapped anything).
    pub fn idle(&mut self) {
        self.last = None;
    }

    /// Places a step costing `cpu` then `gpu` after the previous one, as of `now`.
    ///
    /// The host hands over its outputs and forms the step after the simulated GPU is free: its
    /// own time is not the device's (the device's CPU stage is `cpu`). So the step goes where the
    /// schedule puts it, even if that began a moment ago, as long as it still ends by `now` +
    /// [`SLACK`]: the host caught up within the step, and the device's clock did not slip. Only a
    /// host later than that (more work per step than a step lasts) restarts the schedule from
    /// `now`, and what it lost is counted as lag.
    pub fn place(&mut self, now: Instant, cpu: Duration, gpu: Duration) -> Slot {
        let (cpu_start, gpu_free) = match self.last {
            None => (now, now),
            Some(last) => match self.mode {
                SchedulerMode::Overlapped => (last.gpu_start, last.gpu_done),
                SchedulerMode::Sequential => (last.gpu_done, last.gpu_done),
            },
        };
        let mut slot = Self::slot(cpu_start, gpu_free, cpu, gpu);
        if now > slot.gpu_done + SLACK {
            // The host was late (too many streams for its cores, or a stall): the simulated device
            // cannot have run while nobody fed it. Count it, and restart the schedule from now.
            self.busy.lag += now - gpu_free;
            slot = Self::slot(now, now, cpu, gpu);
        }
        self.busy.cpu_busy += cpu;
        self.busy.gpu_busy += gpu;
        self.busy.gpu_waiting_for_cpu += slot.gpu_waited;
        self.busy.cpu_waiting_for_gpu += slot.gpu_start - (slot.cpu_start + cpu);
        self.last = Some(slot);
        slot
    }

    fn slot(cpu_start: Instant, gpu_free: Instant, cpu: Duration, gpu: Duration) -> Slot {
        let gpu_start = (cpu_start + cpu).max(gpu_free);
        Slot { cpu_start, gpu_start, gpu_done: gpu_start + gpu, gpu_waited: gpu_start - gpu_free }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: SchedulerMode, cpu: u64, gpu: u64, steps: u32) -> (Duration, Busy) {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut timeline = Timeline::new(mode);
        let mut now = start;
        for _ in 0..steps {
            now = timeline.place(now, ms(cpu), ms(gpu)).gpu_done;
        }
        (now - start, timeline.busy())
    }

    #[test]
    fn overlap_hides_the_shorter_stage_whichever_it_is() {
        let ms = Duration::from_millis;
        for (cpu, gpu) in [(3, 5), (5, 3), (4, 4)] {
            let (took, busy) = run(SchedulerMode::Overlapped, cpu, gpu, 50);
            // The first step's CPU work has nothing to hide behind; after that each step costs max.
            assert_eq!(took, ms(cpu.min(gpu)) + ms(cpu.max(gpu)) * 50, "cpu {cpu} gpu {gpu}");
            assert_eq!((busy.cpu_busy, busy.gpu_busy), (ms(cpu) * 50, ms(gpu) * 50));
            let stall = if cpu > gpu { ms(cpu) + ms(cpu - gpu) * 49 } else { ms(cpu) };
            assert_eq!(busy.gpu_waiting_for_cpu, stall, "cpu {cpu} gpu {gpu}");
            assert_eq!(busy.cpu_waiting_for_gpu, ms(gpu.saturating_sub(cpu)) * 49);
        }
    }

    #[test]
    fn sequential_pays_both_stages_every_step() {
        let (took, busy) = run(SchedulerMode::Sequential, 3, 5, 50);
        assert_eq!(took, Duration::from_millis(8 * 50));
        assert_eq!(busy.gpu_waiting_for_cpu, Duration::from_millis(3 * 50));
    }

    #[test]
    fn a_late_host_is_counted_as_lag_and_the_schedule_restarts() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut timeline = Timeline::new(SchedulerMode::Overlapped);
        let first = timeline.place(start, ms(1), ms(4));
        let late = first.gpu_done + ms(10);
        let second = timeline.place(late, ms(1), ms(4));
        assert_eq!(timeline.busy().lag, ms(10));
        assert_eq!(second.gpu_done, late + ms(5));
    }

    #[test]
    fn a_host_late_by_less_than_a_step_costs_the_device_nothing() {
        let ms = Duration::from_millis;
        for mode in [SchedulerMode::Overlapped, SchedulerMode::Sequential] {
            let start = Instant::now();
            let mut timeline = Timeline::new(mode);
            let first = timeline.place(start, ms(1), ms(10));
            // The host formed the next step 6 ms after the GPU was free: it still ends in the
            // future, placed where the schedule puts it.
            let second = timeline.place(first.gpu_done + ms(6), ms(1), ms(10));
            let on_time = Timeline::new(mode).place(start, ms(1), ms(10));
            let expected = match mode {
                SchedulerMode::Overlapped => first.gpu_done + ms(10),
                SchedulerMode::Sequential => first.gpu_done + ms(11),
            };
            assert_eq!((second.gpu_done, timeline.busy().lag), (expected, Duration::ZERO), "{mode:?}");
            assert_eq!(first, on_time);
        }
    }
}
