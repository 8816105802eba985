//! One model's lane on the device: its scheduler and blocks, the slabs behind them, and the I/O
//! side of each sequence (decoder, event channel, cancellation). This file holds the lane and its
//! sequences' way through it; the slabs are in `slabs`.

mod slabs;

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{Emitted, Handed, Outcome, Report, TOKEN_BUFFER, signals::SeqSignals, timeline::Slot};
use crate::{
    error::Error,
    executor::Flight,
    kv::Link,
    kv_events::KvEventHub,
    memory::Reservation,
    metrics::vllm::{Finish, ModelSeries, RequestStats},
    mock_lm::Decoder,
    roofline::{Roofline, StepCost, Work},
    scheduler::{Scheduler, SeqId, SeqState, SlabId, Step, StepLimits, chain_hashes},
};

/// What a lane is made of.
#[derive(Debug, Clone)]
pub struct LaneSpec {
    /// Model key.
    pub model: String,
    /// Prices its steps.
    pub roofline: Roofline,
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// Step limits and KV reservation scheme.
    pub limits: StepLimits,
    /// Free blocks kept ahead of need while the lane has sequences.
    pub low_watermark: u64,
    /// Largest slab, blocks: while busy, a fully free slab is returned only if this many blocks
    /// stay free beyond what the next steps want (their demand and the low watermark).
    pub slab_blocks: u64,
    /// Where its prefix cache's changes are published.
    pub kv_events: Arc<KvEventHub>,
}

/// The I/O side of one sequence.
#[derive(Debug)]
struct Live {
    decoder: Decoder,
    tokens: mpsc::Sender<Emitted>,
    outcome: oneshot::Sender<Outcome>,
    /// Shared with its guard: the owner's abort, the device's progress.
    signals: Arc<SeqSignals>,
    flight: Arc<Flight>,
    span: tracing::Span,
    /// Its moments, for vLLM's series.
    stats: RequestStats,
    cpu_busy: Duration,
    gpu_busy: Duration,
    gpu_waiting_for_cpu: Duration,
}

/// One model on the device.
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) spec: LaneSpec,
    pub(super) scheduler: Scheduler,
    live: HashMap<SeqId, Live>,
    slabs: HashMap<SlabId, Option<Reservation>>,
    link: Link,
    /// When the lane last became empty (its idle slabs go after a linger).
    pub(super) idle_since: Option<Instant>,
    /// Its model's `vllm:*` series: every sequence is counted here as it leaves the device,
    /// whichever front door submitted it.
    pub(super) vllm: ModelSeries,
    /// Roots its prefix cache's hash chains: the same tokens of another model are other KV.
    cache_salt: u64,
    /// Cached blocks given back to memory-service on request, not yet exported.
    pub(super) reclaimed_blocks: u64,
    /// Sequences a stop token ended in the last step, overlapped: their callers have their
    /// outcome, but an overlap scheduler formed the next step before it saw the stop (SGLang's
    /// overlap loop, vLLM's async scheduling), so they keep their batch slot and blocks through
    /// it and leave after it. A length finish is known ahead and leaves at once.
    ghosts: Vec<SeqId>,
}

