//! Proto ⇄ domain: validates requests into ledger types, renders ledger values as proto messages.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use proto::memory::v1 as pb;
use tokio::time::Instant;

use crate::ledger::Violations;
use crate::{
    config::Config,
    ledger::{AllocRequest, Error, Event, EventKind, Lease, LeaseId, MAX_OFFERED, PoolFit, PoolStats},
    validate,
};

/// Most items one Allocate or CanAllocate may carry.
pub const MAX_ITEMS: usize = 64;

/// Converts tokio instants to wall-clock timestamps: the ledger runs on the monotonic clock,
/// clients read expiries as wall time. One reading of both clocks per response.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    mono: Instant,
    wall: SystemTime,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Clock { mono: Instant::now(), wall: SystemTime::now() }
    }

    /// The monotonic reading.
    pub fn instant(&self) -> Instant {
        self.mono
    }

    /// `at` as wall time.
    pub fn wall(&self, at: Instant) -> prost_types::Timestamp {
        let wall = if at >= self.mono { self.wall + (at - self.mono) } else { self.wall - (self.mono - at) };
        wall.into()
    }
}

/// Validates the items of Allocate / CanAllocate.
pub fn items(items: Vec<pb::AllocationItem>) -> Result<Vec<(String, u64)>, Error> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(Error::invalid(
            "items",
            format!("must hold 1 to {MAX_ITEMS} items, got {}", items.len()),
        ));
    }
    let mut bad = Violations::default();
    for (i, item) in items.iter().enumerate() {
        bad.keep(pool_name(&format!("items[{i}].pool"), &item.pool));
        if item.size_bytes == 0 {
            bad.add(format!("items[{i}].size_bytes"), "must be greater than zero");
        }
    }
    bad.check()?;
    Ok(items.into_iter().map(|item| (item.pool, item.size_bytes)).collect())
}

/// An optional text field: empty means absent.
fn optional_text(field: &str, value: String) -> Result<Option<Arc<str>>, Error> {
    validate::text(field, &value, false)?;
    Ok((!value.is_empty()).then(|| Arc::from(value)))
}

/// Validates an AllocateRequest; returns the ledger request and the wait the caller asked for.
pub fn allocate(req: pb::AllocateRequest, config: &Config) -> Result<(AllocRequest, Duration), Error> {
    // Every field is checked, so one refusal lists every violation.
    let mut bad = Violations::default();
    let items = bad.keep(items(req.items));
    bad.keep(validate::text("holder", &req.holder, true));
    let ttl = match &req.ttl {
        Some(ttl) => bad.keep(validate::ttl(ttl, config.max_ttl)),
        None => Some(config.default_ttl),
    };
    let max_wait = match &req.max_wait {
        Some(wait) => bad.keep(validate::duration("max_wait", wait)),
        None => Some(Duration::ZERO),
    };
    if let Some(wait) = max_wait
        && wait > config.max_wait
    {
        bad.add("max_wait", format!("{wait:?} exceeds the server maximum {:?}", config.max_wait));
    }
    let scope = bad.keep(optional_text("scope_id", req.scope_id));
    let request_id = bad.keep(optional_text("request_id", req.request_id));
    bad.check()?;
    let (Some(items), Some(ttl), Some(max_wait), Some(scope), Some(request_id)) =
        (items, ttl, max_wait, scope, request_id)
    else {
        unreachable!("every None was noted as a violation");
    };
    let request = AllocRequest { items, holder: Arc::from(req.holder), scope, ttl, request_id };
    Ok((request, max_wait))
}

/// Parses a lease id field.
pub fn lease_id(id: &str) -> Result<LeaseId, Error> {
    if id.is_empty() {
        return Err(Error::invalid("lease_id", "is required"));
    }
    id.parse()
}

/// Validates a scope id that must be present.
pub fn scope_id(scope: &str) -> Result<&str, Error> {
    validate::text("scope_id", scope, true)?;
    Ok(scope)
}

/// Renders a lease.
pub fn lease(lease: &Lease, pool: &str, clock: &Clock) -> pb::Lease {
    lease_named(lease, lease.id.to_string(), pool, clock)
}

/// Renders a lease under `lease_id`, its id as the caller wrote it (a valid id has exactly one
/// spelling, so a renewal reuses the request's string rather than rendering it again).
pub fn lease_named(lease: &Lease, lease_id: String, pool: &str, clock: &Clock) -> pb::Lease {
    pb::Lease {
        lease_id,
        pool: pool.to_owned(),
        size_bytes: lease.size,
        holder: lease.holder.to_string(),
        scope_id: lease.scope.as_deref().unwrap_or_default().to_owned(),
        ttl: prost_types::Duration::try_from(lease.ttl).ok(),
        expire_time: Some(clock.wall(lease.expires_at)),
    }
}

