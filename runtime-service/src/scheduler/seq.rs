//! One sequence as the scheduler sees it: token counts, its block table and what it went through.

use std::sync::Arc;

use super::{BlockHash, BlockId};

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
    /// Its prompt's token ids, when known (a prompt the model could not tokenize has none, and is
    /// neither looked up in nor added to the prefix cache).
    pub prompt_ids: Arc<[u32]>,
    /// Chained hashes of its prompt's full blocks (empty with the prefix cache off).
    pub block_hashes: Arc<[BlockHash]>,
    /// Leading prompt blocks of its table the prefix cache has seen: found there, stored since,
    /// or computed while another block held the same content (that one stays the cached one).
    pub stored_blocks: usize,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    pub cached_tokens: Option<u32>,
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
            prompt_ids: Arc::from([]),
            block_hashes: Arc::from([]),
            stored_blocks: 0,
            cached_tokens: None,
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

    /// The same sequence with its prompt's ids and their block hashes, for the prefix cache.
    pub fn with_prompt(mut self, ids: Arc<[u32]>, hashes: Vec<BlockHash>) -> Self {
        self.prompt_ids = ids;
        self.block_hashes = hashes.into();
        self
    }

    /// Records a sampled token.
    pub fn sampled(&mut self) {
        self.generated += 1;
    }

    /// Forgets its computed KV (its blocks were taken back): everything is recomputed on return.
    pub(super) fn preempt(&mut self) {
        self.computed = 0;
        self.stored_blocks = 0;
        self.preemptions += 1;
    }
}
