//! Continuous batching for one model on the device: which sequences run in the next step, with how
//! many tokens each, and who is preempted when KV blocks run out. A pure step over plain state
//! (vLLM's `Scheduler.schedule()`, TGI's `State::next_batch`); the device loop around it does the
//! timing and the I/O.
//!
//! Each step: running sequences first, in admission order, one token each (or the next chunk of a
//! prompt still being prefilled), within a token budget; a sequence whose next token needs a block
//! that is not free preempts a running sequence whose reader is behind (it would sit the next
//! steps out anyway), else the most recently admitted (possibly itself); the victim gives back
//! every block and goes to the front of the queue to be recomputed. Then, if nobody was
//! preempted, waiting sequences are admitted first-come first-served while the budget, the batch
//! size and the free blocks allow.
//!
//! With the prefix cache, a sequence starts from the longest run of cached blocks holding its
//! prompt (shared, not copied: it computes only the rest, while attention still reads the whole
//! context), and each full prompt block it is scheduled to compute is stored for those that
//! follow, from the same step on.

pub mod blocks;
mod demand;
mod seq;
mod step;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cache;
#[cfg(test)]
mod tests_props;

use std::collections::{HashMap, VecDeque};

pub use crate::config::KvReserve;

pub use self::{
    blocks::{BlockHash, BlockId, BlockPool, KvEvent, SlabId, chain_hashes},
    seq::{SeqId, SeqState},
};
use crate::roofline::Work;

/// What one step may hold: sequences, tokens, and how KV blocks are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Sequences in one batch at most.
    pub max_batch: usize,
    /// Tokens computed in one step at most (decodes count one each).
    pub token_budget: u32,
    /// How KV blocks are taken.
    pub reserve: KvReserve,
    /// Whether full prompt blocks are cached and reused across sequences.
    pub prefix_caching: bool,
    /// Whether prompts are chunked to fit the token budget and mixed with decodes (vLLM V1,
    /// SGLang); off, a step either prefills whole prompts or decodes (vLLM V0's default).
    pub chunked_prefill: bool,
    /// Decode steps run back to back per schedule, admitting nobody in between (vLLM 0.6's
    /// `--num-scheduler-steps`); 1 schedules every step.
    pub decode_steps: u32,
}

/// The outcome of [`Scheduler::schedule`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Sequences in the batch and their work, in batch order.
    pub batch: Vec<(SeqId, Work)>,
    /// Sequences preempted by this step (their blocks are already free).
    pub preempted: Vec<SeqId>,
    /// Blocks the step wanted but could not get (0 if it got everything): the demand to lease.
    pub shortfall: u64,
}

/// The state of one model's sequences and KV blocks.
#[derive(Debug)]
pub struct Scheduler {
    pool: BlockPool,
    limits: StepLimits,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// Decode steps left in the current multi-step run (see [`StepLimits::decode_steps`]).
    decode_run_left: u32,
}

impl Scheduler {
    /// An empty scheduler over an empty block pool.
    pub fn new(block_tokens: u32, limits: StepLimits) -> Self {
        Scheduler {
            pool: BlockPool::new(block_tokens),
            limits,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            decode_run_left: 0,
        }
    }

    /// The block pool (to add or return slabs).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The block pool, mutably: slabs come and go between steps.
    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    /// Sequences waiting (new or preempted).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and holding blocks.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether there is no sequence at all.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// A sequence's state.
    pub fn get(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    /// A sequence's state, mutably (to pause it or record its outputs).
    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut SeqState> {
        self.seqs.get_mut(&id)
    }

    /// Every sequence id, running first.
    pub fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.running.iter().chain(self.waiting.iter()).copied()
    }

    /// Waiting sequences, front first.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Queues a new sequence at the back.
    pub fn add(&mut self, seq: SeqState) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Removes a sequence (finished, cancelled or failed) and frees its blocks at once.
    pub fn remove(&mut self, id: SeqId) -> Option<SeqState> {
        let mut seq = self.seqs.remove(&id)?;
        release(&mut self.pool, &mut seq);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Some(seq)
    }

    /// Drops slab `slab` whose memory was lost; returns the sequences that held blocks in it,
    /// which the caller must fail (their KV is gone).
    pub fn lose_slab(&mut self, slab: SlabId) -> Vec<SeqId> {
        let Some(range) = self.pool.forget_slab(slab) else { return Vec::new() };
        let hit: Vec<SeqId> =
            self.ids().filter(|id| self.seqs[id].blocks.iter().any(|b| range.contains(b))).collect();
        for id in &hit {
            if let Some(seq) = self.seqs.get_mut(id) {
                seq.blocks.retain(|b| !range.contains(b));
            }
        }
        hit
    }

    /// Blocks `seq` must hold to compute `tokens` more tokens.
    fn blocks_wanted(&self, seq: &SeqState, tokens: u32) -> u64 {
        self.pool.blocks_for(self.upto(seq, seq.computed + tokens)).saturating_sub(seq.blocks.len() as u64)
    }

    /// Tokens whose KV `seq` must have room for once `computed` are computed.
    fn upto(&self, seq: &SeqState, computed: u32) -> u32 {
        match self.limits.reserve {
            KvReserve::Paged => computed,
            KvReserve::Upfront => seq.prompt_tokens + seq.max_tokens,
        }
    }

    /// Records that `plan`'s batch ran: each sequence's computed tokens advance. Returns the
    /// sequences that now sample a token (their prompt, or their last token, is fully computed).
    pub fn advance(&mut self, plan: &Step) -> Vec<SeqId> {
        let mut sampling = Vec::with_capacity(plan.batch.len());
        for &(id, work) in &plan.batch {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.computed += work.tokens;
                seq.steps += 1;
                seq.batch_sum += plan.batch.len() as u64;
                if seq.pending_tokens() == 0 {
                    sampling.push(id);
                }
            }
        }
        sampling
    }

    /// Every block held by a sequence, for [`BlockPool::check`].
    pub fn used_blocks(&self) -> Vec<BlockId> {
        self.seqs.values().flat_map(|s| s.blocks.iter().copied()).collect()
    }

    /// Checks the block accounting and the queues (property tests, debug builds).
    pub fn check(&self) -> Result<(), String> {
        self.pool.check(&self.used_blocks())?;
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return Err(format!(
                "{} running + {} waiting != {} sequences",
                self.running.len(),
                self.waiting.len(),
                self.seqs.len()
            ));
        }
        if let Some(id) = self.waiting.iter().find(|id| !self.seqs[id].blocks.is_empty()) {
            return Err(format!("waiting sequence {id} holds blocks"));
        }
        Ok(())
    }
}

/// Gives every block of `seq` back to `pool`. None is refused: a sequence's table holds only blocks
/// of held slabs, since [`Scheduler::lose_slab`] strikes a lost slab's blocks from it.
fn release(pool: &mut BlockPool, seq: &mut SeqState) {
    // Tail first: its prefix, which others are likelier to share, is evicted last.
    let refused = pool.release(seq.blocks.drain(..).rev());
    debug_assert_eq!(refused, 0, "sequence {} held blocks of no slab", seq.id);
}
