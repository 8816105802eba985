//! Names of the scopes (and Allocate request ids) this runtime takes in memory-service, unique
//! across every life of every instance.

use std::sync::{
    LazyLock,
    atomic::{AtomicU32, Ordering},
};

use rand::{TryRng, rngs::SysRng};

/// Longest scope id (and request id) memory-service accepts, in characters.
const MAX_SCOPE: usize = 128;
/// `/<boot:016x>-<nonce:08x>`: what follows the name in every scope.
const SUFFIX: usize = 1 + 16 + 1 + 8;

/// 64 random bits, never failing: from the OS, else from the clock, mixed. Ids need
/// uniqueness, not secrecy.
pub fn random_u64() -> u64 {
    SysRng.try_next_u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        crate::rng::mix(nanos.as_nanos() as u64)
    })
}

/// This process's boot id. Scopes double as Allocate request ids (idempotency keys): with a
/// nonce alone, which restarts at 0 in each process, a runtime restarted under the same
/// `--instance` (a pod name) would be handed its previous life's still-live leases as a replay,
/// or refused them for other sizes. The boot id keeps every life's names apart.
static BOOT: LazyLock<u64> = LazyLock::new(random_u64);

/// A scope no other attempt of any life uses: `<instance>/<kind>/<name>/<boot>-<nonce>`.
/// Readable in memory-service events, and unique, so a background free of an abandoned attempt
/// can never hit a later attempt's leases, nor a restarted runtime adopt its previous life's.
pub fn unique_scope(instance: &str, kind: &str, name: &str) -> String {
    static NONCE: AtomicU32 = AtomicU32::new(0);
    scope(instance, kind, name, *BOOT, NONCE.fetch_add(1, Ordering::Relaxed))
}

/// The scope of attempt `nonce` in the life `boot`. The name is shortened if the whole would
/// pass memory-service's limit: it is there to be read, the suffix makes the scope unique.
fn scope(instance: &str, kind: &str, name: &str, boot: u64, nonce: u32) -> String {
    let room = MAX_SCOPE.saturating_sub(instance.chars().count() + kind.chars().count() + 2 + SUFFIX);
    let name = name.char_indices().nth(room).map_or(name, |(end, _)| &name[..end]);
    format!("{instance}/{kind}/{name}/{boot:016x}-{nonce:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_lives_of_one_instance_name_disjoint_scopes_within_the_limit() {
        // Each life's nonce starts at 0; only the boot id tells them apart.
        let life = |boot| (0..100).map(|n| scope("pod-0", "model", "m", boot, n)).collect::<Vec<_>>();
        let (first, second) = (life(random_u64()), life(random_u64()));
        assert!(first.iter().all(|s| !second.contains(s)), "{first:?} / {second:?}");
        assert_eq!(first[0].len(), "pod-0/model/m/".len() + 16 + 1 + 8);
        // The longest instance and name still fit, the name shortened, the suffix whole.
        let longest = scope(&"i".repeat(48), "device", &"é".repeat(64), u64::MAX, u32::MAX);
        assert_eq!(longest.chars().count(), MAX_SCOPE);
        assert!(longest.ends_with("/ffffffffffffffff-ffffffff"), "{longest}");
        assert_ne!(unique_scope("a", "kv", "m"), unique_scope("a", "kv", "m"));
    }
}
