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

    /// Blocks the first waiting sequence needs to run whole (what a starved lane asks for).
    pub fn head_need(&self) -> u64 {
        self.waiting
            .front()
            .map(|id| &self.seqs[id])
            .map_or(0, |seq| self.blocks_wanted(seq, seq.pending_tokens().max(1)))
    }
}
