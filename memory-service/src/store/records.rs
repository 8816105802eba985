//! The stored records: protobuf messages (prost, already the wire format's library), so a record
//! written by one version stays readable by the next as fields are added.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::ledger::{Counters, Event, EventKind, LeaseId, StoredLease, StoredPool, StoredReplay};

/// A pool: capacity, peak and counters.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PoolRecord {
    #[prost(uint64, tag = "1")]
    pub capacity: u64,
    #[prost(uint64, tag = "2")]
    pub peak_used: u64,
    #[prost(uint64, tag = "3")]
    pub granted: u64,
    #[prost(uint64, tag = "4")]
    pub freed: u64,
    #[prost(uint64, tag = "5")]
    pub expired: u64,
    #[prost(uint64, tag = "6")]
    pub wait_timeouts: u64,
    #[prost(uint64, tag = "7")]
    pub rejected: u64,
    /// 128-bit totals as 16 little-endian bytes.
    #[prost(bytes = "vec", tag = "8")]
    pub granted_bytes: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    pub released_bytes: Vec<u8>,
    #[prost(uint64, tag = "10")]
    pub revoked: u64,
    #[prost(uint64, tag = "11")]
    pub reclaim_requests: u64,
    #[prost(uint64, tag = "12")]
    pub reclaim_asked: u64,
    #[prost(uint64, tag = "13")]
    pub reclaim_returned: u64,
    #[prost(uint64, tag = "14")]
    pub reclaim_declined: u64,
    #[prost(bytes = "vec", tag = "15")]
    pub reclaimed_bytes: Vec<u8>,
}

/// A lease. The table key is the order it was stored in, not its id (see `store::leases`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    #[prost(string, tag = "1")]
    pub pool: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(string, tag = "3")]
    pub holder: String,
    #[prost(string, optional, tag = "4")]
    pub scope: Option<String>,
    #[prost(uint64, tag = "5")]
    pub ttl_ms: u64,
    /// Wall-clock deadline, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "6")]
    pub deadline_unix_ms: u64,
    #[prost(uint64, tag = "7")]
    pub granted_unix_ms: u64,
    #[prost(string, optional, tag = "8")]
    pub request_key: Option<String>,
    /// The lease id, 16 big-endian bytes.
    #[prost(bytes = "vec", tag = "9")]
    pub id: Vec<u8>,
}

/// One item of an idempotency record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRecord {
    #[prost(string, tag = "1")]
    pub pool: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
}

/// An idempotency record; its key is the table key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplayRecord {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<ItemRecord>,
    #[prost(string, optional, tag = "2")]
    pub scope: Option<String>,
    #[prost(uint64, tag = "3")]
    pub ttl_ms: u64,
    /// Lease ids, 16 big-endian bytes each.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub leases: Vec<Vec<u8>>,
}

/// An event; its sequence number is the table key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventRecord {
    /// Wall-clock time, nanoseconds since the Unix epoch.
    #[prost(uint64, tag = "1")]
    pub time_unix_ns: u64,
    /// The kind, as `memory.v1.EventKind` numbers it.
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(string, tag = "3")]
    pub pool: String,
    /// The lease id, 16 big-endian bytes, or empty.
    #[prost(bytes = "vec", tag = "4")]
    pub lease: Vec<u8>,
    #[prost(uint64, tag = "5")]
    pub size: u64,
    #[prost(string, optional, tag = "6")]
    pub holder: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub scope: Option<String>,
    #[prost(uint64, tag = "8")]
    pub pool_used: u64,
}

/// Event kinds by their `memory.v1.EventKind` numbers, stable on disk.
const KINDS: [(EventKind, u32); 9] = [
    (EventKind::Allocated, 1),
    (EventKind::Freed, 2),
    (EventKind::Expired, 3),
    (EventKind::PoolCreated, 4),
    (EventKind::WaitTimedOut, 5),
    (EventKind::Renewed, 6),
    (EventKind::Rejected, 7),
    (EventKind::ReclaimRequested, 8),
    (EventKind::Revoked, 9),
];

impl EventRecord {
    pub fn from_event(e: &Event) -> Self {
        EventRecord {
            time_unix_ns: e.time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            kind: KINDS.iter().find(|(k, _)| *k == e.kind).map_or(0, |(_, n)| *n),
            pool: e.pool.to_string(),
            lease: e.lease.map(|id| id.raw().to_be_bytes().to_vec()).unwrap_or_default(),
            size: e.size,
            holder: e.holder.as_deref().map(str::to_owned),
            scope: e.scope.as_deref().map(str::to_owned),
            pool_used: e.pool_used,
        }
    }