impl Lane {
    pub(super) fn new(spec: LaneSpec, link: Link, vllm: ModelSeries) -> Self {
        let cache_salt = crate::rng::fnv1a(spec.model.as_bytes());
        Lane {
            scheduler: Scheduler::new(spec.block_tokens, spec.limits),
            spec,
            live: HashMap::new(),
            slabs: HashMap::new(),
            link,
            idle_since: None,
            vllm,
            cache_salt,
            reclaimed_blocks: 0,
            ghosts: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, id: SeqId, (submission, signals): Handed, now: Instant) {
        let mut seq = SeqState::new(id, submission.prompt_tokens, submission.max_tokens);
        if self.spec.limits.prefix_caching && submission.prompt_ids.len() == submission.prompt_tokens as usize
        {
            let hashes = chain_hashes(self.cache_salt, &submission.prompt_ids, self.spec.block_tokens);
            seq = seq.with_prompt(submission.prompt_ids, hashes);
        }
        self.scheduler.add(seq);
        self.idle_since = None;
        self.live.insert(
            id,
            Live {
                decoder: submission.decoder,
                tokens: submission.tokens,
                outcome: submission.outcome,
                signals,
                flight: submission.flight,
                span: submission.span,
                stats: RequestStats::new(submission.received, now, submission.prompt_tokens),
                cpu_busy: Duration::ZERO,
                gpu_busy: Duration::ZERO,
                gpu_waiting_for_cpu: Duration::ZERO,
            },
        );
    }

    /// Drops sequences whose owner or reader left, pauses those whose reader is behind, and
    /// fails those whose KV memory memory-service lost. Lock-free: an atomic and the channel's
    /// own state per sequence.
    pub(super) fn sweep(&mut self) {
        let ids: Vec<SeqId> = self.scheduler.ids().collect();
        for id in ids {
            let Some(live) = self.live.get(&id) else { continue };
            if live.signals.is_aborted() || live.tokens.is_closed() {
                // Its task knows why (and may be gone): no outcome to send.
                self.retire(id, Finish::Abort);
                continue;
            }
            // Room for the step's token, so a scheduled sequence never blocks the loop.
            let paused = live.tokens.capacity() == 0;
            if let Some(seq) = self.scheduler.get_mut(id) {
                seq.paused = paused;
            }
        }
        let lost: Vec<SlabId> = self
            .slabs
            .iter()
            .filter(|(_, lease)| lease.as_ref().is_some_and(|l| l.lost().is_cancelled()))
            .map(|(&id, _)| id)
            .collect();
        for slab in lost {
            self.slabs.remove(&slab);
            for id in self.scheduler.lose_slab(slab) {
                self.end(id, Err(Error::MemoryLost));
            }
        }
    }

    /// Prices `plan`'s batch.
    pub(super) fn price(&self, plan: &Step) -> StepCost {
        self.spec.roofline.step(plan.batch.iter().map(|&(_, work): &(SeqId, Work)| work))
    }

    /// Records that `plan` ran in `slot` at `cost` (with `gpu` after jitter): advances every
    /// sequence, streams the tokens sampled, and ends the sequences that are done.
    /// With `late_stops` (overlapped), a sequence a stop token ends stays for one more step.
    pub(super) fn complete(
        &mut self,
        plan: &Step,
        slot: Slot,
        cpu: Duration,
        gpu: Duration,
        late_stops: bool,
    ) -> u32 {
        let previous = std::mem::take(&mut self.ghosts);
        for &(id, _) in &plan.batch {
            if let Some(live) = self.live.get_mut(&id) {
                if live.stats.schedule(slot.gpu_start) {
                    live.flight.mark_running();
                    if let (true, Some(seq)) = (self.spec.limits.prefix_caching, self.scheduler.get(id)) {
                        self.vllm.prefix_cache(seq.prompt_tokens, seq.cached_tokens.unwrap_or(0));
                    }
                }
                live.cpu_busy += cpu;
                live.gpu_busy += gpu;
                live.gpu_waiting_for_cpu += slot.gpu_waited;
            }
        }
        let mut tokens = 0;
        // When the tokens are out: what a client sees (late if the host fell behind).
        let now = Instant::now();
        for id in self.scheduler.advance(plan) {
            let (Some(live), Some(seq)) = (self.live.get_mut(&id), self.scheduler.get_mut(id)) else {
                continue;
            };
            if live.signals.is_aborted() {
                // Its owner gave up during the step (Cancel, a limit): no token after that; the
                // next sweep takes it off the device.
                continue;
            }
            let Some(token) = live.decoder.next_token() else {
                self.stop(id, late_stops);
                continue;
            };
            let index = seq.generated;
            seq.sampled();
            let done = seq.is_done();
            // Progress first: whoever sees the token (its client) can count on its owner seeing
            // it too. Room was checked before the step (the sequence was not paused) and only
            // this loop sends, so the send cannot fail for want of room; a closed channel is
            // swept next step.
            live.signals.emitted(now.saturating_duration_since(live.stats.received()));
            let _ = live.tokens.try_send(Emitted { index, token, gpu_time: gpu, at: now });
            self.vllm.token(&mut live.stats, now);
            tokens += 1;
            // Length first, as vLLM's check_stop: a stop token that is also the last allowed
            // token ends the sequence on length.
            if done {
                self.end(id, Ok(false));
            } else if live.decoder.stopped_by_token() {
                self.stop(id, late_stops);
            }
        }
        // The step after their stop is done: what they held goes now.
        for id in previous {
            self.scheduler.remove(id);
        }
        tokens
    }

    /// Ends sequence `id`, stopped by a token: at once, or, if `late`, for its caller now and
    /// on the device after the next step (see `ghosts`).
    fn stop(&mut self, id: SeqId, late: bool) {
        if !late {
            return self.end(id, Ok(true));
        }
        let (Some(live), Some(seq)) = (self.live.remove(&id), self.scheduler.get(id)) else {
            return self.end(id, Ok(true));
        };
        self.vllm.finished(&live.stats, Finish::of(&Ok::<bool, Error>(true)), Instant::now());
        let report = report(seq, &live, true);
        tell(live, Ok(report));
        self.ghosts.push(id);
    }

    /// Takes the sequences a stop ended off the device now (it has no next step to run them
    /// through); whether there were any.
    pub(super) fn retire_ghosts(&mut self) -> bool {
        let ghosts = std::mem::take(&mut self.ghosts);
        for &id in &ghosts {
            self.scheduler.remove(id);
        }
        !ghosts.is_empty()
    }

    /// Ends sequence `id`: frees its blocks at once, then tells its task (`Ok(stopped)` or why it
    /// failed).
    pub(super) fn end(&mut self, id: SeqId, outcome: Result<bool, Error>) {
        let (seq, Some(live)) = self.retire(id, Finish::of(&outcome)) else { return };
        let outcome = match outcome {
            Err(err) => Err(err),
            Ok(stopped) => Ok(report(&seq.unwrap_or_else(|| SeqState::new(id, 0, 0)), &live, stopped)),
        };
        tell(live, outcome);
    }

    /// Takes sequence `id` off the device, its blocks freed, and counts it as finished for
    /// `reason`: the one way out, so each sequence is counted once, by any exit.
    fn retire(&mut self, id: SeqId, reason: Finish) -> (Option<SeqState>, Option<Live>) {
        let seq = self.scheduler.remove(id);
        let live = self.live.remove(&id);
        if let Some(live) = &live {
            self.vllm.finished(&live.stats, reason, Instant::now());
        }
        (seq, live)
    }

    /// Ends every sequence with `err` (shutdown).
    pub(super) fn fail_all(&mut self, err: &Error) {
        let ids: Vec<SeqId> = self.scheduler.ids().collect();
        for id in ids {
            self.end(id, Err(err.clone()));
        }
    }

    /// Publishes the prefix cache's changes since the last call as one batch.
    pub(super) fn publish_kv_events(&mut self) {
        let events = self.scheduler.pool_mut().take_events();
        self.spec.kv_events.publish(events);
    }
}

/// Tells a sequence's task how it ended. The token sender goes first, so the task reads every
/// token before the outcome.
fn tell(live: Live, outcome: Outcome) {
    drop(live.tokens);
    let _ = live.outcome.send(outcome);
}

/// How sequence `seq` went, as its caller is told.
fn report(seq: &SeqState, live: &Live, stopped: bool) -> Report {
    Report {
        stopped,
        generated: seq.generated,
        preemptions: seq.preemptions,
        peak_blocks: seq.peak_blocks,
        steps: seq.steps,
        cached_tokens: seq.cached_tokens.unwrap_or(0),
        batch_sum: seq.batch_sum,
        queue_time: live.stats.queue_time().unwrap_or_default(),
        cpu_busy: live.cpu_busy,
        gpu_busy: live.gpu_busy,
        gpu_waiting_for_cpu: live.gpu_waiting_for_cpu,
    }
}

const _: () = assert!(TOKEN_BUFFER >= 1, "a sequence needs room for a token to be scheduled");
