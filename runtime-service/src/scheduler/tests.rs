//! Scheduler tests: admission under the token budget and batch size, chunked prefill, preemption
//! order, and a property test of block accounting over random histories.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const PAGED: StepLimits =
    StepLimits { max_batch: 8, token_budget: 64, reserve: KvReserve::Paged, prefix_caching: false };

fn scheduler(blocks: u64, limits: StepLimits) -> Scheduler {
    let mut s = Scheduler::new(4, limits);
    s.pool_mut().add_slab(blocks);
    s
}

/// Runs one step: schedule, advance, sample every sequence that may, remove finished ones.
fn step(s: &mut Scheduler) -> Step {
    step_growing(s, false)
}

/// [`step`], saying whether more blocks may still come.
fn step_growing(s: &mut Scheduler, can_grow: bool) -> Step {
    let plan = s.schedule(can_grow);
    for id in s.advance(&plan) {
        let seq = s.get_mut(id).expect("scheduled sequence exists");
        seq.sampled();
        if seq.is_done() {
            s.remove(id);
        }
    }
    s.check().expect("consistent after a step");
    plan
}

#[test]
fn admission_stops_at_the_token_budget_and_chunks_the_prompt_that_does_not_fit() {
    let mut s = scheduler(100, PAGED);
    s.add(SeqState::new(1, 40, 4));
    s.add(SeqState::new(2, 40, 4));
    s.add(SeqState::new(3, 10, 4));
    let plan = s.schedule(false);
    // 40 tokens for the first, the remaining 24 of the budget as the second's first chunk; the
    // third waits (first come, first served) even though its 10 tokens would fit in a later step.
    assert_eq!(plan.batch, vec![(1, Work { tokens: 40, context: 0 }), (2, Work { tokens: 24, context: 0 })]);
    assert_eq!((s.running(), s.waiting()), (2, 1));
    assert_eq!(s.advance(&plan), vec![1], "only the first finished its prompt");
    s.get_mut(1).expect("running").sampled();
    let plan = s.schedule(false);
    // Running first: one decode token, then the rest of the second prompt, then the third.
    assert_eq!(
        plan.batch,
        vec![
            (1, Work { tokens: 1, context: 40 }),
            (2, Work { tokens: 16, context: 24 }),
            (3, Work { tokens: 10, context: 0 })
        ]
    );
}

#[test]
fn the_batch_size_caps_admission() {
    let mut s = scheduler(100, StepLimits { max_batch: 2, ..PAGED });
    for id in 0..4 {
        s.add(SeqState::new(id, 2, 4));
    }
    assert_eq!(s.schedule(false).batch.len(), 2);
    assert_eq!(s.waiting(), 2);
}

#[test]
fn blocks_are_taken_as_sequences_grow_not_up_front() {
    let mut s = scheduler(100, PAGED);
    s.add(SeqState::new(1, 3, 10));
    step(&mut s); // prompt of 3: one block of 4
    assert_eq!(s.pool().used_blocks(), 1);
    step(&mut s); // token 0's KV: slot 4, still the first block
    assert_eq!(s.pool().used_blocks(), 1);
    step(&mut s); // token 1's KV: slot 5, a second block
    assert_eq!(s.pool().used_blocks(), 2);

    let mut upfront = scheduler(100, StepLimits { reserve: KvReserve::Upfront, ..PAGED });
    upfront.add(SeqState::new(1, 3, 10));
    step(&mut upfront);
    assert_eq!(upfront.pool().used_blocks(), 4, "ceil(13 / 4) at admission");
}

