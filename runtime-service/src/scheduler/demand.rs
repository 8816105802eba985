//! What one model's lane asks memory-service for: the free blocks its next steps will want, and,
//! when it is starved, what its first waiting sequence needs. The leaser in [`crate::kv`] turns
//! these into slab leases; the lane compares against them before returning a slab.

use super::Scheduler;

impl Scheduler {
    /// Free blocks the lane should have to run everything it holds without waiting: what the
    /// waiting sequences need to be admitted whole (as many as the batch has room for), plus
    /// what the running ones need for their next `lookahead` tokens. The leaser leases the
    /// difference ahead of the steps that need it.
    pub fn demand(&self, lookahead: u32) -> u64 {
        let running: u64 = self
            .running
            .iter()
            .map(|id| &self.seqs[id])
            .map(|seq| self.blocks_wanted(seq, seq.pending_tokens() + lookahead))
            .sum();
        // The queue counts only as far as the next two steps could admit: leasing for the whole
        // queue at once would let one runtime take a shared pool from the others.
        let room = self.limits.max_batch.saturating_sub(self.running.len());
        let mut tokens = 0u64;
        let horizon = 2 * u64::from(self.limits.token_budget);
        let waiting: u64 = self
            .waiting
            .iter()
            .map(|id| &self.seqs[id])
            .filter(|seq| !seq.paused)
            .take(room)
            .take_while(|seq| {
                let first = tokens == 0;
                tokens += u64::from(seq.pending_tokens());
                first || tokens <= horizon
            })
            .map(|seq| self.blocks_wanted(seq, seq.pending_tokens()))
            .sum();
        running + waiting
    }

    /// Blocks the first waiting sequence (that the next step could admit: not paused) needs to run
    /// to completion: its prompt and every token it may generate. This is what a starved lane asks
    /// for. Asking only for what it holds now would let it fill its last block, find memory-service
    /// still full, preempt itself and start over from zero at every block boundary: quadratic work
    /// for a long sequence in a contended pool. The whole need is known to fit: a generation larger
    /// than the kv-cache pool is refused before it reaches the device.
    pub fn head_need(&self) -> u64 {
        self.waiting.iter().map(|id| &self.seqs[id]).find(|seq| !seq.paused).map_or(0, |seq| {
            let whole = self.pool.blocks_for(seq.prompt_tokens.saturating_add(seq.max_tokens));
            whole.saturating_sub(seq.blocks.len() as u64)
        })
    }
}
