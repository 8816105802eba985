//! The block pool: KV-cache blocks of a fixed number of tokens, carved out of slabs leased from
//! memory-service, handed to sequences and taken back. A plain struct with an invariant you can
//! assert, like vLLM's `BlockPool` and mistral.rs's block engine.
//!
//! Blocks are numbered; each slab owns a contiguous range of numbers. Allocation always takes the
//! lowest free numbers, so older slabs fill first and the newest ones drain first: a slab with
//! every block free can be returned to memory-service when load falls.
//!
//! With the prefix cache, a full block's KV outlives its sequence: it is counted by references
//! (several sequences share a cached prefix), and when the last goes it stays cached and
//! evictable rather than free. Every block is in exactly one state: free (no content, no
//! reference), referenced (by one or more sequences; cached or not), or evictable (cached, no
//! reference). Allocation takes free blocks first, then evicts the least recently used.

mod cache;
mod invariants;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cache;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    ops::Range,
};

use self::cache::PrefixCache;
pub use self::cache::{BlockHash, KvEvent, chain_hashes};

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
    /// Blocks with no content and no reference.
    free: u64,
    /// Cached blocks with no reference.
    evictable: u64,
}

impl Slab {
    fn range(&self, id: SlabId) -> Range<BlockId> {
        BlockId(id.0)..BlockId(id.0 + self.blocks)
    }

    /// No sequence references any of its blocks.
    fn unreferenced(&self) -> bool {
        self.free + self.evictable == self.blocks
    }
}

/// The held slab whose range holds `block`, if any. Both bounds are checked: the nearest slab at
/// or below a stale block (of a slab since removed or lost) or one past every slab is a different
/// slab, and crediting it would corrupt its counts.
fn containing(slabs: &mut BTreeMap<SlabId, Slab>, block: BlockId) -> Option<&mut Slab> {
    let (&id, slab) = slabs.range_mut(..=SlabId(block.0)).next_back()?;
    slab.range(id).contains(&block).then_some(slab)
}

