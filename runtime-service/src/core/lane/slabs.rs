//! A lane's memory: the slabs behind its blocks. Taking the slabs its leaser granted, telling
//! the leaser how many free blocks the lane wants, returning slabs when load falls, and giving
//! cache-only slabs back when memory-service asks.
//!
//! Apart from the lane's sequences (`super`) because this side speaks to memory-service, through
//! the leaser's [`Link`](crate::kv::Link): what it decides moves leases, not tokens.

use std::time::Duration;

use tokio::time::Instant;

use super::Lane;
use crate::{
    kv::Grant,
    memory::Reservation,
    scheduler::{SeqId, SlabId},
};

/// Tokens of growth the running sequences' blocks are leased ahead for: slabs arrive within a
/// round trip to memory-service, far less than this many steps.
const LOOKAHEAD_TOKENS: u32 = 4;

impl Lane {
    /// Takes every slab the leaser has granted.
    pub(in crate::core) fn absorb_grants(&mut self) {
        while let Some(Grant { blocks, lease }) = self.link.try_grant() {
            let id = self.scheduler.pool_mut().add_slab(blocks);
            self.slabs.insert(id, lease);
        }
    }

    /// Whether the lane holds nothing it can use and cannot start its first sequence: nothing
    /// runs, something waits, and memory-service had no room. Then it gives back every slab and
    /// asks for the first sequence's whole need at once (see [`crate::kv`]).
    fn starved(&self) -> bool {
        self.scheduler.running() == 0 && self.scheduler.waiting() > 0 && self.link.exhausted()
    }

    /// Publishes how many free blocks the lane wants to its leaser: enough to admit the next
    /// waiting sequences whole and to grow the running ones for a few more tokens, plus the low
    /// watermark; when starved, exactly what the first waiting sequence needs to run to its end.
    pub(in crate::core) fn publish_demand(&mut self) {
        let starved = self.starved();
        let want = if self.scheduler.is_empty() {
            0
        } else if starved {
            self.scheduler.head_need()
        } else {
            self.wanted_free()
        };
        let free = self.scheduler.pool().free_blocks();
        let held = self.scheduler.pool().total_blocks();
        // The lease joins the trace of a sequence waiting for it (the queue's head, else a running
        // one about to grow).
        let cause = if want > free {
            let id = self.scheduler.waiting_ids().next().or_else(|| self.scheduler.ids().next());
            id.and_then(|id| self.live.get(&id))
        } else {
            None
        };
        self.link.set(want, free, held, cause.map(|live| &live.span), starved);
    }

    /// Free blocks a busy lane wants: what its next steps need and the low watermark.
    fn wanted_free(&self) -> u64 {
        self.scheduler.demand(LOOKAHEAD_TOKENS) + self.spec.low_watermark
    }

    /// Whether more blocks may still come from memory-service.
    pub(in crate::core) fn can_grow(&self) -> bool {
        self.link.can_grow()
    }

    /// While memory-service is unreachable, sequences that wait for blocks they cannot get fail
    /// at once with the leaser's error instead of waiting for their deadline; those holding
    /// blocks go on. Called after the lane's schedule, so the waiting ones are those it could not
    /// admit.
    pub(in crate::core) fn fail_if_unreachable(&mut self) {
        let Some(err) = self.link.failure() else { return };
        let blocked: Vec<SeqId> = self.scheduler.waiting_ids().collect();
        for id in blocked {
            self.end(id, Err(err.clone()));
        }
    }

    /// Returns slabs memory-service may give to others: while busy, one per step that leaves a
    /// slab's worth of free blocks beyond what the next steps want; all idle ones once the lane has
    /// been empty for `linger`. Dropping a lease frees it in the background.
    pub(in crate::core) fn return_slabs(&mut self, now: Instant, linger: Duration) -> usize {
        let pool = self.scheduler.pool();
        let victims: Vec<SlabId> = if self.starved() {
            // Holding part of what it needs while waiting for the rest could deadlock with
            // another lane doing the same: give it all back (nothing runs, so nothing is
            // referenced; cached blocks are evicted with their slab).
            pool.idle_slabs().chain(pool.cache_only_slabs()).map(|(id, _)| id).collect()
        } else if self.scheduler.is_empty() {
            let since = *self.idle_since.get_or_insert(now);
            if now < since + linger {
                return 0;
            }
            pool.idle_slabs().map(|(id, _)| id).collect()
        } else if self.scheduler.waiting() == 0 {
            // Measured against the demand this lane publishes next (not the low watermark alone):
            // a slab returned below it would be leased again at the next step, one Allocate and
            // one Free per step for nothing. The extra slab's worth is the hysteresis between
            // leasing (free below the demand) and returning, so small swings in demand do not
            // flip between the two.
            let high = self.wanted_free() + self.spec.slab_blocks;
            pool.idle_slabs()
                .find(|&(_, blocks)| pool.free_blocks().saturating_sub(blocks) >= high)
                .map(|(id, _)| id)
                .into_iter()
                .collect()
        } else {
            return 0;
        };
        for &id in &victims {
            if self.scheduler.pool_mut().evict_slab(id) {
                self.slabs.remove(&id);
            }
        }
        victims.len()
    }

    /// The lane's slabs are all idle and it has no sequence: when to return them.
    pub(in crate::core) fn release_due(&self, linger: Duration) -> Option<Instant> {
        let idle = self.scheduler.is_empty() && self.scheduler.pool().slabs() > 0;
        idle.then(|| self.idle_since.map(|since| since + linger)).flatten()
    }

    /// The slabs holding only cache, oldest first.
    pub(in crate::core) fn cache_only_slabs(&self) -> impl Iterator<Item = SlabId> + '_ {
        self.scheduler.pool().cache_only_slabs().map(|(id, _)| id)
    }

    /// Lease ids of the slabs holding only cache: memory-service may have them back.
    pub(in crate::core) fn offered(&self) -> impl Iterator<Item = String> + '_ {
        self.scheduler
            .pool()
            .cache_only_slabs()
            .filter_map(|(id, _)| self.slabs.get(&id)?.as_ref())
            .flat_map(|lease| lease.leases().iter().cloned())
    }

    /// Evicts the slab leased as `lease` if it still holds only cache; its blocks and its lease,
    /// for the caller to free.
    pub(in crate::core) fn reclaim(&mut self, lease: &str) -> Option<(u64, Option<Reservation>)> {
        let (&id, _) = self
            .slabs
            .iter()
            .find(|(_, held)| held.as_ref().is_some_and(|r| r.leases().iter().any(|l| l == lease)))?;
        let blocks = self.scheduler.pool().cache_only_slabs().find(|&(slab, _)| slab == id)?.1;
        if !self.scheduler.pool_mut().evict_slab(id) {
            return None;
        }
        let reservation = self.slabs.remove(&id).flatten();
        self.reclaimed_blocks += blocks;
        Some((blocks, reservation))
    }

    /// Blocks the whole kv-cache pool could hold (0 until the leaser has asked memory-service).
    pub(in crate::core) fn kv_capacity(&self) -> u64 {
        self.link.capacity()
    }

    /// Blocks used and held, and slabs held.
    pub(in crate::core) fn kv(&self) -> (u64, u64, usize) {
        let pool = self.scheduler.pool();
        (pool.used_blocks(), pool.total_blocks(), pool.slabs())
    }
}
