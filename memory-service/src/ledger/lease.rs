//! Leases and their ids: 128 random bits from a CSPRNG, so an id cannot be guessed from another.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{BuildHasherDefault, Hasher},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng, rngs::SysRng};
use tokio::time::Instant;

use super::{error::Error, pool::PoolId};

/// Opaque lease id, rendered as 32 lowercase hexadecimal characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(u128);

impl LeaseId {
    /// Wraps a raw value (tests and id generation).
    pub const fn from_raw(raw: u128) -> Self {
        LeaseId(raw)
    }

    /// The raw value (stores key leases by it).
    pub const fn raw(self) -> u128 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for LeaseId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let valid = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(Error::invalid(
                "lease_id",
                format!(
                    "{:?} is not a lease id (32 lowercase hexadecimal characters)",
                    serving::echo::echo(s)
                ),
            ));
        }
        u128::from_str_radix(s, 16).map(LeaseId).map_err(|e| Error::invalid("lease_id", e.to_string()))
    }
}

/// Hashes a [`LeaseId`] by taking its low 64 bits. Ids are CSPRNG output chosen by the server, so
/// they are already uniformly distributed and a caller cannot pick colliding keys: SipHash's
/// flood resistance buys nothing here, and costs a fifth of an allocate+free pair.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u128 keys, which this hasher is never used with; fold them anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// A map keyed by lease id.
pub type LeaseMap<V> = HashMap<LeaseId, V, BuildHasherDefault<IdHasher>>;
/// A set of lease ids.
pub type LeaseSet = HashSet<LeaseId, BuildHasherDefault<IdHasher>>;

/// Makes lease ids. A ChaCha-based `StdRng` seeded once from the OS: unpredictable like the OS
/// source, but without a system call per allocation on the hot path.
#[derive(Debug)]
pub struct IdGen(StdRng);

impl IdGen {
    /// Seeds from the operating system.
    pub fn from_os() -> Self {
        // The OS source failing is not recoverable in any useful way; fall back to a time-derived
        // seed rather than refuse to start, since ids must be unique, and unpredictability is
        // defence in depth (ownership checks come with authentication).
        let rng = StdRng::try_from_rng(&mut SysRng).unwrap_or_else(|_| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default();
            StdRng::seed_from_u64(nanos)
        });
        IdGen(rng)
    }

    /// The next id.
    pub fn next_id(&mut self) -> LeaseId {
        LeaseId((u128::from(self.0.next_u64()) << 64) | u128::from(self.0.next_u64()))
    }

    /// A random 64-bit value (the server epoch).
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// A live lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// The pool it draws from.
    pub pool: PoolId,
    /// Bytes held.
    pub size: u64,
    /// Who holds it.
    pub holder: Arc<str>,
    /// Scope it belongs to, if any.
    pub scope: Option<Arc<str>>,
    /// TTL applied at each renewal.
    pub ttl: Duration,
    /// When it dies unless renewed.
    pub expires_at: Instant,
    /// Idempotency key of the Allocate that granted it, if any.
    pub request_key: Option<Arc<str>>,
    /// When it was granted (for the lease lifetime histogram).
    pub granted_at: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let mut ids = IdGen::from_os();
        let id = ids.next_id();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<LeaseId>(), Ok(id));
        assert_ne!(ids.next_id(), id);
    }

    #[test]
    fn malformed_ids_are_invalid_arguments() {
        for bad in ["", "xyz", "0123456789ABCDEF0123456789ABCDEF", "+123456789abcdef0123456789abcdef"] {
            assert!(matches!(bad.parse::<LeaseId>(), Err(Error::InvalidArgument { .. })), "{bad:?}");
        }
    }
}