/// Free, referenced and cached blocks over the slabs currently held.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_tokens: u32,
    free: BTreeSet<BlockId>,
    slabs: BTreeMap<SlabId, Slab>,
    /// The next number to hand out: every block ever minted is below it.
    next: u64,
    total: u64,
    /// References per referenced block (a block is here exactly while some sequence holds it).
    refs: HashMap<BlockId, u32>,
    cache: PrefixCache,
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
            refs: HashMap::new(),
            cache: PrefixCache::default(),
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

    /// Blocks with no content and no reference.
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64
    }

    /// Blocks [`BlockPool::allocate`] can hand out: the free ones and the evictable cached ones.
    pub fn available_blocks(&self) -> u64 {
        self.free_blocks() + self.cache.evictable() as u64
    }

    /// Blocks held (free, referenced or evictable).
    pub fn total_blocks(&self) -> u64 {
        self.total
    }

    /// Blocks some sequence references.
    pub fn used_blocks(&self) -> u64 {
        self.refs.len() as u64
    }

    /// Blocks whose KV is cached (referenced or not).
    pub fn cached_blocks(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Slabs held.
    pub fn slabs(&self) -> usize {
        self.slabs.len()
    }

    /// Adds a slab of `blocks` free blocks; returns its id.
    pub fn add_slab(&mut self, blocks: u64) -> SlabId {
        let id = SlabId(self.next);
        self.next += blocks;
        let slab = Slab { blocks, free: blocks, evictable: 0 };
        self.free.extend((id.0..id.0 + blocks).map(BlockId));
        self.slabs.insert(id, slab);
        self.total += blocks;
        id
    }

    /// Removes slab `id` if every block of it is free (no content either); false otherwise.
    pub fn remove_slab(&mut self, id: SlabId) -> bool {
        let Some(slab) = self.slabs.get(&id).copied() else { return false };
        if slab.free != slab.blocks {
            return false;
        }
        self.drop_slab(id, slab);
        true
    }

    /// Removes slab `id` if no sequence references its blocks, evicting the cached ones; false
    /// otherwise. How a cache gives memory back.
    pub fn evict_slab(&mut self, id: SlabId) -> bool {
        let Some(slab) = self.slabs.get(&id).copied() else { return false };
        if !slab.unreferenced() {
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
            let block = BlockId(n);
            self.free.remove(&block);
            self.refs.remove(&block);
            self.cache.forget(block);
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

    /// Slabs no sequence references that hold cached blocks: memory kept only as a cache.
    pub fn cache_only_slabs(&self) -> impl Iterator<Item = (SlabId, u64)> + '_ {
        self.slabs.iter().filter(|(_, s)| s.unreferenced() && s.evictable > 0).map(|(&id, s)| (id, s.blocks))
    }

    /// Takes `n` blocks, all or none: free ones first, lowest numbers first, then the least
    /// recently used evictable ones, whose cached content is forgotten.
    pub fn allocate(&mut self, n: u64) -> Option<Vec<BlockId>> {
        if n > self.available_blocks() {
            return None;
        }
        let mut taken = Vec::with_capacity(n as usize);
        while (taken.len() as u64) < n {
            let block = if let Some(block) = self.free.pop_first() {
                // Free blocks are always in a held slab (drop_slab removes them with it).
                match containing(&mut self.slabs, block) {
                    Some(slab) => slab.free -= 1,
                    None => continue,
                }
                block
            } else if let Some(block) = self.cache.evict_oldest() {
                match containing(&mut self.slabs, block) {
                    Some(slab) => slab.evictable -= 1,
                    None => continue,
                }
                block
            } else {
                // Only if a counted block had no slab, which `check` rules out: give back.
                let refused = self.release(taken.into_iter().rev());
                debug_assert_eq!(refused, 0, "blocks just taken go back");
                return None;
            };
            self.refs.insert(block, 1);
            taken.push(block);
        }
        Some(taken)
    }

    /// The longest run of cached blocks holding `ids` block by block, whose chained hashes are
    /// `hashes` (see [`chain_hashes`]). Nothing is referenced yet: see [`BlockPool::share`].
    pub fn lookup(&self, hashes: &[BlockHash], ids: &[u32]) -> Vec<BlockId> {
        let size = self.block_tokens as usize;
        hashes
            .iter()
            .zip(ids.chunks_exact(size))
            .map_while(|(&hash, block_ids)| self.cache.find(hash, block_ids))
            .collect()
    }

    /// How many of `blocks` (a lookup's result) are evictable: sharing them takes them out of
    /// [`BlockPool::available_blocks`].
    pub fn evictable_among(&self, blocks: &[BlockId]) -> u64 {
        blocks.iter().filter(|&&b| self.cache.is_evictable(b)).count() as u64
    }

    /// References each of `blocks` (cached: a lookup's result) once more.
    pub fn share(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            if !self.cache.contains(block) {
                debug_assert!(false, "{block} shared but not cached");
                continue;
            }
            let refs = self.refs.entry(block).or_insert(0);
            *refs += 1;
            if *refs == 1 {
                self.cache.unpark(block);
                if let Some(slab) = containing(&mut self.slabs, block) {
                    slab.evictable -= 1;
                }
            }
        }
    }

    /// Records that referenced `block` holds the full block `ids` of hash `hash` (after `parent`);
    /// false if it cannot be cached (not referenced, already cached, or the hash is cached in
    /// another block).
    pub fn store(&mut self, block: BlockId, hash: BlockHash, parent: Option<BlockHash>, ids: &[u32]) -> bool {
        self.refs.contains_key(&block) && self.cache.insert(block, hash, parent, ids)
    }

    /// Drops one reference to each of `blocks`, in the order given; returns how many were refused:
    /// a block of no held slab (stale, its slab returned or lost) or one nobody references. A
    /// refused block changes nothing. A block left unreferenced becomes evictable if cached (the
    /// first given is evicted first: pass a sequence's blocks tail first, as vLLM does, so its
    /// prefix outlives its tail), else free.
    #[must_use = "a refused block means its holder's block table was stale"]
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) -> usize {
        let mut refused = 0;
        for block in blocks {
            let Some(slab) = containing(&mut self.slabs, block) else {
                refused += 1;
                continue;
            };
            let Some(refs) = self.refs.get_mut(&block) else {
                refused += 1;
                continue;
            };
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            self.refs.remove(&block);
            if self.cache.contains(block) {
                self.cache.park(block);
                slab.evictable += 1;
            } else {
                self.free.insert(block);
                slab.free += 1;
            }
        }
        refused
    }

    /// The tokens cached block `block` holds.
    pub fn cached_ids(&self, block: BlockId) -> Option<&[u32]> {
        self.cache.ids(block)
    }

    /// Cache changes since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.cache.take_events()
    }

    /// The slab `block` belongs to.
    pub fn slab_of(&self, block: BlockId) -> Option<SlabId> {
        let (&id, slab) = self.slabs.range(..=SlabId(block.0)).next_back()?;
        slab.range(id).contains(&block).then_some(id)
    }
}
