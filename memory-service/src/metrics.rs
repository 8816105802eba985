//! memory-service's Prometheus metrics: per-pool state read from the ledger at scrape time, and
//! histograms of allocation waits and lease lifetimes.

use std::{fmt::Write, sync::Arc, time::Duration};

use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};
use serving::{admin, observe::GrpcMetrics};

use crate::ledger::{PoolId, PoolStats, Release, ReleaseObserver};

/// The registry and the instruments handlers update.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Everything below, plus gRPC server metrics.
    pub registry: Registry,
    /// gRPC calls by method and code (the server layer).
    pub grpc: GrpcMetrics,
    /// Time Allocate calls spent waiting for room, by outcome.
    pub wait: HistogramVec,
    lifetimes: HistogramVec,
    /// Time from a ReclaimRequest to each lease's bytes being back, by pool and outcome.
    reclaims: HistogramVec,
    /// How long each group commit to the state store took (write and fsync).
    pub commit_seconds: Histogram,
    /// How many records (pools, leases, idempotency records) each group commit wrote.
    pub commit_records: Histogram,
}

impl Metrics {
    /// A registry with every instrument registered; the series of `pools` (the ones created at
    /// start) exist at zero from the start.
    pub fn new(pools: &[&str]) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let grpc = GrpcMetrics::register(&registry, "memory-service")?;
        let wait = HistogramVec::new(
            HistogramOpts::new(
                "memory_allocate_wait_seconds",
                "Time an Allocate waited for room (calls that waited), by outcome.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["outcome"],
        )?;
        let lifetimes = HistogramVec::new(
            HistogramOpts::new(
                "memory_lease_lifetime_seconds",
                "How long leases lived, by pool and how they ended.",
            )
            .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]),
            &["pool", "reason"],
        )?;
        let reclaims = HistogramVec::new(
            HistogramOpts::new(
                "memory_reclaim_seconds",
                "Time from a ReclaimRequest to a lease's bytes being back in its pool, by pool and outcome (returned by the holder, or revoked at the deadline).",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0]),
            &["pool", "outcome"],
        )?;
        for outcome in ["granted", "timed_out", "cancelled", "shutdown"] {
            wait.with_label_values(&[outcome]);
        }
        for pool in pools {
            for reason in RELEASE_REASONS {
                lifetimes.with_label_values(&[pool, reason]);
            }
            for outcome in RECLAIM_OUTCOMES {
                reclaims.with_label_values(&[pool, outcome]);
            }
        }
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "memory_store_commit_seconds",
                "Time each group commit to the state store took, write and fsync (with --state-dir).",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]),
        )?;
        let commit_records = Histogram::with_opts(
            HistogramOpts::new(
                "memory_store_commit_records",
                "Records (pools, leases, idempotency records) written by each group commit: how many changes share one fsync.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1024.0, 16384.0]),
        )?;
        registry.register(Box::new(wait.clone()))?;
        registry.register(Box::new(lifetimes.clone()))?;
        registry.register(Box::new(reclaims.clone()))?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(commit_records.clone()))?;
        Ok(Metrics { registry, grpc, wait, lifetimes, reclaims, commit_seconds, commit_records })
    }

    /// The ledger's release observer, feeding the lifetime and reclaim histograms.
    pub fn lifetimes(&self) -> Arc<dyn ReleaseObserver> {
        Arc::new(Lifetimes {
            histograms: self.lifetimes.clone(),
            reclaims: self.reclaims.clone(),
            by_pool: parking_lot::Mutex::new(Vec::new()),
        })
    }
}

/// The `reason` labels of the lifetime histogram, in `Release` order.
const RELEASE_REASONS: [&str; 3] = ["freed", "expired", "revoked"];
/// The `outcome` labels of the reclaim histogram.
const RECLAIM_OUTCOMES: [&str; 2] = ["returned", "revoked"];

#[derive(Debug)]
struct Lifetimes {
    histograms: HistogramVec,
    reclaims: HistogramVec,
    /// Each pool's series (lifetimes by reason, then reclaims by outcome), resolved on its first
    /// release: a mass expiry of 100,000 leases would otherwise hash the labels 100,000 times
    /// under the ledger's lock.
    by_pool: parking_lot::Mutex<Vec<Option<[Histogram; 5]>>>,
}

impl Lifetimes {
    fn observe(&self, id: PoolId, pool: &str, series: usize, value: Duration) {
        let mut by_pool = self.by_pool.lock();
        if by_pool.len() <= id {
            by_pool.resize(id + 1, None);
        }
        let all = by_pool[id].get_or_insert_with(|| {
            let [f, e, r] = RELEASE_REASONS.map(|reason| self.histograms.with_label_values(&[pool, reason]));
            let [returned, revoked] =
                RECLAIM_OUTCOMES.map(|outcome| self.reclaims.with_label_values(&[pool, outcome]));
            [f, e, r, returned, revoked]
        });
        all[series].observe(value.as_secs_f64());
    }
}

