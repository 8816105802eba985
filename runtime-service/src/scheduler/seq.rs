//! One sequence as the scheduler sees it: token counts, its block table and what it went through.

use super::BlockId;

/// A sequence's id, unique within a device.
pub type SeqId = u64;

/// A sequence's scheduling state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqState {
    /// Its id.
    pub id: SeqId,
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Completion tokens to generate at most.
    pub max_tokens: u32,
    /// Completion tokens sampled so far (streamed, never again after a preemption).
    pub generated: u32,
    /// Tokens whose KV is computed (0 again after a preemption: they are recomputed).
    pub computed: u32,
    /// Its block table.
    pub blocks: Vec<BlockId>,
    /// Skipped by the scheduler while its reader is behind (its output buffer is full).
    pub paused: bool,
    /// Times it was preempted.
    pub preemptions: u32,
    /// Most blocks it held at once.
    pub peak_blocks: u32,
    /// Steps it took part in.
    pub steps: u64,
    /// Sum of the batch sizes of those steps (for the mean batch it shared).
    pub batch_sum: u64,
}

impl SeqState {
    /// A new sequence, waiting, holding nothing.
    pub fn new(id: SeqId, prompt_tokens: u32, max_tokens: u32) -> Self {
        SeqState {
            id,
            prompt_tokens,
            max_tokens,
            generated: 0,
            computed: 0,
            blocks: Vec::new(),
            paused: false,
            preemptions: 0,
            peak_blocks: 0,
            steps: 0,
            batch_sum: 0,
        }
    }

    /// Tokens the sequence consists of: its prompt and what it generated so far.
    pub fn tokens(&self) -> u32 {
        self.prompt_tokens + self.generated
    }

    /// Tokens still to compute before it can sample its next token: the rest of the prompt
    /// (plus, after a preemption, the tokens it had generated), or the last sampled token.
    pub fn pending_tokens(&self) -> u32 {
        self.tokens().saturating_sub(self.computed)
    }

    /// Whether it generated all it may.
    pub fn is_done(&self) -> bool {
        self.generated >= self.max_tokens
    }

    /// Records a sampled token.
    pub fn sampled(&mut self) {
        self.generated += 1;
    }

    /// Forgets its computed KV (its blocks were taken back): everything is recomputed on return.
    pub(super) fn preempt(&mut self) {
        self.computed = 0;
        self.preemptions += 1;
    }
}
