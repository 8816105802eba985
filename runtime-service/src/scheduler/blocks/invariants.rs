//! The block pool's invariant, checked against the sequences' block tables: every block in
//! exactly one state, counted in the right slab. The scheduler's tests run it after every step;
//! it is apart from the pool's operations because it reads every block, where they touch only
//! the ones they move.

use std::collections::HashMap;

use super::{BlockId, BlockPool};

impl BlockPool {
    /// Checks the pool's own accounting against `used`, every block reference a sequence holds
    /// (a shared block once per sequence): each held block is in exactly one state (free,
    /// referenced as often as `used` names it, or evictable), in a held slab, minted here; cached
    /// blocks are referenced or evictable, never free; per-slab counts agree.
    pub fn check(&self, used: &[BlockId]) -> Result<(), String> {
        let mut counted: HashMap<BlockId, u32> = HashMap::new();
        for &block in used {
            *counted.entry(block).or_insert(0) += 1;
        }
        if counted != self.refs {
            let wrong = counted
                .iter()
                .find(|(b, n)| self.refs.get(b) != Some(n))
                .map(|(b, n)| format!("{b} is held {n} times but counts {:?} references", self.refs.get(b)))
                .or_else(|| {
                    self.refs
                        .keys()
                        .find(|b| !counted.contains_key(b))
                        .map(|b| format!("{b} counts references nobody holds"))
                });
            return Err(wrong.unwrap_or_else(|| "references disagree".into()));
        }
        for &block in counted.keys().chain(&self.free) {
            if block.0 >= self.next {
                return Err(format!("{block} was never minted (next is {})", self.next));
            }
            if self.slab_of(block).is_none() {
                return Err(format!("{block} belongs to no slab"));
            }
        }
        if let Some(block) = self.free.iter().find(|b| counted.contains_key(b) || self.cache.contains(**b)) {
            return Err(format!("{block} is free but referenced or cached"));
        }
        self.cache.check()?;
        let evictable = self.cache.evictable() as u64;
        if self.free_blocks() + self.used_blocks() + evictable != self.total {
            return Err(format!(
                "{} free + {} used + {evictable} evictable != {} held",
                self.free_blocks(),
                self.used_blocks(),
                self.total
            ));
        }
        for (&id, slab) in &self.slabs {
            let free = self.free.range(slab.range(id)).count() as u64;
            let evictable =
                (id.0..id.0 + slab.blocks).filter(|&n| self.cache.is_evictable(BlockId(n))).count() as u64;
            if (free, evictable) != (slab.free, slab.evictable) {
                return Err(format!(
                    "{id} counts {} free and {} evictable blocks but has {free} and {evictable}",
                    slab.free, slab.evictable
                ));
            }
            if (id.0..id.0 + slab.blocks)
                .any(|n| self.cache.is_evictable(BlockId(n)) && self.refs.contains_key(&BlockId(n)))
            {
                return Err(format!("{id} has a block both evictable and referenced"));
            }
        }
        Ok(())
    }
}