#[test]
fn out_of_blocks_preempts_the_most_recently_admitted_which_recomputes_first() {
    // 4 blocks of 4 tokens; three sequences of 4-token prompts take one block each.
    let mut s = scheduler(4, PAGED);
    for id in 1..=3 {
        s.add(SeqState::new(id, 4, 20));
    }
    step(&mut s);
    assert_eq!(s.pool().used_blocks(), 3);
    // Each now needs a second block for its first decode; one is free. Sequence 1 takes it;
    // sequence 2 finds none and preempts the most recently admitted (3), taking its block.
    let plan = step(&mut s);
    assert_eq!(plan.preempted, vec![3], "latest admitted first");
    assert_eq!(plan.batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(plan.shortfall, 1);
    // The preempted one waits at the front with its KV forgotten but its token kept.
    assert_eq!(s.ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let three = s.get(3).expect("waiting");
    assert_eq!((three.computed, three.generated, three.preemptions, three.blocks.len()), (0, 1, 1, 0));
    // When sequence 1 leaves, 3 comes back and recomputes its prompt and its token in one chunk.
    s.remove(1);
    let plan = s.schedule(false);
    assert_eq!(plan.batch[1], (3, Work { tokens: 5, context: 0 }));
}

#[test]
fn while_slabs_may_still_come_a_sequence_short_of_a_block_waits_instead_of_preempting() {
    let mut s = scheduler(4, PAGED);
    for id in 1..=3 {
        s.add(SeqState::new(id, 4, 20));
    }
    step(&mut s);
    let plan = step_growing(&mut s, true);
    assert!(plan.preempted.is_empty(), "nobody preempted while a slab may come");
    assert_eq!(plan.batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(plan.shortfall, 1);
    s.pool_mut().add_slab(2);
    let plan = step_growing(&mut s, true);
    assert_eq!(plan.batch.len(), 3, "all three go on once the slab arrived");
}

#[test]
fn a_sequence_whose_reader_is_behind_is_preempted_first() {
    let mut s = scheduler(4, PAGED);
    for id in 1..=4 {
        s.add(SeqState::new(id, 4, 20));
    }
    step(&mut s);
    s.get_mut(2).expect("running").paused = true;
    let plan = step(&mut s);
    assert_eq!(plan.preempted, vec![2, 4], "the paused one first, then the newest");
    assert_eq!(plan.batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn a_paused_sequence_admitted_before_the_one_short_of_a_block_is_preempted_first() {
    // Three one-block sequences in four blocks; the oldest's reader falls behind.
    let mut s = scheduler(4, PAGED);
    for id in 1..=3 {
        s.add(SeqState::new(id, 4, 20));
    }
    step(&mut s);
    s.get_mut(1).expect("running").paused = true;
    // 2 takes the free block; 3 finds none. The paused 1 goes (it sits this step out holding a
    // block), not 3 itself, though 1 was admitted before it.
    let plan = step(&mut s);
    assert_eq!(plan.preempted, vec![1], "the paused one, wherever it was admitted");
    assert_eq!(plan.batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![1]);
    assert_eq!(s.get(1).map(|q| (q.computed, q.blocks.len())), Some((0, 0)));
}

#[test]
fn a_lone_sequence_that_cannot_grow_preempts_itself_and_waits() {
    let mut s = scheduler(1, PAGED);
    s.add(SeqState::new(1, 4, 8));
    step(&mut s);
    let plan = step(&mut s);
    assert_eq!(plan.preempted, vec![1]);
    assert!(plan.batch.is_empty());
    assert_eq!(plan.shortfall, 1);
    // A new slab lets it continue.
    s.pool_mut().add_slab(4);
    assert_eq!(s.schedule(false).batch, vec![(1, Work { tokens: 5, context: 0 })]);
}

#[test]
fn paused_sequences_are_skipped_but_keep_their_blocks() {
    let mut s = scheduler(10, PAGED);
    s.add(SeqState::new(1, 2, 8));
    s.add(SeqState::new(2, 2, 8));
    step(&mut s);
    s.get_mut(1).expect("running").paused = true;
    let plan = step(&mut s);
    assert_eq!(plan.batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![2]);
    assert_eq!(s.get(1).map(|q| q.blocks.len()), Some(1));
}

#[test]
fn losing_a_slab_names_the_sequences_that_used_it() {
    let mut s = scheduler(2, PAGED);
    let second = s.pool_mut().add_slab(2);
    for id in 1..=3 {
        s.add(SeqState::new(id, 4, 8));
    }
    step(&mut s);
    assert_eq!(s.lose_slab(second), vec![3]);
    assert!(s.get(3).is_some_and(|q| q.blocks.is_empty()));
    s.remove(3);
    s.check().expect("consistent");
}

/// A prompt of `len` tokens whose first `shared` come from family `family` (prompts of one
/// family share a prefix, so the cache has something to hit) and the rest from `unique`.
fn prompt_ids(family: u32, shared: u32, len: u32, unique: u64) -> Arc<[u32]> {
    (0..len).map(|i| if i < shared { family * 1000 + i } else { (unique as u32) * 7 + i + 100_000 }).collect()
}

/// A sequence with its prompt's ids and block hashes, as the device builds it with caching on.
fn cached_seq(id: SeqId, ids: Arc<[u32]>, max: u32) -> SeqState {
    let hashes = chain_hashes(7, &ids, 4);
    SeqState::new(id, ids.len() as u32, max).with_prompt(ids, hashes)
}

/// Every cached block in a sequence's table holds exactly that sequence's tokens at that place
/// (only full prompt blocks are ever cached).
fn hits_hold_their_own_tokens(s: &Scheduler) -> Result<(), String> {
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

#[derive(Debug, Clone)]
enum Op {
    Arrive { prompt: u32, max: u32 },
    ArriveShared { family: u32, shared: u32, extra: u32, max: u32 },
    Step(bool),
    LoseSlab(usize),
    Cancel(usize),
    Pause(usize),
    AddSlab(u64),
    ReturnIdleSlab,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u32..40, 1u32..30).prop_map(|(prompt, max)| Op::Arrive { prompt, max }),
        (0u32..3, 0u32..24, 1u32..12, 1u32..20).prop_map(|(family, shared, extra, max)| Op::ArriveShared {
            family,
            shared,
            extra,
            max
        }),
        any::<bool>().prop_map(Op::Step),
        any::<bool>().prop_map(Op::Step),
        any::<bool>().prop_map(Op::Step),
        (0usize..8).prop_map(Op::LoseSlab),
        (0usize..16).prop_map(Op::Cancel),
        (0usize..16).prop_map(Op::Pause),
        (1u64..12).prop_map(Op::AddSlab),
        Just(Op::ReturnIdleSlab),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Blocks in use equal the sum over sequences (a shared cached block once per sequence), no
    /// block is in two states, the cache's index and LRU agree with the blocks, a cache hit never
    /// hands a sequence a block holding other tokens, every block comes back when every
    /// sequence is gone, and a sequence with blocks always runs to completion: under random
    /// arrivals (some sharing prefixes), steps, hits, evictions, preemptions, cancels, slab loss.
    #[test]
    fn block_accounting_holds_under_any_history(
        ops in proptest::collection::vec(op(), 1..120),
        reserve in prop_oneof![Just(KvReserve::Paged), Just(KvReserve::Upfront)],
        budget in 1u32..64,
        prefix_caching in any::<bool>(),
    ) {
        let mut s = scheduler(4, StepLimits { max_batch: 4, token_budget: budget, reserve, prefix_caching });
        let mut next = 0;
        for op in ops {
            match op {
                Op::Arrive { prompt, max } => {
                    // As the device does: refuse what the whole pool could never hold.
                    if s.pool().blocks_for(prompt + max) <= s.pool().total_blocks() {
                        s.add(SeqState::new(next, prompt, max));
                        next += 1;
                    }
                }
                Op::ArriveShared { family, shared, extra, max } => {
                    let ids = prompt_ids(family, shared, shared + extra, next);
                    if s.pool().blocks_for(ids.len() as u32 + max) <= s.pool().total_blocks() {
                        s.add(cached_seq(next, ids, max));
                        next += 1;
                    }
                }
                Op::Step(can_grow) => { step_growing(&mut s, can_grow); }
                Op::LoseSlab(i) => {
                    // memory-service lost a slab: the device fails whoever held blocks in it.
                    let slabs = s.pool().slab_ids();
                    if !slabs.is_empty() {
                        for id in s.lose_slab(slabs[i % slabs.len()]) {
                            s.remove(id);
                        }
                    }
                }
                Op::Cancel(i) | Op::Pause(i) if s.is_empty() => { let _ = i; }
                Op::Cancel(i) => {
                    let ids: Vec<_> = s.ids().collect();
                    s.remove(ids[i % ids.len()]);
                }
                Op::Pause(i) => {
                    let ids: Vec<_> = s.ids().collect();
                    let seq = s.get_mut(ids[i % ids.len()]).expect("listed");
                    seq.paused = !seq.paused;
                }
                Op::AddSlab(n) => { s.pool_mut().add_slab(n); }
                Op::ReturnIdleSlab => {
                    let idle = s.pool().idle_slabs().next();
                    if let Some((id, _)) = idle { prop_assert!(s.pool_mut().remove_slab(id)); }
                    // Memory kept only as a cache gives way (a reclaim, or a starved lane).
                    let cache_only = s.pool().cache_only_slabs().next();
                    if let Some((id, _)) = cache_only { prop_assert!(s.pool_mut().evict_slab(id)); }
                }
            }
            s.check().map_err(TestCaseError::fail)?;
            hits_hold_their_own_tokens(&s).map_err(TestCaseError::fail)?;
            let _ = s.pool_mut().take_events();
        }
        // Unpause everything and run to the end, leasing a slab whenever a step could run nothing
        // for want of blocks (as the device's leaser does): every sequence finishes (no
        // deadlock) and every block comes back.
        let ids: Vec<_> = s.ids().collect();
        for id in ids {
            if let Some(seq) = s.get_mut(id) { seq.paused = false; }
        }
        for _ in 0..20_000 {
            if s.is_empty() { break; }
            let plan = step(&mut s);
            if plan.batch.is_empty() && plan.shortfall > 0 {
                s.pool_mut().add_slab(plan.shortfall);
            }
        }
        prop_assert!(s.is_empty(), "sequences left: {}", s.waiting() + s.running());
        prop_assert_eq!(s.pool().used_blocks(), 0);
        prop_assert!(prefix_caching || s.pool().cached_blocks() == 0, "nothing cached with caching off");
        for id in s.pool().slab_ids() {
            prop_assert!(s.pool_mut().evict_slab(id), "no block is referenced once every sequence is gone");
        }
        prop_assert_eq!((s.pool().total_blocks(), s.pool().cached_blocks()), (0, 0));
    }
}
