//! memory-service with `--state-dir`, killed with SIGKILL under concurrent load and restarted on
//! the same directory: every acknowledged, unfreed lease is there and usable, with at least the
//! deadline its last acknowledged renewal gave it; nothing acknowledged as freed comes back; used bytes are the sum of the live leases; the pool refuses
//! one byte more than it has left; a lease whose TTL ran out while the server was down is gone;
//! the epoch is the same, so holders see no restart.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use e2e::{alloc, certs::TempDir, pb_duration, process::Process};
use proto::memory::v1::{
    FreeRequest, GetPoolStatsRequest, ListPoolsRequest, RenewLeaseRequest,
    memory_service_client::MemoryServiceClient,
};
use tonic::{Code, transport::Channel};

const CAPACITY: u64 = 64 << 20;
const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info")];

/// What the clients were told.
#[derive(Debug, Default)]
struct Told {
    /// Leases whose grant was acknowledged and whose free was not: lease id → size.
    live: HashMap<String, u64>,
    /// Leases whose free was acknowledged.
    freed: Vec<String>,
    /// Allocate calls with no answer (the kill came first): request id → size. Their outcome is
    /// unknown until a retry with the same request id says.
    unknown: HashMap<String, u64>,
    /// Free calls with no answer: lease id → size.
    unknown_free: HashMap<String, u64>,
    /// The deadline of each lease's last acknowledged renewal.
    renewed: HashMap<String, SystemTime>,
}

async fn connect(addr: &str) -> MemoryServiceClient<Channel> {
    let channel =
        Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    MemoryServiceClient::new(channel)
}

/// One client: allocate (with a request id, so an unanswered call can be resolved later) and
/// free every other lease, until the server dies.
async fn load(mut client: MemoryServiceClient<Channel>, worker: usize, told: Arc<Mutex<Told>>) {
    for i in 0..10_000u64 {
        let size = 1 + (i * 7919 + worker as u64 * 104_729) % 4096;
        let request_id = format!("w{worker}-{i}");
        let mut ask = alloc(&[("kv-cache", size)]);
        ask.request_id = request_id.clone();
        ask.holder = format!("worker-{worker}");
        told.lock().expect("lock").unknown.insert(request_id.clone(), size);
        let Ok(reply) = client.allocate(ask).await else { return };
        let lease = reply.into_inner().leases.remove(0);
        {
            let mut told = told.lock().expect("lock");
            told.unknown.remove(&request_id);
            told.live.insert(lease.lease_id.clone(), size);
        }
        if i % 2 == 1 {
            told.lock().expect("lock").unknown_free.insert(lease.lease_id.clone(), size);
            let freed = client.free(FreeRequest { lease_id: lease.lease_id.clone() }).await;
            let mut told = told.lock().expect("lock");
            if freed.is_err() {
                return;
            }
            told.unknown_free.remove(&lease.lease_id);
            told.live.remove(&lease.lease_id);
            told.freed.push(lease.lease_id);
        }
    }
}