impl ReleaseObserver for Lifetimes {
    fn released(&self, id: PoolId, pool: &str, lived: Duration, how: Release) {
        let series = match how {
            Release::Freed => 0,
            Release::Expired => 1,
            Release::Revoked => 2,
        };
        self.observe(id, pool, series, lived);
    }

    fn reclaim_answered(&self, id: PoolId, pool: &str, after: Duration, revoked: bool) {
        self.observe(id, pool, if revoked { 4 } else { 3 }, after);
    }
}

/// Pool gauges and cumulative counters of `pools`, and the server's `epoch`, read from the ledger when Prometheus scrapes
/// (see the server): the ledger keeps them exactly, so they are never double-counted or lost to
/// a lagging event stream.
pub fn pool_families(pools: &[PoolStats], epoch: u64) -> String {
    let mut out = String::new();
    type Pick = fn(&PoolStats) -> f64;
    let families: [(&str, &str, &str, Pick); 21] = [
        ("memory_pool_capacity_bytes", "gauge", "Pool capacity.", |p| p.capacity as f64),
        ("memory_pool_used_bytes", "gauge", "Bytes held by live leases.", |p| p.used as f64),
        ("memory_pool_available_bytes", "gauge", "Bytes free.", |p| p.available as f64),
        ("memory_pool_peak_used_bytes", "gauge", "Highest used bytes since the pool was created.", |p| {
            p.peak_used as f64
        }),
        ("memory_pool_live_leases", "gauge", "Live leases.", |p| p.live_leases as f64),
        ("memory_pool_waiters", "gauge", "Allocate calls waiting for room.", |p| p.waiters as f64),
        ("memory_pool_reclaimable_bytes", "gauge", "Bytes of leases offered as reclaimable.", |p| {
            p.reclaimable as f64
        }),
        (
            "memory_pool_reclaiming_bytes",
            "gauge",
            "Reclaimable bytes asked back and not yet answered.",
            |p| p.reclaiming as f64,
        ),
        ("memory_leases_granted_total", "counter", "Leases granted.", |p| p.counters.granted as f64),
        ("memory_leases_freed_total", "counter", "Leases freed by Free or FreeScope.", |p| {
            p.counters.freed as f64
        }),
        ("memory_leases_expired_total", "counter", "Leases reclaimed at expiry.", |p| {
            p.counters.expired as f64
        }),
        (
            "memory_leases_revoked_total",
            "counter",
            "Reclaimable leases revoked: asked back and not given back in time.",
            |p| p.counters.revoked as f64,
        ),
        ("memory_reclaim_requests_total", "counter", "ReclaimRequests sent to holders.", |p| {
            p.counters.reclaim_requests as f64
        }),
        ("memory_reclaim_asked_leases_total", "counter", "Leases named in ReclaimRequests.", |p| {
            p.counters.reclaim_asked as f64
        }),
        (
            "memory_reclaim_returned_leases_total",
            "counter",
            "Leases asked back that their holder gave back in time.",
            |p| p.counters.reclaim_returned as f64,
        ),
        (
            "memory_reclaim_declined_leases_total",
            "counter",
            "Leases asked back that their holder stopped offering instead.",
            |p| p.counters.reclaim_declined as f64,
        ),
        (
            "memory_reclaimed_bytes_total",
            "counter",
            "Bytes of leases asked back that came back (returned or revoked).",
            |p| p.counters.reclaimed_bytes as f64,
        ),
        ("memory_allocate_wait_timeouts_total", "counter", "Allocate waits that timed out.", |p| {
            p.counters.wait_timeouts as f64
        }),
        ("memory_allocate_rejected_total", "counter", "Allocate calls refused at once.", |p| {
            p.counters.rejected as f64
        }),
        ("memory_granted_bytes_total", "counter", "Bytes granted.", |p| p.counters.granted_bytes as f64),
        (
            "memory_released_bytes_total",
            "counter",
            "Bytes returned by frees, expiries and revocations.",
            |p| p.counters.released_bytes as f64,
        ),
    ];
    for (name, kind, help, pick) in families {
        let samples: Vec<(String, f64)> =
            pools.iter().map(|p| (format!("pool=\"{}\"", p.name), pick(p))).collect();
        admin::family(&mut out, name, kind, help, &samples);
    }
    // The epoch as a label: a 64-bit id does not survive a float sample.
    let _ = writeln!(
        out,
        "# HELP memory_server_info Constant 1, labelled with the server epoch (the id of its state)."
    );
    let _ = writeln!(out, "# TYPE memory_server_info gauge");
    let _ = writeln!(out, "memory_server_info{{epoch=\"{}\"}} 1", epoch);
    out
}
