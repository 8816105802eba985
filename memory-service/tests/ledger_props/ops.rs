//! The operations the property tests run, and the two mixes they draw them from: every
//! operation of the ledger, or a mix skewed towards reclaiming.

use proptest::prelude::*;

pub(super) const POOLS: [&str; 3] = ["kv-cache", "activations", "uniforms"];

#[derive(Debug, Clone)]
pub(super) enum Op {
    CreatePool {
        name: u8,
        capacity: u64,
    },
    Allocate {
        items: Vec<(u8, u64)>,
        scope: Option<u8>,
        ttl_ms: u64,
        wait: bool,
        key: Option<u8>,
    },
    Free {
        pick: usize,
    },
    FreeBogus,
    FreeScope {
        scope: u8,
    },
    Renew {
        pick: usize,
    },
    RenewScope {
        scope: u8,
    },
    Advance {
        ms: u64,
    },
    Abandon {
        pick: usize,
        timed_out: bool,
    },
    DropWaiter {
        pick: usize,
    },
    /// Take the change batch and apply it to the model store.
    Commit,
    /// Stream `stream` offers the picked leases (replacing its set; stale ids included).
    Offer {
        stream: u8,
        picks: Vec<usize>,
    },
    /// Stream `stream` reads its asks and frees what they name, or declines them all.
    Answer {
        stream: u8,
        free: bool,
    },
    /// Stream `stream` ends.
    CloseStream {
        stream: u8,
    },
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0u8..6, 1u64..200).prop_map(|(name, capacity)| Op::CreatePool { name, capacity }),
        6 => (
            prop::collection::vec((0u8..4, 1u64..120), 1..4),
            prop::option::of(0u8..3),
            1u64..5_000,
            any::<bool>(),
            prop::option::of(0u8..4),
        )
            .prop_map(|(items, scope, ttl_ms, wait, key)| Op::Allocate { items, scope, ttl_ms, wait, key }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::FreeBogus),
        1 => (0u8..3).prop_map(|scope| Op::FreeScope { scope }),
        2 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        1 => (0u8..3).prop_map(|scope| Op::RenewScope { scope }),
        2 => (0u64..3_000).prop_map(|ms| Op::Advance { ms }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, timed_out)| Op::Abandon { pick, timed_out }),
        1 => any::<usize>().prop_map(|pick| Op::DropWaiter { pick }),
        2 => Just(Op::Commit),
        4 => (0u8..3, prop::collection::vec(any::<usize>(), 0..10)).prop_map(|(stream, picks)| Op::Offer { stream, picks }),
        3 => (0u8..3, any::<bool>()).prop_map(|(stream, free)| Op::Answer { stream, free }),
        1 => (0u8..3).prop_map(|stream| Op::CloseStream { stream }),
    ]
}

/// Operations skewed towards reclaiming: small leases in two pools that fill up, waits, long
/// TTLs, offers and answers, and time moving by fractions of the reclaim timeout.
pub(super) fn reclaim_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            prop::collection::vec((0u8..2, 1u64..40), 1..3),
            prop::option::of(0u8..3),
            2_000u64..20_000,
            prop::bool::weighted(0.8),
        )
            .prop_map(|(items, scope, ttl_ms, wait)| Op::Allocate { items, scope, ttl_ms, wait, key: None }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (0u8..3).prop_map(|scope| Op::FreeScope { scope }),
        1 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        2 => (0u64..1_500).prop_map(|ms| Op::Advance { ms }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, timed_out)| Op::Abandon { pick, timed_out }),
        1 => any::<usize>().prop_map(|pick| Op::DropWaiter { pick }),
        1 => Just(Op::Commit),
        5 => (0u8..3, prop::collection::vec(any::<usize>(), 0..12)).prop_map(|(stream, picks)| Op::Offer { stream, picks }),
        4 => (0u8..3, any::<bool>()).prop_map(|(stream, free)| Op::Answer { stream, free }),
        1 => (0u8..3).prop_map(|stream| Op::CloseStream { stream }),
    ]
}

pub(super) fn pool_name(i: u8) -> String {
    POOLS.get(usize::from(i)).map_or_else(|| format!("extra-{i}"), |p| p.to_string())
}
