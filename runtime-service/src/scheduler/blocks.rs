//! The block pool: KV-cache blocks of a fixed number of tokens, carved out of slabs leased from
//! memory-service, handed to sequences and taken back. A plain struct with an invariant you can
//! assert, like vLLM's `BlockPool` and mistral.rs's block engine.
//!
//! Blocks are numbered; each slab owns a contiguous range of numbers. Allocation always takes the
//! lowest free numbers, so older slabs fill first and the newest ones drain first: a slab with
//! every block free can be returned to memory-service when load falls.

use std::collections::{BTreeMap, BTreeSet};

/// A block's number. Never reused across slabs (numbers only grow), so a stale number cannot
/// alias a block of a newer slab.
pub type BlockId = u64;

/// A slab is named by its first block.
pub type SlabId = BlockId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slab {
    blocks: u64,
    free: u64,
}

/// Free and used blocks over the slabs currently held.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_tokens: u32,
    free: BTreeSet<BlockId>,
    slabs: BTreeMap<SlabId, Slab>,
    next: BlockId,
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
        let id = self.next;
        self.next += blocks;
        self.free.extend(id..id + blocks);
        self.slabs.insert(id, Slab { blocks, free: blocks });
        self.total += blocks;
        id
    }

    /// Removes slab `id` if every block of it is free; false otherwise (or if unknown).
    pub fn remove_slab(&mut self, id: SlabId) -> bool {
        let Some(slab) = self.slabs.get(&id).copied() else { return false };
        if slab.free != slab.blocks {
            return false;
        }
        self.slabs.remove(&id);
        for block in id..id + slab.blocks {
            self.free.remove(&block);
        }
        self.total -= slab.blocks;
        true
    }

    /// Removes slab `id` whatever its use (its memory is gone); returns the blocks it took from
    /// sequences, which the caller must drop from their tables without releasing them.
    pub fn forget_slab(&mut self, id: SlabId) -> Option<std::ops::Range<BlockId>> {
        let slab = self.slabs.remove(&id)?;
        for block in id..id + slab.blocks {
            self.free.remove(&block);
        }
        self.total -= slab.blocks;
        Some(id..id + slab.blocks)
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
        for _ in 0..n {
            let block = self.free.pop_first()?;
            self.slab_mut(block).free -= 1;
            taken.push(block);
        }
        Some(taken)
    }

    /// Gives `blocks` back.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for block in blocks {
            if self.free.insert(block) {
                self.slab_mut(block).free += 1;
            }
        }
    }

    /// The slab `block` belongs to.
    pub fn slab_of(&self, block: BlockId) -> Option<SlabId> {
        self.slabs.range(..=block).next_back().filter(|(id, s)| block < *id + s.blocks).map(|(id, _)| *id)
    }

    fn slab_mut(&mut self, block: BlockId) -> &mut Slab {
        let (_, slab) =
            self.slabs.range_mut(..=block).next_back().expect("a held block belongs to a held slab");
        slab
    }

    /// Checks the pool's own accounting against `used`, every block held by a sequence: each
    /// held block is in exactly one place (free or one sequence), and per-slab counts agree.
    pub fn check(&self, used: &[BlockId]) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for &block in used {
            if self.free.contains(&block) {
                return Err(format!("block {block} is both free and used"));
            }
            if !seen.insert(block) {
                return Err(format!("block {block} is owned twice"));
            }
            if self.slab_of(block).is_none() {
                return Err(format!("block {block} belongs to no slab"));
            }
        }
        if self.free_blocks() + used.len() as u64 != self.total {
            return Err(format!("{} free + {} used != {} held", self.free_blocks(), used.len(), self.total));
        }
        for (&id, slab) in &self.slabs {
            let free = self.free.range(id..id + slab.blocks).count() as u64;
            if free != slab.free {
                return Err(format!("slab {id} counts {} free blocks but has {free}", slab.free));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_slabs_fill_first_so_newer_ones_can_be_returned() {
        let mut pool = BlockPool::new(16);
        let a = pool.add_slab(4);
        let b = pool.add_slab(4);
        let taken = pool.allocate(3).expect("room");
        assert!(taken.iter().all(|&blk| pool.slab_of(blk) == Some(a)));
        assert_eq!(pool.idle_slabs().collect::<Vec<_>>(), vec![(b, 4)]);
        assert!(!pool.remove_slab(a), "a slab in use stays");
        assert!(pool.remove_slab(b));
        assert_eq!((pool.total_blocks(), pool.free_blocks()), (4, 1));
        assert!(pool.allocate(2).is_none(), "all or nothing");
        pool.check(&taken).expect("consistent");
        pool.release(taken);
        assert!(pool.remove_slab(a));
        assert_eq!(pool.total_blocks(), 0);
        assert_eq!(pool.blocks_for(17), 2);
    }
}
