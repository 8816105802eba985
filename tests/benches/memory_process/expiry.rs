//! Mass expiry: 100,000 leases due at the same instant, and how long after that instant the
//! server has reclaimed them all (the pool back at its starting use, as another caller sees it).
//! Expiry is memory-service's garbage collector: a runtime that crashes holding a large KV cache
//! must not leave its memory stranded for long, however many leases it held.

use std::time::{Duration, SystemTime};

use e2e::{alloc, pb_duration};
use proto::memory::v1::{GetPoolStatsRequest, memory_service_client::MemoryServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Leases that come due together.
pub const LEASES: usize = 100_000;
/// Leases per Allocate (the server's limit per call).
const PER_CALL: usize = 64;
/// Concurrent Allocate calls while granting.
const CONCURRENCY: usize = 16;
/// Room to grant them all before their common deadline, even with fsync on every commit.
const GRANT_WINDOW: Duration = Duration::from_secs(20);

/// What one mass expiry measured.
pub struct Expiry {
    /// From the last deadline to the moment the pool was back at its starting use.
    pub reclaimed_after: Duration,
    /// Spread of the deadlines the server gave (they are set per call, to the millisecond).
    pub deadline_spread: Duration,
    /// How long the first Allocate after the reclaim took (with a state dir it waits for the
    /// commit that deletes the expired leases).
    pub next_grant: Duration,
}

/// Grants [`LEASES`] leases of 4 KiB in `pool`, all due at one instant, then watches the pool
/// from just before that instant until every one is reclaimed.
pub async fn mass_expiry(channel: &Channel, pool: &str) -> Expiry {
    let client = MemoryServiceClient::new(channel.clone());
    let stats = |mut client: MemoryServiceClient<Channel>| async move {
        let request = GetPoolStatsRequest { name: pool.to_owned() };
        client.get_pool_stats(request).await.expect("stats").into_inner().pool.expect("pool")
    };
    let baseline = stats(client.clone()).await;
    // Every call's TTL is the time left to the common deadline, so all deadlines coincide to
    // within a millisecond plus one call's latency.
    let due = Instant::now() + GRANT_WINDOW;
    let calls = LEASES / PER_CALL + usize::from(!LEASES.is_multiple_of(PER_CALL));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (mut client, next, pool) = (client.clone(), next.clone(), pool.to_owned());
            tokio::spawn(async move {
                let (mut first, mut last) = (None::<SystemTime>, None::<SystemTime>);
                loop {
                    let call = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if call >= calls {
                        return (first, last);
                    }
                    let count = PER_CALL.min(LEASES - call * PER_CALL);
                    let mut request = alloc(&vec![(pool.as_str(), 4096); count]);
                    let left = due.saturating_duration_since(Instant::now());
                    assert!(left > Duration::from_secs(1), "granting took longer than {GRANT_WINDOW:?}");
                    request.ttl = Some(pb_duration(Duration::from_millis(left.as_millis() as u64)));
                    let granted = client.allocate(request).await.expect("allocate").into_inner();
                    for lease in granted.leases {
                        let at = SystemTime::try_from(lease.expire_time.expect("expire_time")).expect("time");
                        first = Some(first.map_or(at, |f| f.min(at)));
                        last = Some(last.map_or(at, |l| l.max(at)));
                    }
                }
            })
        })
        .collect();
    let mut bounds = Vec::new();
    for task in tasks {
        bounds.push(task.await.expect("grant task"));
    }
    let first = bounds.iter().filter_map(|b| b.0).min().expect("granted");
    let last = bounds.iter().filter_map(|b| b.1).max().expect("granted");
    let granted = stats(client.clone()).await;
    assert_eq!(granted.live_leases, baseline.live_leases + LEASES as u64, "every lease granted");

    // Poll from just before the first deadline: back-to-back calls, so the reclaim is seen
    // within one call's latency. Bounded: the deadline plus a minute.
    tokio::time::sleep_until(due - Duration::from_millis(50)).await;
    let give_up = due + Duration::from_secs(60);
    let reclaimed_at = loop {
        let now = stats(client.clone()).await;
        if now.live_leases == baseline.live_leases && now.used_bytes == baseline.used_bytes {
            break SystemTime::now();
        }
        assert!(
            Instant::now() < give_up,
            "{} leases still live a minute after their deadline",
            now.live_leases
        );
    };
    // Leases live until their deadline: reclaimed before it would be a bug.
    assert!(reclaimed_at >= first, "leases reclaimed before their deadline");
    let started = Instant::now();
    let mut client = client;
    let lease = client.allocate(alloc(&[(pool, 4096)])).await.expect("allocate after").into_inner();
    let next_grant = started.elapsed();
    let lease_id = lease.leases[0].lease_id.clone();
    client.free(proto::memory::v1::FreeRequest { lease_id }).await.expect("free");
    Expiry {
        reclaimed_after: reclaimed_at.duration_since(last).unwrap_or_default(),
        deadline_spread: last.duration_since(first).unwrap_or_default(),
        next_grant,
    }
}
