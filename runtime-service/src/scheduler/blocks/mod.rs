//! The block pool: KV-cache blocks of a fixed number of tokens, carved out of slabs leased from
//! memory-service, handed to sequences and taken back. A plain struct with an invariant you can
//! assert, like vLLM's `BlockPool` and mistral.rs's block engine.
//!
//! Blocks are numbered; each slab owns a contiguous range of numbers. Allocation always takes the
//! lowest free numbers, so older slabs fill first and the newest ones drain first: a slab with
//! every block free can be returned to memory-service when load falls.

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    ops::Range,
};

/// A block, by number. Only the pool mints them, and numbers only grow (a removed or lost slab's
/// numbers are never handed out again), so a block id held after its slab went is stale, never an
/// alias of a newer slab's block. A type of its own, not an integer: nothing else (a slab id, a
/// count, a sequence id) can be passed where a block is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(u64);

/// A slab, named by the number of its first block; a type of its own so it is never taken for a
/// block (every block but the first of a slab would then credit the wrong one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlabId(u64);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

impl fmt::Display for SlabId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slab {}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slab {
    blocks: u64,
    free: u64,
}

impl Slab {
    fn range(&self, id: SlabId) -> Range<BlockId> {
        BlockId(id.0)..BlockId(id.0 + self.blocks)
    }
}

/// The held slab whose range holds `block`, if any. Both bounds are checked: the nearest slab at
/// or below a stale block (of a slab since removed or lost) or one past every slab is a different
/// slab, and crediting it would corrupt its free count.
fn containing(slabs: &mut BTreeMap<SlabId, Slab>, block: BlockId) -> Option<&mut Slab> {
    let (&id, slab) = slabs.range_mut(..=SlabId(block.0)).next_back()?;
    slab.range(id).contains(&block).then_some(slab)
}

/// Free and used blocks over the slabs currently held.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_tokens: u32,
    free: BTreeSet<BlockId>,
    slabs: BTreeMap<SlabId, Slab>,
    /// The next number to hand out: every block ever minted is below it.
    next: u64,
    total: u64,
}

impl BlockPool {
    /// An empty pool of blocks of `block_tokens` tokens (at least 1).
    pub fn new(block_tokens: u32) -> Self {
        BlockPool {
            block_tokens: block_tokens.max(1),
            free: BTreeSet::new(),
            slabs: BTreeMap::new(),
            next: 0,
            total: 0,
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: u32) -> u64 {
        u64::from(tokens).div_ceil(u64::from(self.block_tokens))
    }

    /// Blocks free.
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64
    }

    /// Blocks held (free or used).
    pub fn total_blocks(&self) -> u64 {
        self.total
    }

    /// Blocks handed to sequences.
    pub fn used_blocks(&self) -> u64 {
        self.total - self.free_blocks()
    }

    /// Slabs held.
    pub fn slabs(&self) -> usize {
        self.slabs.len()
    }

    /// Adds a slab of `blocks` free blocks; returns its id.
    pub fn add_slab(&mut self, blocks: u64) -> SlabId {
        let id = SlabId(self.next);
        self.next += blocks;
        let slab = Slab { blocks, free: blocks };
        self.free.extend((id.0..id.0 + blocks).map(BlockId));
        self.slabs.insert(id, slab);
        self.total += blocks;
        id
    }

    /// Removes slab `id` if every block of it is free; false otherwise (or if unknown).
    pub fn remove_slab(&mut self, id: SlabId) -> bool {
        let Some(slab) = self.slabs.get(&id).copied() else { return false };
        if slab.free != slab.blocks {
            return false;
        }
        self.drop_slab(id, slab);
        true
    }

    /// Removes slab `id` whatever its use (its memory is gone); returns the blocks it took from
    /// sequences, which the caller must drop from their tables without releasing them (a release
    /// of one would be refused: it is stale).
    pub fn forget_slab(&mut self, id: SlabId) -> Option<Range<BlockId>> {
        let slab = self.slabs.get(&id).copied()?;
        self.drop_slab(id, slab);
        Some(slab.range(id))
    }

    fn drop_slab(&mut self, id: SlabId, slab: Slab) {
        self.slabs.remove(&id);
        for n in id.0..id.0 + slab.blocks {
            self.free.remove(&BlockId(n));
        }
        self.total -= slab.blocks;
    }

    /// Every slab held, oldest first.
    pub fn slab_ids(&self) -> Vec<SlabId> {
        self.slabs.keys().copied().collect()
    }

    /// Slabs whose blocks are all free, newest first (the ones to return first).
    pub fn idle_slabs(&self) -> impl Iterator<Item = (SlabId, u64)> + '_ {
        self.slabs.iter().rev().filter(|(_, s)| s.free == s.blocks).map(|(&id, s)| (id, s.blocks))
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<BlockId>> {
        if n > self.free_blocks() {
            return None;
        }
        let mut taken = Vec::with_capacity(n as usize);
        while (taken.len() as u64) < n {
            let Some(block) = self.free.pop_first() else {
                // Only if a free block had no slab, which `check` rules out: give back, take none.
                let refused = self.release(taken);
                debug_assert_eq!(refused, 0, "blocks just taken go back");
                return None;
            };
            // Free blocks are always in a held slab (release refuses any other), so this skips
            // nothing; were one orphaned, it is dropped rather than handed out.
            if let Some(slab) = containing(&mut self.slabs, block) {
                slab.free -= 1;
                taken.push(block);
            }
        }
        Some(taken)
    }

    /// Gives `blocks` back; returns how many were refused: a block of no held slab (stale, its
    /// slab returned or lost), or one already free. A refused block changes nothing.
    #[must_use = "a refused block means its holder's block table was stale"]
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) -> usize {
        let mut refused = 0;
        for block in blocks {
            match containing(&mut self.slabs, block) {
                Some(slab) if self.free.insert(block) => slab.free += 1,
                _ => refused += 1,
            }
        }
        refused
    }

    /// The slab `block` belongs to.
    pub fn slab_of(&self, block: BlockId) -> Option<SlabId> {
        let (&id, slab) = self.slabs.range(..=SlabId(block.0)).next_back()?;
        slab.range(id).contains(&block).then_some(id)
    }

    /// Checks the pool's own accounting against `used`, every block held by a sequence: each
    /// held block is in exactly one place (free or one sequence) and in a held slab, every number
    /// was minted here, and per-slab counts agree.
    pub fn check(&self, used: &[BlockId]) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for &block in used {
            if self.free.contains(&block) {
                return Err(format!("{block} is both free and used"));
            }
            if !seen.insert(block) {
                return Err(format!("{block} is owned twice"));
            }
        }
        for &block in used.iter().chain(&self.free) {
            if block.0 >= self.next {
                return Err(format!("{block} was never minted (next is {})", self.next));
            }
            if self.slab_of(block).is_none() {
                return Err(format!("{block} belongs to no slab"));
            }
        }
        if self.free_blocks() + used.len() as u64 != self.total {
            return Err(format!("{} free + {} used != {} held", self.free_blocks(), used.len(), self.total));
        }
        for (&id, slab) in &self.slabs {
            let free = self.free.range(slab.range(id)).count() as u64;
            if free != slab.free {
                return Err(format!("{id} counts {} free blocks but has {free}", slab.free));
            }
        }
        Ok(())
    }
}
