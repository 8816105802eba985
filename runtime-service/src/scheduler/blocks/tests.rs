//! Block pool tests: older slabs fill first, a stale or never-minted block id is refused rather
//! than credited to another slab, and a property test over random histories (slab loss included)
//! that every id handed out stays bounded to a held slab.

use proptest::prelude::*;

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
    assert_eq!(pool.release(taken), 0);
    assert!(pool.remove_slab(a));
    assert_eq!(pool.total_blocks(), 0);
    assert_eq!(pool.blocks_for(17), 2);
}

#[test]
fn a_stale_block_is_refused_not_credited_to_the_slab_below_it() {
    // Slab a holds blocks 0..4, slab b 4..8. b is lost while a sequence holds block 4.
    let mut pool = BlockPool::new(16);
    let a = pool.add_slab(4);
    let b = pool.add_slab(4);
    let held = pool.allocate(5).expect("room");
    let stale = held[4];
    assert_eq!(pool.slab_of(stale), Some(b));
    pool.forget_slab(b).expect("held");
    // The nearest slab at or below block 4 is a, which ends at 3: a release that checked only
    // the lower bound credited a with a fifth free block.
    let before = (pool.free.clone(), pool.slabs.clone());
    assert_eq!(pool.release([stale, BlockId(pool.next), BlockId(u64::MAX)]), 3);
    assert_eq!((pool.free.clone(), pool.slabs.clone()), before, "nothing changed");
    assert_eq!(pool.release([held[0], held[0]]), 1, "a second release of one block is refused");
    pool.check(&held[1..4]).expect("consistent");
    assert_eq!(pool.release(held[1..4].iter().copied()), 0);
    assert!(pool.remove_slab(a));
}

#[derive(Debug, Clone)]
enum Op {
    AddSlab(u64),
    Allocate(u64),
    Release(usize),
    /// memory-service lost a slab: its blocks in use become stale in their holders' hands.
    LoseSlab(usize),
    RemoveIdleSlab,
    /// Release a block of a slab since lost or returned.
    ReleaseStale(usize),
    /// Release a number past every block ever minted.
    ReleaseUnminted(u64),
    /// Release a block that is already free.
    ReleaseFree(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..8).prop_map(Op::AddSlab),
        (0u64..6).prop_map(Op::Allocate),
        (0usize..64).prop_map(Op::Release),
        (0usize..8).prop_map(Op::LoseSlab),
        Just(Op::RemoveIdleSlab),
        (0usize..64).prop_map(Op::ReleaseStale),
        (0u64..1000).prop_map(Op::ReleaseUnminted),
        (0usize..64).prop_map(Op::ReleaseFree),
    ]
}

/// What a refused release must leave untouched.
fn snapshot(pool: &BlockPool) -> (BTreeSet<BlockId>, BTreeMap<SlabId, Slab>, u64) {
    (pool.free.clone(), pool.slabs.clone(), pool.total)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the history: every block held lies in exactly one held slab and below the next
    /// number to mint; a release of a stale, never-minted or already free block is refused and
    /// changes nothing (no slab is credited for a block it does not own); and once every held block
    /// is released, every slab is idle.
    #[test]
    fn block_ids_stay_bounded_to_their_slab_under_any_history(ops in proptest::collection::vec(op(), 1..150)) {
        let mut pool = BlockPool::new(4);
        let mut held: Vec<BlockId> = Vec::new();
        let mut stale: Vec<BlockId> = Vec::new();
        for op in ops {
            match op {
                Op::AddSlab(n) => { pool.add_slab(n); }
                Op::Allocate(n) => {
                    let free = pool.free_blocks();
                    match pool.allocate(n) {
                        Some(taken) => {
                            prop_assert_eq!(taken.len() as u64, n);
                            held.extend(taken);
                        }
                        None => prop_assert!(n > free, "refused {} of {} free", n, free),
                    }
                }
                Op::Release(i) if !held.is_empty() => {
                    let block = held.swap_remove(i % held.len());
                    prop_assert_eq!(pool.release([block]), 0);
                }
                Op::LoseSlab(i) => {
                    let slabs = pool.slab_ids();
                    if !slabs.is_empty() {
                        let range = pool.forget_slab(slabs[i % slabs.len()]).expect("held");
                        stale.extend(held.iter().copied().filter(|b| range.contains(b)));
                        held.retain(|b| !range.contains(b));
                        stale.push(range.start);
                    }
                }
                Op::RemoveIdleSlab => {
                    let idle = pool.idle_slabs().next();
                    if let Some((id, blocks)) = idle {
                        prop_assert!(pool.remove_slab(id));
                        stale.extend([BlockId(id.0), BlockId(id.0 + blocks - 1)]);
                    }
                }
                Op::ReleaseStale(i) if !stale.is_empty() => {
                    let before = snapshot(&pool);
                    prop_assert_eq!(pool.release([stale[i % stale.len()]]), 1);
                    prop_assert_eq!(snapshot(&pool), before);
                }
                Op::ReleaseUnminted(k) => {
                    let before = snapshot(&pool);
                    prop_assert_eq!(pool.release([BlockId(pool.next + k)]), 1);
                    prop_assert_eq!(snapshot(&pool), before);
                }
                Op::ReleaseFree(i) if !pool.free.is_empty() => {
                    let block = *pool.free.iter().nth(i % pool.free.len()).expect("non-empty");
                    let before = snapshot(&pool);
                    prop_assert_eq!(pool.release([block]), 1);
                    prop_assert_eq!(snapshot(&pool), before);
                }
                Op::Release(_) | Op::ReleaseStale(_) | Op::ReleaseFree(_) => {}
            }
            pool.check(&held).map_err(TestCaseError::fail)?;
            for &block in &held {
                let slab = pool.slab_of(block).expect("a held block is in a held slab");
                prop_assert!(pool.slabs[&slab].range(slab).contains(&block) && block.0 < pool.next);
            }
        }
        prop_assert_eq!(pool.release(held.drain(..)), 0);
        prop_assert_eq!(pool.idle_slabs().count(), pool.slabs());
        prop_assert_eq!(pool.used_blocks(), 0);
    }
}
