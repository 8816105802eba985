//! One model's lane on the device: its scheduler and blocks, the slabs behind them, and the I/O
//! side of each sequence (decoder, event channel, cancellation).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{Emitted, Outcome, Report, Submission, TOKEN_BUFFER, timeline::Slot};
use crate::{
    error::Error,
    executor::Flight,
    kv::{Grant, Link},
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

/// Tokens of growth the running sequences' blocks are leased ahead for: slabs arrive within a
/// round trip to memory-service, far less than this many steps.
const LOOKAHEAD_TOKENS: u32 = 4;

/// The I/O side of one sequence.
#[derive(Debug)]
struct Live {
    decoder: Decoder,
    tokens: mpsc::Sender<Emitted>,
    outcome: oneshot::Sender<Outcome>,
    abort: CancellationToken,
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
        }
    }

    pub(super) fn add(&mut self, id: SeqId, submission: Submission, now: Instant) {
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
                abort: submission.abort,
                flight: submission.flight,
                span: submission.span,
                stats: RequestStats::new(submission.received, now, submission.prompt_tokens),
                cpu_busy: Duration::ZERO,
                gpu_busy: Duration::ZERO,
                gpu_waiting_for_cpu: Duration::ZERO,
            },
        );
    }

    /// Takes every slab the leaser has granted.
    pub(super) fn absorb_grants(&mut self) {
        while let Some(Grant { blocks, lease }) = self.link.try_grant() {
            let id = self.scheduler.pool_mut().add_slab(blocks);
            self.slabs.insert(id, lease);
        }
    }

    /// Drops sequences whose caller left, pauses those whose reader is behind, and fails those
    /// whose KV memory memory-service lost.
    pub(super) fn sweep(&mut self) {
        let ids: Vec<SeqId> = self.scheduler.ids().collect();
        for id in ids {
            let Some(live) = self.live.get(&id) else { continue };
            if live.abort.is_cancelled() || live.tokens.is_closed() {
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

    /// Whether the lane holds nothing it can use and cannot start its first sequence: nothing
    /// runs, something waits, and memory-service had no room. Then it gives back every slab and
    /// asks for the first sequence's whole need at once (see [`crate::kv`]).
    fn starved(&self) -> bool {
        self.scheduler.running() == 0 && self.scheduler.waiting() > 0 && self.link.exhausted()
    }

    /// Publishes how many free blocks the lane wants to its leaser: enough to admit the next
    /// waiting sequences whole and to grow the running ones for a few more tokens, plus the low
    /// watermark; when starved, exactly what the first waiting sequence needs to run to its end.
    pub(super) fn publish_demand(&mut self) {
        let starved = self.starved();
        let want = if self.scheduler.is_empty() {
            0
        } else if starved {
            self.scheduler.head_need()
        } else {
            self.wanted_free()
        };
        let free = self.scheduler.pool().free_blocks();
        // The lease joins the trace of a sequence waiting for it (the queue's head, else a running
        // one about to grow).
        let cause = if want > free {
            let id = self.scheduler.waiting_ids().next().or_else(|| self.scheduler.ids().next());
            id.and_then(|id| self.live.get(&id))
        } else {
            None
        };
        self.link.set(want, free, cause.map(|live| &live.span), starved);
    }

    /// Free blocks a busy lane wants: what its next steps need and the low watermark.
    fn wanted_free(&self) -> u64 {
        self.scheduler.demand(LOOKAHEAD_TOKENS) + self.spec.low_watermark
    }

    /// Whether more blocks may still come from memory-service.
    pub(super) fn can_grow(&self) -> bool {
        self.link.can_grow()
    }

    /// While memory-service is unreachable, sequences that wait for blocks they cannot get fail
    /// at once with the leaser's error instead of waiting for their deadline; those holding
    /// blocks go on. Called after the lane's schedule, so the waiting ones are those it could not
    /// admit.
    pub(super) fn fail_if_unreachable(&mut self) {
        let Some(err) = self.link.failure() else { return };
        let blocked: Vec<SeqId> = self.scheduler.waiting_ids().collect();
        for id in blocked {
            self.end(id, Err(err.clone()));
        }
    }

    /// Returns slabs memory-service may give to others: while busy, one per step that leaves a
    /// slab's worth of free blocks beyond what the next steps want; all idle ones once the lane has
    /// been empty for `linger`. Dropping a lease frees it in the background.
    pub(super) fn return_slabs(&mut self, now: Instant, linger: Duration) -> usize {
        let pool = self.scheduler.pool();
        let victims: Vec<SlabId> = if self.starved() {
            // Holding part of what it needs while waiting for the rest could deadlock with
            // another lane doing the same: give it all back (nothing runs, so nothing is
            // referenced; cached blocks are evicted with their slab).
            pool.idle_slabs().chain(pool.cache_only_slabs()).map(|(id, _)| id).collect()
        } else if self.scheduler.is_empty() {
            let since = *self.idle_since.get_or_insert(now);
            if now < since + linger {
                return 0;
            }
            pool.idle_slabs().map(|(id, _)| id).collect()
        } else if self.scheduler.waiting() == 0 {
            // Measured against the demand this lane publishes next (not the low watermark alone):
            // a slab returned below it would be leased again at the next step, one Allocate and
            // one Free per step for nothing. The extra slab's worth is the hysteresis between
            // leasing (free below the demand) and returning, so small swings in demand do not
            // flip between the two.
            let high = self.wanted_free() + self.spec.slab_blocks;
            pool.idle_slabs()
                .find(|&(_, blocks)| pool.free_blocks().saturating_sub(blocks) >= high)
                .map(|(id, _)| id)
                .into_iter()
                .collect()
        } else {
            return 0;
        };
        for &id in &victims {
            if self.scheduler.pool_mut().evict_slab(id) {
                self.slabs.remove(&id);
            }
        }
        victims.len()
    }

    /// The lane's slabs are all idle and it has no sequence: when to return them.
    pub(super) fn release_due(&self, linger: Duration) -> Option<Instant> {
        let idle = self.scheduler.is_empty() && self.scheduler.pool().slabs() > 0;
        idle.then(|| self.idle_since.map(|since| since + linger)).flatten()
    }

    /// Prices `plan`'s batch.
    pub(super) fn price(&self, plan: &Step) -> StepCost {
        self.spec.roofline.step(plan.batch.iter().map(|&(_, work): &(SeqId, Work)| work))
    }

    /// Records that `plan` ran in `slot` at `cost` (with `gpu` after jitter): advances every
    /// sequence, streams the tokens sampled, and ends the sequences that are done.
    pub(super) fn complete(&mut self, plan: &Step, slot: Slot, cpu: Duration, gpu: Duration) -> u32 {
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
            let Some(token) = live.decoder.next_token() else {
                self.end(id, Ok(true));
                continue;
            };
            let index = seq.generated;
            seq.sampled();
            let done = seq.is_done();
            // Room was checked before the step (the sequence was not paused) and only this loop
            // sends, so this cannot fail for want of room; a closed channel is swept next step.
            let _ = live.tokens.try_send(Emitted { index, token, gpu_time: gpu });
            self.vllm.token(&mut live.stats, now);
            tokens += 1;
            // Length first, as vLLM's check_stop: a stop token that is also the last allowed
            // token ends the sequence on length.
            if done {
                self.end(id, Ok(false));
            } else if live.decoder.stopped_by_token() {
                self.end(id, Ok(true));
            }
        }
        tokens
    }

    /// Ends sequence `id`: frees its blocks at once, then tells its task (`Ok(stopped)` or why it
    /// failed).
    pub(super) fn end(&mut self, id: SeqId, outcome: Result<bool, Error>) {
        let (seq, Some(live)) = self.retire(id, Finish::of(&outcome)) else { return };
        let outcome = match outcome {
            Err(err) => Err(err),
            Ok(stopped) => {
                let seq = seq.unwrap_or_else(|| SeqState::new(id, 0, 0));
                Ok(Report {
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
                })
            }
        };
        // The token sender goes first, so the task reads every token before the outcome.
        drop(live.tokens);
        let _ = live.outcome.send(outcome);
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

    /// The slabs holding only cache, oldest first.
    pub(super) fn cache_only_slabs(&self) -> impl Iterator<Item = SlabId> + '_ {
        self.scheduler.pool().cache_only_slabs().map(|(id, _)| id)
    }

    /// Lease ids of the slabs holding only cache: memory-service may have them back.
    pub(super) fn offered(&self) -> impl Iterator<Item = String> + '_ {
        self.scheduler
            .pool()
            .cache_only_slabs()
            .filter_map(|(id, _)| self.slabs.get(&id)?.as_ref())
            .flat_map(|lease| lease.leases().iter().cloned())
    }

    /// Evicts the slab leased as `lease` if it still holds only cache; its blocks and its lease,
    /// for the caller to free.
    pub(super) fn reclaim(&mut self, lease: &str) -> Option<(u64, Option<Reservation>)> {
        let (&id, _) = self
            .slabs
            .iter()
            .find(|(_, held)| held.as_ref().is_some_and(|r| r.leases().iter().any(|l| l == lease)))?;
        let blocks = self.scheduler.pool().cache_only_slabs().find(|&(slab, _)| slab == id)?.1;
        if !self.scheduler.pool_mut().evict_slab(id) {
            return None;
        }
        let reservation = self.slabs.remove(&id).flatten();
        self.reclaimed_blocks += blocks;
        Some((blocks, reservation))
    }

    /// Publishes the prefix cache's changes since the last call as one batch.
    pub(super) fn publish_kv_events(&mut self) {
        let events = self.scheduler.pool_mut().take_events();
        self.spec.kv_events.publish(events);
    }

    /// Blocks the whole kv-cache pool could hold (0 until the leaser has asked memory-service).
    pub(super) fn kv_capacity(&self) -> u64 {
        self.link.capacity()
    }

    /// Blocks used and held, and slabs held.
    pub(super) fn kv(&self) -> (u64, u64, usize) {
        let pool = self.scheduler.pool();
        (pool.used_blocks(), pool.total_blocks(), pool.slabs())
    }
}

const _: () = assert!(TOKEN_BUFFER >= 1, "a sequence needs room for a token to be scheduled");
