//! Forming one step: the running sequences first, then admissions, preempting when blocks run
//! out, and storing each full prompt block as its step is scheduled. The pure function at the
//! heart of the scheduler (see the module docs of `super` for the policy); `super` keeps the
//! state it works on and what happens around a step.

use std::collections::VecDeque;

use super::{BlockId, Scheduler, SeqId, SeqState, Step, release};
use crate::roofline::Work;

impl Scheduler {
    /// The cached blocks `seq` (waiting, holding nothing) can start from: the longest cached run
    /// of its prompt's full blocks, short of the whole prompt (its last token is always computed:
    /// that step samples the first output, as in vLLM).
    fn cache_hits(&self, seq: &SeqState) -> Vec<BlockId> {
        if !self.limits.prefix_caching || !seq.blocks.is_empty() || seq.computed > 0 {
            return Vec::new();
        }
        let most = (seq.prompt_tokens.saturating_sub(1) / self.pool.block_tokens()) as usize;
        let hashes = &seq.block_hashes[..most.min(seq.block_hashes.len())];
        self.pool.lookup(hashes, &seq.prompt_ids)
    }

    /// Stores the full prompt blocks `id` will have computed once its next `tokens` are (the step
    /// being formed computes them), as vLLM caches a block when its step is scheduled: a sequence
    /// admitted later in the same step, or in the next, finds them instead of computing the same
    /// prefix again.
    fn store_scheduled(&mut self, id: SeqId, tokens: u32) {
        if !self.limits.prefix_caching {
            return;
        }
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        let size = self.pool.block_tokens() as usize;
        let upto = (seq.computed + tokens) as usize;
        let full = (upto / size).min(seq.block_hashes.len()).min(seq.blocks.len());
        for i in seq.stored_blocks..full {
            let parent = i.checked_sub(1).map(|p| seq.block_hashes[p]);
            let ids = &seq.prompt_ids[i * size..(i + 1) * size];
            self.pool.store(seq.blocks[i], seq.block_hashes[i], parent, ids);
        }
        seq.stored_blocks = seq.stored_blocks.max(full);
    }

