//! Scheduler tests: admission under the token budget and batch size, chunked prefill, preemption
//! order, and losing a slab. The prefix cache's are in `tests_cache`, the property test of block
//! accounting in `tests_props`; both use the helpers here.

use super::*;

pub(super) const PAGED: StepLimits = StepLimits {
    max_batch: 8,
    token_budget: 64,
    reserve: KvReserve::Paged,
    prefix_caching: false,
    chunked_prefill: true,
    decode_steps: 1,
};

pub(super) fn scheduler(blocks: u64, limits: StepLimits) -> Scheduler {
    let mut s = Scheduler::new(4, limits);
    s.pool_mut().add_slab(blocks);
    s
}

/// Runs one step: schedule, advance, sample every sequence that may, remove finished ones.
pub(super) fn step(s: &mut Scheduler) -> Step {
    step_growing(s, false)
}

/// [`step`], saying whether more blocks may still come.
pub(super) fn step_growing(s: &mut Scheduler, can_grow: bool) -> Step {
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

#[test]
fn without_chunked_prefill_a_step_prefills_whole_prompts_or_decodes() {
    let mut s = scheduler(100, StepLimits { chunked_prefill: false, ..PAGED });
    s.add(SeqState::new(1, 40, 4));
    s.add(SeqState::new(2, 40, 4));
    // 40 + 40 > 64: the second prompt is not chunked in; it waits for the next prefill step.
    assert_eq!(step(&mut s).batch, vec![(1, Work { tokens: 40, context: 0 })]);
    // A waiting prompt goes before the running sequence's decode, in a step of its own.
    assert_eq!(step(&mut s).batch, vec![(2, Work { tokens: 40, context: 0 })]);
    // Nobody waits: both decode together.
    assert_eq!(
        step(&mut s).batch,
        vec![(1, Work { tokens: 1, context: 40 }), (2, Work { tokens: 1, context: 40 })]
    );
}

#[test]
fn a_multi_step_run_decodes_back_to_back_and_admits_only_after_it() {
    let limits = StepLimits { chunked_prefill: false, decode_steps: 3, ..PAGED };
    let mut s = scheduler(100, limits);
    s.add(SeqState::new(1, 8, 16));
    assert_eq!(step(&mut s).batch, vec![(1, Work { tokens: 8, context: 0 })]);
    assert_eq!(step(&mut s).batch, vec![(1, Work { tokens: 1, context: 8 })], "a run of 3 starts");
    s.add(SeqState::new(2, 8, 16));
    for context in [9, 10] {
        assert_eq!(step(&mut s).batch, vec![(1, Work { tokens: 1, context })], "2 waits for the run's end");
    }
    assert_eq!(step(&mut s).batch, vec![(2, Work { tokens: 8, context: 0 })]);
}

#[test]
fn a_multi_step_run_ends_when_nothing_is_left_to_decode() {
    let limits = StepLimits { chunked_prefill: false, decode_steps: 8, ..PAGED };
    let mut s = scheduler(100, limits);
    s.add(SeqState::new(1, 8, 2));
    step(&mut s); // prefill, the first token
    step(&mut s); // the second and last token: a run of 8 starts, and its sequence is done
    s.add(SeqState::new(2, 8, 2));
    // Nobody is left to decode: the run ends rather than keep the newcomer out of an idle device.
    assert_eq!(step(&mut s).batch, vec![(2, Work { tokens: 8, context: 0 })]);
}
