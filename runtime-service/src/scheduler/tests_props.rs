//! A property test of the scheduler over random histories: arrivals (some sharing prefixes),
//! steps, pauses, cancels, slabs added, returned and lost. Block accounting holds after every
//! operation, and every sequence finishes and every block comes back at the end.

use proptest::prelude::*;

use super::{
    tests::{scheduler, step, step_growing},
    tests_cache::{cached_seq, hits_hold_their_own_tokens, prompt_ids},
    *,
};

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
        chunked_prefill in any::<bool>(),
        decode_steps in 1u32..4,
    ) {
        let limits =
            StepLimits { max_batch: 4, token_budget: budget, reserve, prefix_caching, chunked_prefill, decode_steps };
        let mut s = scheduler(4, limits);
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