/// Renews acknowledged leases, a few at a time (renewer `n` takes the `n`th sixteen), until the
/// server dies; each acknowledged renewal's deadline is recorded. Rounds are 2 ms apart, so a
/// renewal that was lost shows as a deadline at least that much older after the restart.
async fn renew(mut client: MemoryServiceClient<Channel>, renewer: usize, told: Arc<Mutex<Told>>) {
    for _ in 0..100_000 {
        let leases: Vec<String> =
            told.lock().expect("lock").live.keys().skip(renewer * 16).take(16).cloned().collect();
        for lease_id in leases {
            match client.renew_lease(RenewLeaseRequest { lease_id: lease_id.clone() }).await {
                Ok(reply) => {
                    let lease = reply.into_inner().lease.expect("lease");
                    let deadline = lease.expire_time.expect("expiry").try_into().expect("timestamp");
                    told.lock().expect("lock").renewed.insert(lease_id, deadline);
                }
                // Freed meanwhile by its worker.
                Err(status) if status.code() == Code::NotFound => {}
                Err(_) => return,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_durable_memory_service_comes_back_with_every_acknowledged_lease() {
    let dir = TempDir::new("memory-state");
    let state = dir.path().to_str().expect("utf-8 path").to_owned();
    let pools = format!("kv-cache={CAPACITY}");
    let memory = Process::start("memory-service", &["--pool", &pools, "--state-dir", &state], LOG, false);
    let addr = memory.addr.clone();
    let mut client = connect(&addr).await;
    let epoch = client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().server_epoch;

    // A lease that will run out while the server is down.
    let mut short = alloc(&[("kv-cache", 1000)]);
    short.holder = "short".into();
    short.ttl = Some(pb_duration(Duration::from_millis(300)));
    let short = client.allocate(short).await.expect("granted").into_inner().leases.remove(0);

    let told = Arc::new(Mutex::new(Told::default()));
    let mut workers = Vec::new();
    for worker in 0..8 {
        workers.push(tokio::spawn(load(connect(&addr).await, worker, told.clone())));
    }
    let mut renewers = Vec::new();
    for renewer in 0..4 {
        renewers.push(tokio::spawn(renew(connect(&addr).await, renewer, told.clone())));
    }
    // Kill under load: once a few hundred grants were acknowledged.
    let mut watcher = connect(&addr).await;
    loop {
        let stats = watcher.get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() }).await;
        if stats.expect("stats").into_inner().pool.expect("pool").granted_total >= 400 {
            break;
        }
        tokio::task::yield_now().await;
    }
    memory.kill();
    for worker in workers {
        worker.await.expect("worker");
    }
    for renewer in renewers {
        renewer.await.expect("renewer");
    }
    // The short lease's deadline passes while the server is down.
    let deadline: SystemTime = short.expire_time.expect("expiry").try_into().expect("timestamp");
    if let Ok(left) = deadline.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }

    let listen = addr.clone();
    let memory = Process::start_at(
        "memory-service",
        &["--pool", &pools, "--state-dir", &state, "--listen", &listen],
        LOG,
    );
    let mut client = connect(&addr).await;
    let after = client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner();
    assert_eq!(after.server_epoch, epoch, "the epoch changed: holders would see a restart");

    let mut told = std::mem::take(&mut *told.lock().expect("lock"));
    assert!(told.live.len() > 100, "too little load before the kill: {}", told.live.len());
    // Unanswered calls: a retry with the same request id replays a grant that was made durable,
    // or grants anew; either way its lease is then known. Unanswered frees are done again.
    for (request_id, size) in std::mem::take(&mut told.unknown) {
        let worker = request_id[1..].split('-').next().expect("worker").to_owned();
        let mut ask = alloc(&[("kv-cache", size)]);
        ask.request_id = request_id;
        ask.holder = format!("worker-{worker}");
        let lease = client.allocate(ask).await.expect("retry answered").into_inner().leases.remove(0);
        told.live.insert(lease.lease_id, size);
    }
    for (lease_id, _) in std::mem::take(&mut told.unknown_free) {
        match client.free(FreeRequest { lease_id: lease_id.clone() }).await {
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        }
        told.live.remove(&lease_id);
        told.freed.push(lease_id);
    }
    // Every acknowledged renewal was kept: freeing a renewed lease shows the deadline it had
    // (a lost renewal would show an older one). Allow for the wall-clock conversions.
    let renewed: Vec<_> = told.renewed.iter().filter(|(id, _)| told.live.contains_key(*id)).collect();
    assert!(!renewed.is_empty(), "no renewal was acknowledged before the kill");
    for (lease_id, &deadline) in renewed {
        let freed =
            client.free(FreeRequest { lease_id: lease_id.clone() }).await.expect("renewed lease kept");
        let kept: SystemTime = freed
            .into_inner()
            .lease
            .expect("lease")
            .expire_time
            .expect("expiry")
            .try_into()
            .expect("timestamp");
        assert!(
            kept + Duration::from_millis(1) >= deadline,
            "lease {lease_id} came back with an older deadline than its acknowledged renewal: {:?} earlier",
            deadline.duration_since(kept).unwrap_or_default()
        );
        told.live.remove(lease_id);
        told.freed.push(lease_id.clone());
    }
    // Every acknowledged live lease is there and usable.
    for lease_id in told.live.keys() {
        client
            .renew_lease(RenewLeaseRequest { lease_id: lease_id.clone() })
            .await
            .expect("an acknowledged lease came back");
    }
    // Nothing acknowledged as freed comes back.
    for lease_id in &told.freed {
        let status = client.renew_lease(RenewLeaseRequest { lease_id: lease_id.clone() }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "a freed lease came back: {status:?}");
    }
    // The lease that ran out while the server was down is gone, counted as expired.
    let status =
        client.renew_lease(RenewLeaseRequest { lease_id: short.lease_id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let pool = client
        .get_pool_stats(GetPoolStatsRequest { name: "kv-cache".into() })
        .await
        .expect("stats")
        .into_inner()
        .pool
        .expect("pool");
    let used: u64 = told.live.values().sum();
    assert_eq!(pool.used_bytes, used, "used bytes are not the sum of the live leases");
    assert_eq!(pool.live_leases, told.live.len() as u64);
    assert!(pool.expired_total >= 1);
    // The pool refuses one byte more than it has left, and grants exactly that.
    let mut over = alloc(&[("kv-cache", CAPACITY - used + 1)]);
    over.holder = "check".into();
    assert_eq!(client.allocate(over).await.unwrap_err().code(), Code::ResourceExhausted);
    let mut exact = alloc(&[("kv-cache", CAPACITY - used)]);
    exact.holder = "check".into();
    client.allocate(exact).await.expect("exactly what is left");
    memory.stop();
}

/// A watcher that misses the last events of a durable server's life (it disconnected, then the
/// server restarted gracefully) resumes by (epoch, sequence) in the next life and gets them from
/// the stored tail, in order, then the new life's events, numbered on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_across_a_graceful_restart_from_the_stored_events() {
    use e2e::{MemoryServer, config_with_pools};
    use proto::memory::v1::{EventKind, WatchEventsRequest, watch_events_response::Item};
    use tokio_stream::StreamExt;

    let dir = TempDir::new("memory-resume");
    let config = || {
        let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
        config.state_dir = Some(dir.path().to_path_buf());
        config
    };
    let memory = MemoryServer::start(config()).await;
    let addr = memory.addr;
    let mut client = memory.client().await;
    let epoch = client.list_pools(ListPoolsRequest {}).await.expect("list").into_inner().server_epoch;
    let mut watch = client.watch_events(WatchEventsRequest::default()).await.expect("watch").into_inner();
    client.allocate(alloc(&[("kv-cache", 1)])).await.expect("granted");
    let seen = match watch.next().await.expect("open").expect("event").item {
        Some(Item::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(seen.kind(), EventKind::Allocated);
    drop(watch);
    // Missed by the watcher: two more grants, then a graceful restart.
    let mut missed = Vec::new();
    for _ in 0..2 {
        let reply = client.allocate(alloc(&[("kv-cache", 1)])).await.expect("granted").into_inner();
        missed.push(reply.leases[0].lease_id.clone());
    }
    memory.stop().await;
    let memory = MemoryServer::start_at(addr, config()).await;
    let mut client = memory.client().await;
    let resume = WatchEventsRequest {
        resume_after_sequence: seen.sequence,
        resume_epoch: epoch,
        ..Default::default()
    };
    let mut watch = client.watch_events(resume).await.expect("resumable after the restart").into_inner();
    client.allocate(alloc(&[("kv-cache", 1)])).await.expect("granted");
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        match watch.next().await.expect("open").expect("event").item {
            Some(Item::Event(event)) => replayed.push(event),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    let sequences: Vec<_> = replayed.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [seen.sequence + 1, seen.sequence + 2, seen.sequence + 3], "gapless, numbered on");
    let leases: Vec<_> = replayed[..2].iter().map(|e| e.lease_id.clone()).collect();
    assert_eq!(leases, missed, "the previous life's last events, from the store");
    memory.stop().await;
}
