//! The device loop: intake, sweep, schedule, price, wait for the simulated GPU, stream, repeat.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, mpsc, watch},
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    DeviceSettings, Handed, LaneSpec, Reclaim, Signals,
    lane::Lane,
    timeline::{Busy, SchedulerMode, Slot, Timeline},
};
use crate::{error::Error, kv::Link, metrics::Metrics, rng::SplitMix64, scheduler::Step};

pub(super) struct DeviceLoop {
    settings: DeviceSettings,
    lanes: Vec<Lane>,
    timeline: Timeline,
    inbox: mpsc::Receiver<Handed>,
    wake: Arc<Notify>,
    metrics: Metrics,
    shutdown: CancellationToken,
    jitter: SplitMix64,
    next_lane: usize,
    next_id: u64,
    /// Accounting already exported to the metrics.
    exported: Busy,
    /// Until when memory-service's leases are known to hold: the renewer's local lease timer,
    /// `None` while the keep-alive rounds fail. A step runs only if it ends by then: past it,
    /// the memory may have expired at memory-service and been granted to someone else, and
    /// using it could collide with them. Steps resume once the leases are confirmed again; if
    /// they are lost instead, the generations using them end.
    memory: watch::Receiver<Option<Instant>>,
    /// Offers cache-only slabs to memory-service and gives them back when asked.
    reclaim: Option<Reclaim>,
    /// Whether the step last formed was held at the fence and none has run since.
    held: bool,
}

impl DeviceLoop {
    pub(super) fn new(
        settings: DeviceSettings,
        lanes: Vec<(LaneSpec, Link)>,
        inbox: mpsc::Receiver<Handed>,
        wake: Arc<Notify>,
        metrics: Metrics,
        signals: Signals,
    ) -> Self {
        let Signals { shutdown, memory, reclaim } = signals;
        let time_scale = settings.time_scale;
        DeviceLoop {
            memory,
            reclaim,
            timeline: Timeline::new(settings.mode),
            jitter: SplitMix64::new(settings.jitter_seed),
            settings,
            lanes: lanes
                .into_iter()
                .map(|(spec, link)| {
                    let model = [spec.model.as_str()];
                    let vllm =
                        metrics.vllm.model(&spec.model).in_time_scale(time_scale).with_runtime_latency(
                            metrics.ttft.with_label_values(&model),
                            metrics.inter_token.with_label_values(&model),
                        );
                    Lane::new(spec, link, vllm)
                })
                .collect(),
            inbox,
            wake,
            metrics,
            shutdown,
            next_lane: 0,
            next_id: 0,
            exported: Busy::default(),
            held: false,
        }
    }