    fn grant(&mut self, id: SeqId, n: u64) {
        let taken = self.pool.allocate(n).unwrap_or_default();
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.blocks.extend(taken);
            seq.peak_blocks = seq.peak_blocks.max(seq.blocks.len() as u32);
        }
    }

    /// Preempts a running sequence to free its blocks for the one at `current`; returns the victim
    /// and the index it had in `running`. A sequence whose reader is behind goes first, wherever
    /// it was admitted: it sits out the next steps anyway (it is skipped, so never in this step's
    /// batch) while holding blocks others can use. Among those, and failing those, the most
    /// recently admitted goes (vLLM's order), so the oldest sequences keep their progress; that is
    /// one after `current` (not yet scheduled) or `current` itself, never one already in the batch.
    fn preempt(&mut self, plan: &mut Step, current: usize) -> Option<(SeqId, usize)> {
        let last = self.running.len().checked_sub(1)?;
        debug_assert!(current <= last, "the sequence asking is running");
        let at = (0..=last).rev().find(|&k| self.seqs[&self.running[k]].paused).unwrap_or(last);
        let victim = self.running.remove(at);
        if let Some(seq) = self.seqs.get_mut(&victim) {
            release(&mut self.pool, seq);
            seq.preempt();
        }
        self.waiting.push_front(victim);
        plan.preempted.push(victim);
        Some((victim, at))
    }

    /// Forms the next batch. Blocks for the batch are taken here; [`Scheduler::advance`] records
    /// the step's results once it has run. `can_grow` says whether more blocks may still come
    /// (memory-service had room at the last try): then a running sequence that lacks a block sits
    /// this step out and waits for the slab; only when they cannot come is someone preempted.
    pub fn schedule(&mut self, can_grow: bool) -> Step {
        let mut plan = Step::default();
        // Inside a multi-step run the batch only decodes: nobody is admitted until it ends. A run
        // ends early when nothing is left to decode (every sequence finished or paused), or a
        // waiting one would sit behind an empty device.
        let in_run = self.decode_run_left > 0 && self.running.iter().any(|id| !self.seqs[id].paused);
        self.decode_run_left = if in_run { self.decode_run_left - 1 } else { 0 };
        if !self.limits.chunked_prefill && !in_run {
            // vLLM V0 without chunked prefill: waiting prompts first, whole, in a prefill-only
            // step; the running sequences decode only in steps that admit nobody.
            self.admit(&mut plan, self.limits.token_budget, can_grow);
            if !plan.batch.is_empty() {
                return plan;
            }
        }
        let mut budget = self.limits.token_budget;
        let mut waiting_for_slab = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let tokens = seq.pending_tokens().min(budget);
            if seq.paused || tokens == 0 {
                i += 1;
                continue;
            }
            let mut wanted = self.blocks_wanted(seq, tokens);
            // While memory-service has room, grow rather than evict cached blocks: the cache is
            // worth keeping, and memory-service takes it back when another tenant needs it.
            if can_grow && wanted > self.pool.free_blocks() {
                plan.shortfall = plan.shortfall.max(wanted - self.pool.free_blocks());
                waiting_for_slab = true;
                i += 1;
                continue;
            }
            let mut preempted_self = false;
            while wanted > self.pool.available_blocks() {
                plan.shortfall = plan.shortfall.max(wanted - self.pool.available_blocks());
                match self.preempt(&mut plan, i) {
                    Some((victim, _)) if victim == id => {
                        preempted_self = true;
                        break;
                    }
                    // A paused sequence admitted earlier left: the current one moved up a place.
                    Some((_, at)) if at < i => i -= 1,
                    _ => {}
                }
                wanted = self.blocks_wanted(&self.seqs[&id], tokens);
            }
            if preempted_self {
                break; // it was the last running sequence: nothing after it
            }
            self.grant(id, wanted);
            self.store_scheduled(id, tokens);
            let seq = &self.seqs[&id];
            plan.batch.push((id, Work { tokens, context: seq.computed }));
            budget -= tokens;
            i += 1;
        }
        // Nobody overtakes a running sequence that lost its turn: no admission in a step that
        // preempted or that left a running sequence waiting for a slab.
        if plan.preempted.is_empty() && !waiting_for_slab && self.limits.chunked_prefill && !in_run {
            self.admit(&mut plan, budget, can_grow);
        }
        let decodes_only = !plan.batch.is_empty() && plan.batch.iter().all(|(_, w)| w.is_decode());
        if !in_run && decodes_only {
            self.decode_run_left = self.limits.decode_steps.saturating_sub(1);
        }
        plan
    }

    /// Admits waiting sequences in order (skipping paused ones) while they fit: in free blocks
    /// while more may come (`can_grow`), else in free and evictable ones; chunked to the budget,
    /// or whole when prefill is not chunked.
    fn admit(&mut self, plan: &mut Step, mut budget: u32, can_grow: bool) {
        let mut skipped = VecDeque::new();
        while budget > 0 && self.running.len() < self.limits.max_batch {
            let Some(id) = self.waiting.pop_front() else { break };
            let seq = &self.seqs[&id];
            if seq.paused {
                skipped.push_back(id);
                continue;
            }
            let hits = self.cache_hits(seq);
            let hit_tokens = hits.len() as u32 * self.pool.block_tokens();
            let whole = seq.tokens() - hit_tokens;
            if !self.limits.chunked_prefill && whole > budget && whole <= self.limits.token_budget {
                // Whole prompts only: this one waits for the next prefill step, and nobody
                // overtakes it. (Config::validate makes every prompt fit a step; a preempted
                // sequence recomputing more than a whole step's budget is chunked all the same.)
                self.waiting.push_front(id);
                break;
            }
            let tokens = (seq.tokens() - hit_tokens).min(budget);
            let wanted =
                self.pool.blocks_for(self.upto(seq, hit_tokens + tokens)).saturating_sub(hits.len() as u64);
            // Sharing an evictable hit takes it out of what allocation can use.
            let available = if can_grow {
                self.pool.free_blocks()
            } else {
                self.pool.available_blocks() - self.pool.evictable_among(&hits)
            };
            if wanted > available {
                plan.shortfall = plan.shortfall.max(wanted - available);
                self.waiting.push_front(id); // first come, first served: nobody overtakes it
                break;
            }
            self.pool.share(&hits);
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.blocks = hits;
                seq.stored_blocks = seq.blocks.len();
                seq.computed = hit_tokens;
                seq.cached_tokens.get_or_insert(hit_tokens);
            }
            self.grant(id, wanted);
            self.store_scheduled(id, tokens);
            let seq = &self.seqs[&id];
            plan.batch.push((id, Work { tokens, context: seq.computed }));
            self.running.push(id);
            budget -= tokens;
        }
        while let Some(id) = skipped.pop_back() {
            self.waiting.push_front(id);
        }
    }
}