    /// The event numbered `sequence`, or `None` for a kind this version does not know.
    pub fn into_event(self, sequence: u64) -> Option<Event> {
        let kind = KINDS.iter().find(|(_, n)| *n == self.kind)?.0;
        Some(Event {
            sequence,
            time: UNIX_EPOCH + Duration::from_nanos(self.time_unix_ns),
            kind,
            pool: Arc::from(self.pool),
            lease: <[u8; 16]>::try_from(self.lease.as_slice())
                .ok()
                .map(|b| LeaseId::from_raw(u128::from_be_bytes(b))),
            size: self.size,
            holder: self.holder.map(Arc::from),
            scope: self.scope.map(Arc::from),
            pool_used: self.pool_used,
        })
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn u128_bytes(n: u128) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn bytes_u128(bytes: &[u8]) -> u128 {
    <[u8; 16]>::try_from(bytes).map_or(0, u128::from_le_bytes)
}

impl PoolRecord {
    pub fn from_stored(pool: &StoredPool) -> Self {
        let c = &pool.counters;
        PoolRecord {
            capacity: pool.capacity,
            peak_used: pool.peak_used,
            granted: c.granted,
            freed: c.freed,
            expired: c.expired,
            wait_timeouts: c.wait_timeouts,
            rejected: c.rejected,
            granted_bytes: u128_bytes(c.granted_bytes),
            released_bytes: u128_bytes(c.released_bytes),
            revoked: c.revoked,
            reclaim_requests: c.reclaim_requests,
            reclaim_asked: c.reclaim_asked,
            reclaim_returned: c.reclaim_returned,
            reclaim_declined: c.reclaim_declined,
            reclaimed_bytes: u128_bytes(c.reclaimed_bytes),
        }
    }

    pub fn into_stored(self, name: &str) -> StoredPool {
        StoredPool {
            name: Arc::from(name),
            capacity: self.capacity,
            peak_used: self.peak_used,
            counters: Counters {
                granted: self.granted,
                freed: self.freed,
                expired: self.expired,
                wait_timeouts: self.wait_timeouts,
                rejected: self.rejected,
                granted_bytes: bytes_u128(&self.granted_bytes),
                released_bytes: bytes_u128(&self.released_bytes),
                revoked: self.revoked,
                reclaim_requests: self.reclaim_requests,
                reclaim_asked: self.reclaim_asked,
                reclaim_returned: self.reclaim_returned,
                reclaim_declined: self.reclaim_declined,
                reclaimed_bytes: bytes_u128(&self.reclaimed_bytes),
            },
        }
    }
}

impl LeaseRecord {
    pub fn from_stored(lease: &StoredLease) -> Self {
        LeaseRecord {
            pool: lease.pool.to_string(),
            size: lease.size,
            holder: lease.holder.to_string(),
            scope: lease.scope.as_deref().map(str::to_owned),
            ttl_ms: lease.ttl.as_millis() as u64,
            deadline_unix_ms: unix_ms(lease.deadline),
            granted_unix_ms: unix_ms(lease.granted),
            request_key: lease.request_key.as_deref().map(str::to_owned),
            id: lease.id.raw().to_be_bytes().to_vec(),
        }
    }

    /// The lease id it holds, or `None` if the record has none of 16 bytes.
    pub fn id(&self) -> Option<LeaseId> {
        Some(LeaseId::from_raw(u128::from_be_bytes(self.id.as_slice().try_into().ok()?)))
    }

    /// The lease, or `None` if the record holds no id of 16 bytes.
    pub fn into_stored(self) -> Option<StoredLease> {
        Some(StoredLease {
            id: self.id()?,
            pool: Arc::from(self.pool),
            size: self.size,
            holder: Arc::from(self.holder),
            scope: self.scope.map(Arc::from),
            ttl: Duration::from_millis(self.ttl_ms),
            deadline: from_unix_ms(self.deadline_unix_ms),
            granted: from_unix_ms(self.granted_unix_ms),
            request_key: self.request_key.map(Arc::from),
        })
    }
}

impl ReplayRecord {
    pub fn from_stored(replay: &StoredReplay) -> Self {
        ReplayRecord {
            items: replay
                .items
                .iter()
                .map(|(pool, size)| ItemRecord { pool: pool.to_string(), size: *size })
                .collect(),
            scope: replay.scope.as_deref().map(str::to_owned),
            ttl_ms: replay.ttl.as_millis() as u64,
            leases: replay.leases.iter().map(|id| id.raw().to_be_bytes().to_vec()).collect(),
        }
    }

    pub fn into_stored(self, key: &str) -> StoredReplay {
        StoredReplay {
            key: Arc::from(key),
            items: self.items.into_iter().map(|i| (Arc::from(i.pool), i.size)).collect(),
            scope: self.scope.map(Arc::from),
            ttl: Duration::from_millis(self.ttl_ms),
            leases: self
                .leases
                .iter()
                .filter_map(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
                .map(|b| LeaseId::from_raw(u128::from_be_bytes(b)))
                .collect(),
        }
    }
}
