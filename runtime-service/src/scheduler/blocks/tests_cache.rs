//! The pool's prefix cache: shared references, LRU eviction only when no free block is left,
//! tail blocks evicted first, a colliding hash is a miss, and slabs kept only as a cache give
//! their memory back with a Removed event per block.

use super::*;

fn ids(seed: u32) -> Vec<u32> {
    (0..4).map(|i| seed * 10 + i).collect()
}

/// Allocates one block, stores `seed`'s tokens in it under hash `seed`, and releases it.
fn cache_one(pool: &mut BlockPool, seed: u32, parent: Option<BlockHash>) -> BlockId {
    let block = pool.allocate(1).expect("room")[0];
    assert!(pool.store(block, u64::from(seed), parent, &ids(seed)));
    assert_eq!(pool.release([block]), 0);
    block
}

#[test]
fn free_blocks_go_before_cached_ones_and_the_least_recently_used_goes_first() {
    let mut pool = BlockPool::new(4);
    pool.add_slab(3);
    let a = cache_one(&mut pool, 1, None);
    let b = cache_one(&mut pool, 2, Some(1));
    assert_eq!((pool.free_blocks(), pool.available_blocks(), pool.cached_blocks()), (1, 3, 2));
    let fresh = pool.allocate(1).expect("room")[0];
    assert!(fresh != a && fresh != b, "a free block first: nothing evicted");
    assert_eq!(pool.cached_blocks(), 2);
    let evicted = pool.allocate(1).expect("evicts")[0];
    assert_eq!(evicted, a, "the least recently released goes first");
    assert_eq!(
        pool.lookup(&[1, 2], &[ids(1), ids(2)].concat()),
        Vec::<BlockId>::new(),
        "the chain breaks at 1"
    );
    let events = pool.take_events();
    assert_eq!(events.last(), Some(&KvEvent::Removed(vec![1])));
    pool.check(&[fresh, evicted]).expect("consistent");
}

#[test]
fn a_shared_block_is_counted_per_holder_and_evictable_only_when_the_last_lets_go() {
    let mut pool = BlockPool::new(4);
    pool.add_slab(2);
    let block = cache_one(&mut pool, 5, None);
    let hit = pool.lookup(&[5], &ids(5));
    assert_eq!(hit, vec![block]);
    assert_eq!(pool.evictable_among(&hit), 1);
    pool.share(&hit);
    pool.share(&hit);
    assert_eq!((pool.used_blocks(), pool.available_blocks()), (1, 1));
    pool.check(&[block, block]).expect("two references");
    assert_eq!(pool.release([block]), 0);
    assert_eq!(pool.available_blocks(), 1, "still referenced once");
    assert_eq!(pool.release([block]), 0);
    assert_eq!(pool.available_blocks(), 2);
    assert_eq!(pool.release([block]), 1, "a third release is refused");
    pool.check(&[]).expect("consistent");
}

#[test]
fn a_hash_holding_other_tokens_is_a_miss() {
    let mut pool = BlockPool::new(4);
    pool.add_slab(1);
    cache_one(&mut pool, 3, None);
    assert!(pool.lookup(&[3], &ids(4)).is_empty(), "same hash, other tokens: not reused");
    assert_eq!(pool.lookup(&[3], &ids(3)).len(), 1);
}

#[test]
fn a_cache_only_slab_gives_its_memory_back_and_says_which_blocks_went() {
    let mut pool = BlockPool::new(4);
    let a = pool.add_slab(2);
    cache_one(&mut pool, 1, None);
    cache_one(&mut pool, 2, Some(1));
    pool.take_events();
    assert!(!pool.remove_slab(a), "not free: it holds cached blocks");
    assert_eq!(pool.cache_only_slabs().collect::<Vec<_>>(), vec![(a, 2)]);
    let held = pool.allocate(1).expect("a free... no: evicts the oldest")[0];
    assert!(!pool.evict_slab(a), "a referenced block keeps its slab");
    assert_eq!(pool.release([held]), 0);
    assert!(pool.evict_slab(a));
    let removed: Vec<BlockHash> = pool
        .take_events()
        .into_iter()
        .flat_map(|e| match e {
            KvEvent::Removed(h) => h,
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(removed, vec![1, 2], "both cached blocks reported gone, each once");
    assert_eq!((pool.total_blocks(), pool.cached_blocks()), (0, 0));
    pool.check(&[]).expect("consistent");
}
