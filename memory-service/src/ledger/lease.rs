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

use super::{error::Error, pool_account::PoolId};

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

    /// The 32 lowercase hexadecimal digits. A table lookup per digit rather than `{:032x}`:
    /// every reply renders its lease ids, and the formatter's machinery cost more than the rest
    /// of a renewal.
    pub fn hex(self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, digit) in out.iter_mut().enumerate() {
            *digit = DIGITS[((self.0 >> (124 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Only ASCII digits were written.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
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
        // Validated and decoded in one pass (every renewal names ids).
        let decoded = (s.len() == 32).then(|| {
            s.bytes().try_fold(0u128, |acc, b| {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => return None,
                };
                Some(acc << 4 | u128::from(digit))
            })
        });
        decoded.flatten().map(LeaseId).ok_or_else(|| {
            Error::invalid(
                "lease_id",
                format!(
                    "{:?} is not a lease id (32 lowercase hexadecimal characters)",
                    serving::echo::echo(s)
                ),
            )
        })
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
    fn ids_render_as_the_formatter_would() {
        for raw in [0, 1, 0xf, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210] {
            let id = LeaseId::from_raw(raw);
            assert_eq!(id.to_string(), format!("{raw:032x}"));
            assert_eq!(format!("{raw:032x}").parse::<LeaseId>(), Ok(id));
        }
    }

    #[test]
    fn malformed_ids_are_invalid_arguments() {
        let multibyte = format!("é{}", "0".repeat(30));
        for bad in [
            "",
            "xyz",
            "0123456789ABCDEF0123456789ABCDEF",
            "+123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcdef0",
            &multibyte,
        ] {
            assert!(matches!(bad.parse::<LeaseId>(), Err(Error::InvalidArgument { .. })), "{bad:?}");
        }
    }
}
