//! The scheduler with the prefix cache on: a prompt starts from the cached blocks of its prefix,
//! two prompts admitted in one step compute their shared prefix once, and a preemption drops
//! references, not the cache.

use std::sync::Arc;

use super::{
    tests::{PAGED, scheduler, step},
    *,
};

/// A prompt of `len` tokens whose first `shared` come from family `family` (prompts of one
/// family share a prefix, so the cache has something to hit) and the rest from `unique`.
pub(super) fn prompt_ids(family: u32, shared: u32, len: u32, unique: u64) -> Arc<[u32]> {
    (0..len).map(|i| if i < shared { family * 1000 + i } else { (unique as u32) * 7 + i + 100_000 }).collect()
}

/// A sequence with its prompt's ids and block hashes, as the device builds it with caching on.
pub(super) fn cached_seq(id: SeqId, ids: Arc<[u32]>, max: u32) -> SeqState {
    let hashes = chain_hashes(7, &ids, 4);
    SeqState::new(id, ids.len() as u32, max).with_prompt(ids, hashes)
}

/// Every cached block in a sequence's table holds exactly that sequence's tokens at that place
/// (only full prompt blocks are ever cached).
pub(super) fn hits_hold_their_own_tokens(s: &Scheduler) -> Result<(), String> {
    for id in s.ids() {
        let seq = s.get(id).expect("listed");
        for (i, &block) in seq.blocks.iter().enumerate() {
            let Some(cached) = s.pool().cached_ids(block) else { continue };
            let own = seq.prompt_ids.get(i * 4..(i + 1) * 4).filter(|_| i < seq.block_hashes.len());
            if Some(cached) != own {
                return Err(format!("sequence {id}'s block {i} ({block}) holds other tokens"));
            }
        }
    }
    Ok(())
}

#[test]
fn a_second_prompt_with_the_same_prefix_computes_only_the_rest() {
    let caching = StepLimits { prefix_caching: true, ..PAGED };
    let mut s = scheduler(100, caching);
    let first = prompt_ids(1, 32, 40, 1);
    s.add(cached_seq(1, first, 2));
    let plan = step(&mut s);
    assert_eq!(plan.batch, vec![(1, Work { tokens: 40, context: 0 })]);
    while !s.is_empty() {
        step(&mut s);
    }
    assert_eq!((s.pool().used_blocks(), s.pool().cached_blocks()), (0, 10), "its 10 full blocks stay cached");
    // Same 32-token prefix (8 blocks), another ending: the 8 blocks are shared.
    s.add(cached_seq(2, prompt_ids(1, 32, 40, 2), 2));
    let plan = step(&mut s);
    assert_eq!(plan.batch, vec![(2, Work { tokens: 8, context: 32 })], "only the new tokens are computed");
    assert_eq!(s.get(2).map(|q| q.cached_tokens), Some(Some(32)));
    // The whole prompt cached: its last block is recomputed (the last token samples).
    s.add(cached_seq(3, prompt_ids(1, 32, 32, 3), 2));
    let plan = step(&mut s);
    assert_eq!(plan.batch.last(), Some(&(3, Work { tokens: 4, context: 28 })));
    hits_hold_their_own_tokens(&s).expect("hits are exact");
    s.check().expect("consistent");
}

#[test]
fn two_prompts_with_one_prefix_admitted_in_one_step_compute_it_once() {
    let caching = StepLimits { prefix_caching: true, ..PAGED };
    let mut s = scheduler(100, caching);
    s.add(cached_seq(1, prompt_ids(1, 32, 36, 1), 2));
    s.add(cached_seq(2, prompt_ids(1, 32, 36, 2), 2));
    let plan = step(&mut s);
    assert_eq!(
        plan.batch,
        vec![(1, Work { tokens: 36, context: 0 }), (2, Work { tokens: 4, context: 32 })],
        "the second shares the 8 blocks the first computes in the same step"
    );
    assert_eq!(s.get(2).map(|q| q.cached_tokens), Some(Some(32)));
    s.check().expect("consistent");
}

#[test]
fn preemption_drops_references_not_the_cached_prefix() {
    let caching = StepLimits { prefix_caching: true, max_batch: 8, token_budget: 64, ..PAGED };
    // 12 blocks: sequence 1 takes 10 (prompt 36 + growth), then 2 needs more than the rest.
    let mut s = scheduler(12, caching);
    s.add(cached_seq(1, prompt_ids(1, 36, 36, 1), 8));
    step(&mut s);
    s.add(cached_seq(2, prompt_ids(2, 20, 20, 2), 8));
    for _ in 0..6 {
        step(&mut s);
    }
    s.check().expect("consistent");
    hits_hold_their_own_tokens(&s).expect("hits are exact");
    while !s.is_empty() {
        let plan = step(&mut s);
        if plan.batch.is_empty() && plan.shortfall > 0 {
            s.pool_mut().add_slab(plan.shortfall);
        }
    }
    assert_eq!(s.pool().used_blocks(), 0);
    assert!(s.pool().cached_blocks() > 0, "what was cached stays cached after the preemptions");
}