    pub(super) async fn run(mut self) {
        let mut inbox_open = true;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            // Overlapped, the CPU formed this step while the last one ran: what arrived since
            // could not be in it. Real overlap schedulers (SGLang's, vLLM's async scheduling)
            // charge an arrival that step; those arrivals join their lanes after the pick.
            let defer = self.timeline.mode() == SchedulerMode::Overlapped && self.timeline.is_busy();
            let (open, held) = self.intake(defer);
            inbox_open &= open;
            for lane in &mut self.lanes {
                lane.absorb_grants();
                lane.sweep();
            }
            if let Some(reclaim) = &mut self.reclaim {
                reclaim.serve(&mut self.lanes, None);
            }
            let fence = *self.memory.borrow_and_update();
            let now = Instant::now();
            let picked = if fence.is_some_and(|until| now < until) { self.pick() } else { None };
            let arrived = !held.is_empty();
            for (id, handed) in held {
                self.lanes[handed.0.lane].add(id, handed, now);
            }
            for lane in &mut self.lanes {
                lane.return_slabs(now, self.settings.kv_idle_release);
                lane.publish_demand();
            }
            if let Some(reclaim) = &mut self.reclaim {
                reclaim.offer(&self.lanes);
            }
            self.export_gauges();
            let Some((li, plan)) = picked else {
                self.timeline.idle();
                // Nothing to overlap them with: arrivals run now, and stopped sequences have no
                // next step to stay for.
                let retired = self.lanes.iter_mut().fold(false, |any, lane| lane.retire_ghosts() | any);
                if arrived || retired {
                    continue;
                }
                if !inbox_open && self.lanes.iter().all(|l| l.scheduler.is_empty()) {
                    break;
                }
                self.idle(inbox_open).await;
                continue;
            };
            if !self.step(li, &plan, fence).await {
                break;
            }
        }
        for lane in &mut self.lanes {
            lane.fail_all(&Error::ShuttingDown);
        }
        self.export_gauges();
        // Dropping the lanes drops their slab leases: each is freed in the background (tracked).
    }

    /// Takes every submission waiting in the inbox into its lane, or, if `defer`, returns them
    /// (numbered) for the caller to add after this step's pick; false once the inbox is closed.
    fn intake(&mut self, defer: bool) -> (bool, Vec<(u64, Handed)>) {
        let now = Instant::now();
        let mut held = Vec::new();
        loop {
            match self.inbox.try_recv() {
                Ok(handed) if handed.0.lane < self.lanes.len() => {
                    let id = self.next_id;
                    self.next_id += 1;
                    if defer {
                        held.push((id, handed));
                    } else {
                        self.lanes[handed.0.lane].add(id, handed, now);
                    }
                }
                Ok(_) => {} // no such lane: its generation was checked against the models
                Err(mpsc::error::TryRecvError::Empty) => return (true, held),
                Err(mpsc::error::TryRecvError::Disconnected) => return (false, held),
            }
        }
    }

    /// The next lane in turn with a batch to run, and that batch.
    fn pick(&mut self) -> Option<(usize, Step)> {
        let n = self.lanes.len();
        for k in 0..n {
            let li = (self.next_lane + k) % n;
            let lane = &mut self.lanes[li];
            if lane.scheduler.is_empty() {
                continue;
            }
            let plan = lane.scheduler.schedule(lane.can_grow());
            self.metrics.preemptions.inc_by(plan.preempted.len() as u64);
            lane.vllm.preempted(plan.preempted.len());
            // Demand first: new demand after a quiet spell clears a stale failure.
            lane.publish_demand();
            lane.fail_if_unreachable();
            if plan.batch.is_empty() {
                continue; // nothing runnable (out of blocks, or every reader behind)
            }
            self.next_lane = li + 1;
            return Some((li, plan));
        }
        None
    }

    /// Runs `plan` on lane `li` if it ends before `fence`; false if shutdown interrupted it.
    async fn step(&mut self, li: usize, plan: &Step, fence: Option<Instant>) -> bool {
        let lane = &mut self.lanes[li];
        let cost = lane.price(plan);
        let jitter = self.settings.jitter;
        let gpu = if jitter > 0.0 {
            // Log-normal, mean 1: real step times have a slow tail and a hard fast edge.
            cost.gpu.mul_f64(self.jitter.next_lognormal(jitter))
        } else {
            cost.gpu
        };
        // The timeline is wall time: the device's simulated costs are slept divided by the time
        // scale, and what the lane records of the slot is converted back. The step is placed
        // once, on a copy kept only if the step runs: the fence is wall time too.
        let scale = self.settings.time_scale;
        let now = Instant::now();
        let mut timeline = self.timeline.clone();
        let slot = timeline.place(now, scale.to_wall(cost.cpu), scale.to_wall(gpu));
        if fence.is_none_or(|until| slot.gpu_done > until) {
            // It would run past what the leases are known to cover: not run. Its blocks stay
            // with its sequences and nothing advanced, so the next schedule forms it again
            // once a renewal moves the fence (or the leases are lost and its sequences end).
            // Counted once per hold: a wake-up during it forms the step again, the same step.
            if !self.held {
                self.held = true;
                self.metrics.fenced_steps.inc();
                debug!(?fence, "step held: it would end past the lease timer");
            }
            // A wake-up (a sequence's owner left, a reader drained) loops too: the sweep lets
            // go of what was cancelled while the memory is in doubt.
            let mut memory = self.memory.clone();
            tokio::select! {
                changed = memory.changed() => if changed.is_err() { return false },
                () = self.wake.notified() => {}
                () = self.shutdown.cancelled() => return false,
            }
            return true;
        }
        self.timeline = timeline;
        self.held = false;
        if slot.gpu_done > Instant::now() {
            tokio::select! {
                () = sleep_until(slot.gpu_done) => {}
                () = self.shutdown.cancelled() => return false,
            }
        } else {
            // Behind schedule (catching up): let the readers woken by the last step run first.
            tokio::task::yield_now().await;
        }
        let metrics = &self.metrics;
        metrics.batch_size.observe(plan.batch.len() as f64);
        metrics.step_seconds.with_label_values(&[cost.phase.name()]).observe(gpu.as_secs_f64());
        let simulated = Slot { gpu_waited: scale.to_simulated(slot.gpu_waited), ..slot };
        let late_stops = self.timeline.mode() == SchedulerMode::Overlapped;
        let tokens = lane.complete(plan, simulated, cost.cpu, gpu, late_stops);
        metrics.tokens.with_label_values(&[&lane.spec.model]).inc_by(u64::from(tokens));
        true
    }

    /// Waits for something to do: a submission, a wake-up (a caller left, a reader drained, a slab
    /// arrived), the moment idle slabs are due back, or shutdown.
    async fn idle(&mut self, inbox_open: bool) {
        let linger = self.settings.kv_idle_release;
        let due = self.lanes.iter().filter_map(|l| l.release_due(linger)).min();
        let release = async {
            match due {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut memory = self.memory.clone();
        // A request for cache, or the free of a slab given back landing (the offer is restated
        // once none is in flight).
        // A closed request channel (the renewer stopped, at shutdown) never resolves.
        let reclaims = async {
            let Some(Reclaim { requests, freeing, .. }) = self.reclaim.as_mut() else {
                return std::future::pending().await;
            };
            tokio::select! {
                Some(request) = requests.recv() => Some(request),
                Some(_) = freeing.join_next(), if !freeing.is_empty() => None,
                else => std::future::pending().await,
            }
        };
        let mut asked = None;
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => {}
            request = reclaims => asked = request,
            () = self.wake.notified() => {}
            // Memory confirmed again (or doubted): look again. (A closed signal never fires.)
            () = async { if memory.changed().await.is_err() { std::future::pending::<()>().await } } => {}
            received = self.inbox.recv(), if inbox_open => {
                if let Some(handed) = received {
                    let id = self.next_id;
                    self.next_id += 1;
                    if let Some(lane) = self.lanes.get_mut(handed.0.lane) {
                        lane.add(id, handed, Instant::now());
                    }
                }
            }
            () = release => {}
        }
        if let (Some(reclaim), Some(request)) = (&mut self.reclaim, asked) {
            reclaim.serve(&mut self.lanes, Some(request));
        }
    }

    fn export_gauges(&mut self) {
        let m = &self.metrics;
        for lane in &mut self.lanes {
            lane.publish_kv_events();
            let (used, total, slabs) = lane.kv();
            let model = lane.spec.model.as_str();
            m.running.with_label_values(&[model]).set(lane.scheduler.running() as i64);
            m.waiting.with_label_values(&[model]).set(lane.scheduler.waiting() as i64);
            // Utilisation against what this runtime could hold (the whole kv-cache pool), not
            // against the slabs it happens to hold: those track demand and read near full at any
            // load, which says nothing to a router.
            let capacity = lane.kv_capacity().max(total);
            m.kv_blocks.with_label_values(&[model, "used"]).set(used as i64);
            m.kv_blocks.with_label_values(&[model, "total"]).set(total as i64);
            m.kv_blocks.with_label_values(&[model, "capacity"]).set(capacity as i64);
            let utilization = if capacity == 0 { 0.0 } else { used as f64 / capacity as f64 };
            m.kv_utilization.with_label_values(&[model]).set(utilization);
            m.kv_slabs.with_label_values(&[model]).set(slabs as i64);
            m.kv_reclaimed.with_label_values(&[model]).inc_by(std::mem::take(&mut lane.reclaimed_blocks));
            // vLLM's names for the same readings, at the same moment.
            lane.vllm.load(lane.scheduler.running(), lane.scheduler.waiting(), utilization);
            lane.vllm.cache_config(lane.spec.block_tokens, capacity);
        }
        let busy = self.timeline.busy();
        let delta = |now: Duration, before: Duration| now.saturating_sub(before).as_secs_f64();
        // Device seconds in simulated time; the host's lag stays wall time (it is the host's).
        let factor = self.settings.time_scale.factor();
        let before = self.exported;
        for (stage, state, d) in [
            ("cpu", "busy", factor * delta(busy.cpu_busy, before.cpu_busy)),
            ("gpu", "busy", factor * delta(busy.gpu_busy, before.gpu_busy)),
            ("gpu", "waiting_for_cpu", factor * delta(busy.gpu_waiting_for_cpu, before.gpu_waiting_for_cpu)),
            ("cpu", "waiting_for_gpu", factor * delta(busy.cpu_waiting_for_gpu, before.cpu_waiting_for_gpu)),
        ] {
            if d > 0.0 {
                m.device_seconds.with_label_values(&[stage, state]).inc_by(d);
            }
        }
        let lag = delta(busy.lag, before.lag);
        if lag > 0.0 {
            m.device_lag.inc_by(lag);
        }
        self.exported = busy;
    }
}
