//! The prefix cache's index: which full blocks hold which tokens, found by a hash chained from
//! the first block, and which of them no sequence uses (evictable, least recently used first).
//! vLLM's `BlockPool` (`cached_block_hash_to_block` and the free-block queue) is the model; the
//! block pool around it owns the blocks, this owns what is known about their content.

use std::collections::{BTreeMap, HashMap};

use super::BlockId;

/// A full block's identity: a 64-bit hash chained from its parent block's hash and its own token
/// ids (the first block's parent is the model's salt), so equal hashes mean equal prefixes up to
/// that block, not merely equal blocks. Each entry also keeps its token ids, and a lookup compares
/// them: a hash collision is a miss, never another prompt's KV.
pub type BlockHash = u64;

/// The hashes of the full blocks of `ids`, chained from `salt` (the model: the same tokens of
/// two models are different KV).
pub fn chain_hashes(salt: u64, ids: &[u32], block_tokens: u32) -> Vec<BlockHash> {
    let mut parent = salt;
    ids.chunks_exact(block_tokens.max(1) as usize)
        .map(|block| {
            parent = block_hash(parent, block);
            parent
        })
        .collect()
}

/// FNV-1a over the parent hash and the block's ids, then a finalizer: stable across processes
/// and releases (events carry these hashes to routers), cheap next to a step.
fn block_hash(parent: BlockHash, ids: &[u32]) -> BlockHash {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in parent.to_le_bytes().into_iter().chain(ids.iter().flat_map(|id| id.to_le_bytes())) {
        h = (h ^ u64::from(byte)).wrapping_mul(PRIME);
    }
    crate::rng::mix(h)
}

/// A change to the cache's content, for routers that track which engine holds which prefix
/// (vLLM's KV events: BlockStored, BlockRemoved, AllBlocksCleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// A block's KV became reusable: its hash, its parent's (none for a first block), its tokens.
    Stored { hash: BlockHash, parent: Option<BlockHash>, ids: Box<[u32]> },
    /// Blocks no longer cached (evicted for new content, or their slab went).
    Removed(Vec<BlockHash>),
    /// Every cached block is gone.
    Cleared,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: BlockHash,
    ids: Box<[u32]>,
    /// Its place in the LRU order while no sequence uses it.
    evictable_since: Option<u64>,
}

/// What is cached, and which cached blocks are evictable.
#[derive(Debug, Clone, Default)]
pub(super) struct PrefixCache {
    by_hash: HashMap<BlockHash, BlockId>,
    entries: HashMap<BlockId, Entry>,
    /// Cached blocks no sequence references, by when they became so (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    tick: u64,
    /// Changes not yet published.
    events: Vec<KvEvent>,
}

impl PrefixCache {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn evictable(&self) -> usize {
        self.evictable.len()
    }

    pub(super) fn contains(&self, block: BlockId) -> bool {
        self.entries.contains_key(&block)
    }

    pub(super) fn is_evictable(&self, block: BlockId) -> bool {
        self.entries.get(&block).is_some_and(|e| e.evictable_since.is_some())
    }

    pub(super) fn ids(&self, block: BlockId) -> Option<&[u32]> {
        self.entries.get(&block).map(|e| &*e.ids)
    }

    /// The cached block holding `hash` with exactly `ids`, if any.
    pub(super) fn find(&self, hash: BlockHash, ids: &[u32]) -> Option<BlockId> {
        let &block = self.by_hash.get(&hash)?;
        (*self.entries[&block].ids == *ids).then_some(block)
    }

    /// Records that `block` (referenced by a sequence) holds `ids` under `hash`; false if another
    /// block already holds that hash (two sequences computed the same prefix at once: the first
    /// stays cached, the second block is an ordinary one).
    pub(super) fn insert(
        &mut self,
        block: BlockId,
        hash: BlockHash,
        parent: Option<BlockHash>,
        ids: &[u32],
    ) -> bool {
        if self.by_hash.contains_key(&hash) || self.entries.contains_key(&block) {
            return false;
        }
        self.by_hash.insert(hash, block);
        self.entries.insert(block, Entry { hash, ids: ids.into(), evictable_since: None });
        self.events.push(KvEvent::Stored { hash, parent, ids: ids.into() });
        true
    }

    /// `block` (cached) lost its last reference: it becomes the most recently used evictable one.
    pub(super) fn park(&mut self, block: BlockId) {
        if let Some(entry) = self.entries.get_mut(&block) {
            self.tick += 1;
            entry.evictable_since = Some(self.tick);
            self.evictable.insert(self.tick, block);
        }
    }

    /// `block` (cached, evictable) is referenced again.
    pub(super) fn unpark(&mut self, block: BlockId) {
        if let Some(since) = self.entries.get_mut(&block).and_then(|e| e.evictable_since.take()) {
            self.evictable.remove(&since);
        }
    }

    /// The least recently used evictable block, forgotten (its content is about to be replaced).
    pub(super) fn evict_oldest(&mut self) -> Option<BlockId> {
        let (_, block) = self.evictable.pop_first()?;
        self.forget(block);
        Some(block)
    }

    /// Forgets `block`'s content (evicted, or its slab went); true if it was cached.
    pub(super) fn forget(&mut self, block: BlockId) -> bool {
        let Some(entry) = self.entries.remove(&block) else { return false };
        if let Some(since) = entry.evictable_since {
            self.evictable.remove(&since);
        }
        self.by_hash.remove(&entry.hash);
        self.events.push(KvEvent::Removed(vec![entry.hash]));
        true
    }

    pub(super) fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Its own consistency: the hash map and the entries agree, and the evictable order lists
    /// exactly the entries that say they are evictable.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.by_hash.len() != self.entries.len() {
            return Err(format!("{} hashes for {} cached blocks", self.by_hash.len(), self.entries.len()));
        }
        for (hash, block) in &self.by_hash {
            if self.entries.get(block).map(|e| e.hash) != Some(*hash) {
                return Err(format!("hash {hash:x} names {block}, which holds another"));
            }
        }
        let parked = self.entries.values().filter(|e| e.evictable_since.is_some()).count();
        if parked != self.evictable.len() {
            return Err(format!("{parked} blocks say evictable, the LRU lists {}", self.evictable.len()));
        }
        for (since, block) in &self.evictable {
            if self.entries.get(block).and_then(|e| e.evictable_since) != Some(*since) {
                return Err(format!("the LRU lists {block} at {since}, which disagrees"));
            }
        }
        Ok(())
    }
}