/// Renders pool statistics.
pub fn pool_stats(s: PoolStats) -> pb::PoolStats {
    pb::PoolStats {
        name: s.name.to_string(),
        capacity_bytes: s.capacity,
        used_bytes: s.used,
        available_bytes: s.available,
        live_leases: s.live_leases,
        waiters: s.waiters,
        peak_used_bytes: s.peak_used,
        granted_total: s.counters.granted,
        freed_total: s.counters.freed,
        expired_total: s.counters.expired,
        wait_timeouts_total: s.counters.wait_timeouts,
        rejected_total: s.counters.rejected,
        // Cumulative byte totals are 128-bit inside; the API reports them saturated at 2^64 - 1.
        granted_bytes_total: saturate(s.counters.granted_bytes),
        released_bytes_total: saturate(s.counters.released_bytes),
        reclaimable_bytes: s.reclaimable,
        reclaiming_bytes: s.reclaiming,
        reclaim_requests_total: s.counters.reclaim_requests,
        reclaim_asked_total: s.counters.reclaim_asked,
        reclaim_returned_total: s.counters.reclaim_returned,
        reclaim_declined_total: s.counters.reclaim_declined,
        revoked_total: s.counters.revoked,
        reclaimed_bytes_total: saturate(s.counters.reclaimed_bytes),
    }
}

fn saturate(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Validates a pool name field: malformed names are INVALID_ARGUMENT (unknown ones, later,
/// NOT_FOUND), and an unbounded name never reaches a status message.
pub fn pool_name(field: &str, name: &str) -> Result<(), Error> {
    validate::pool_name(name).map_err(|reason| Error::invalid(field, reason))
}

/// Renders a CanAllocate entry.
pub fn pool_fit(f: PoolFit) -> pb::PoolFit {
    pb::PoolFit {
        pool: f.pool.to_string(),
        requested_bytes: f.requested,
        available_bytes: f.available,
        capacity_bytes: f.capacity,
        waiters: f.waiters,
        reclaimable_bytes: f.reclaimable,
    }
}

/// Maps a domain event kind to the proto enum.
pub fn event_kind(kind: EventKind) -> pb::EventKind {
    match kind {
        EventKind::Allocated => pb::EventKind::Allocated,
        EventKind::Freed => pb::EventKind::Freed,
        EventKind::Expired => pb::EventKind::Expired,
        EventKind::PoolCreated => pb::EventKind::PoolCreated,
        EventKind::WaitTimedOut => pb::EventKind::WaitTimedOut,
        EventKind::Renewed => pb::EventKind::Renewed,
        EventKind::Rejected => pb::EventKind::Rejected,
        EventKind::ReclaimRequested => pb::EventKind::ReclaimRequested,
        EventKind::Revoked => pb::EventKind::Revoked,
    }
}

/// Maps a proto event kind filter to the domain kind; UNSPECIFIED and unknown values are refused.
pub fn event_kind_filter(raw: i32) -> Result<EventKind, Error> {
    Ok(match pb::EventKind::try_from(raw) {
        Ok(pb::EventKind::Allocated) => EventKind::Allocated,
        Ok(pb::EventKind::Freed) => EventKind::Freed,
        Ok(pb::EventKind::Expired) => EventKind::Expired,
        Ok(pb::EventKind::PoolCreated) => EventKind::PoolCreated,
        Ok(pb::EventKind::WaitTimedOut) => EventKind::WaitTimedOut,
        Ok(pb::EventKind::Renewed) => EventKind::Renewed,
        Ok(pb::EventKind::Rejected) => EventKind::Rejected,
        Ok(pb::EventKind::ReclaimRequested) => EventKind::ReclaimRequested,
        Ok(pb::EventKind::Revoked) => EventKind::Revoked,
        Ok(pb::EventKind::Unspecified) | Err(_) => {
            return Err(Error::invalid("kinds", format!("{raw} is not an event kind to filter on")));
        }
    })
}

/// Renders an event.
pub fn event(e: &Event) -> pb::Event {
    pb::Event {
        sequence: e.sequence,
        time: Some(e.time.into()),
        kind: event_kind(e.kind).into(),
        pool: e.pool.to_string(),
        lease_id: e.lease.map(|id| id.to_string()).unwrap_or_default(),
        size_bytes: e.size,
        holder: e.holder.as_deref().unwrap_or_default().to_owned(),
        scope_id: e.scope.as_deref().unwrap_or_default().to_owned(),
        pool_used_bytes: e.pool_used,
    }
}

/// The limits `config` enforces on callers, as ListPools advertises them.
pub fn server_limits(config: &Config) -> pb::ServerLimits {
    let duration = |d: Duration| prost_types::Duration::try_from(d).ok();
    pb::ServerLimits {
        max_ttl: duration(config.max_ttl),
        default_ttl: duration(config.default_ttl),
        max_wait: duration(config.max_wait),
        max_items: MAX_ITEMS as u32,
        max_leases_per_holder: config.limits.leases_per_holder as u64,
        max_scope_members: config.limits.scope_members as u64,
        reclaim_timeout: duration(config.reclaim_timeout),
        max_reclaimable_leases: MAX_OFFERED as u32,
    }
}
