//! The soak: mixed load on both services for N minutes, each a release binary in its own process,
//! driven from this one as real load would be. Allocations with and without waits, frees,
//! scope frees, renewals, keep-alive streams, event watchers, generations read to the end,
//! cancelled or abandoned, and reconnections. Every few seconds a row: operations per second and
//! both services' resident memory. At the end: errors by code, and the pools back at their
//! baseline once the load's leases are gone. Exits 1 on an unexpected error code or memory left
//! above the baseline.
//!
//! `scripts/soak [minutes]` (default 1). Only loopback; every loop ends at the deadline.

#![allow(clippy::print_stdout)] // the table is the output

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use e2e::{pb_duration, process::Process};
use proto::{
    memory::v1::{
        AllocateRequest, AllocationItem, FreeRequest, FreeScopeRequest, KeepAliveRequest, ListPoolsRequest,
        RenewLeaseRequest, WatchEventsRequest, memory_service_client::MemoryServiceClient,
    },
    runtime::v1::{CancelRequest, GenerateRequest, runtime_service_client::RuntimeServiceClient},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};

/// Codes the load expects: no room (or shed), leases that expired under it, cancellations.
const EXPECTED: &[Code] = &[Code::ResourceExhausted, Code::NotFound, Code::Cancelled];

#[derive(Default)]
struct Stats {
    ops: AtomicU64,
    errors: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Stats {
    fn record<T>(&self, op: &'static str, result: &Result<T, tonic::Status>) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if let Err(status) = result {
            let code = serving::observe::code_name(status.code()).to_owned();
            *self.errors.lock().expect("stats").entry((op, code)).or_default() += 1;
        }
    }
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect loopback")
}

/// Allocates, frees, frees scopes, renews, and reconnects now and then.
async fn allocator(addr: String, worker: u64, until: Instant, stats: Arc<Stats>) {
    let mut rng = StdRng::seed_from_u64(worker);
    let mut client = MemoryServiceClient::new(channel(&addr).await);
    let mut held: Vec<(String, usize)> = Vec::new();
    while Instant::now() < until {
        let roll = rng.random_range(0..100);
        if roll < 50 || held.is_empty() {
            let n = rng.random_range(1..4);
            let items = (0..n)
                .map(|_| AllocationItem {
                    pool: if rng.random_bool(0.7) { "kv-cache" } else { "activations" }.into(),
                    size_bytes: rng.random_range(4 << 10..1 << 20),
                })
                .collect();
            let scope = rng.random_range(0..8usize);
            let request = AllocateRequest {
                items,
                holder: format!("soak-{worker}"),
                scope_id: format!("soak-{worker}-{scope}"),
                ttl: Some(pb_duration(Duration::from_secs(2))),
                max_wait: rng.random_bool(0.3).then(|| pb_duration(Duration::from_millis(50))),
                request_id: if rng.random_bool(0.2) {
                    format!("r-{}", rng.random::<u32>())
                } else {
                    String::new()
                },
            };
            let result = client.allocate(request).await;
            stats.record("Allocate", &result);
            if let Ok(reply) = result {
                held.extend(reply.into_inner().leases.into_iter().map(|l| (l.lease_id, scope)));
            }
        } else if roll < 70 {
            let (lease_id, _) = held.swap_remove(rng.random_range(0..held.len()));
            let result = client.free(FreeRequest { lease_id }).await;
            stats.record("Free", &result);
        } else if roll < 80 {
            let scope = rng.random_range(0..8usize);
            held.retain(|(_, s)| *s != scope);
            let result =
                client.free_scope(FreeScopeRequest { scope_id: format!("soak-{worker}-{scope}") }).await;
            stats.record("FreeScope", &result);
        } else if roll < 90 {
            let lease_id = held[rng.random_range(0..held.len())].0.clone();
            let result = client.renew_lease(RenewLeaseRequest { lease_id }).await;
            stats.record("RenewLease", &result);
        } else {
            // A disconnection: a new connection, as a restarted client would make.
            client = MemoryServiceClient::new(channel(&addr).await);
        }
    }
}

/// Renews the allocators' scopes on a keep-alive stream, reopened every 50 messages.
async fn keeper(addr: String, until: Instant, stats: Arc<Stats>) {
    let mut client = MemoryServiceClient::new(channel(&addr).await);
    while Instant::now() < until {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let opened = client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        stats.record("KeepAlive", &opened);
        let Ok(replies) = opened else { continue };
        let mut replies = replies.into_inner();
        for _ in 0..50 {
            if Instant::now() >= until {
                break;
            }
            let scope_ids =
                (0..4).flat_map(|w| (0..8).map(move |s| format!("soak-{w}-{s}"))).take(64).collect();
            if tx.send(KeepAliveRequest { lease_ids: vec![], scope_ids, reclaimable: None }).await.is_err() {
                break;
            }
            let reply = replies.message().await;
            let reply = reply.and_then(|r| r.ok_or_else(|| tonic::Status::unavailable("stream ended")));
            stats.record("KeepAlive", &reply);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        client = MemoryServiceClient::new(channel(&addr).await);
    }
}

/// Watches every event, reconnecting every few seconds.
async fn watcher(addr: String, until: Instant, stats: Arc<Stats>) {
    while Instant::now() < until {
        let mut client = MemoryServiceClient::new(channel(&addr).await);
        let opened = client.watch_events(WatchEventsRequest::default()).await;
        stats.record("WatchEvents", &opened);
        let Ok(stream) = opened else { continue };
        let mut stream = stream.into_inner();
        let reconnect = Instant::now() + Duration::from_secs(5);
        while Instant::now() < reconnect.min(until) {
            match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                Ok(Ok(Some(_))) | Err(_) => {}
                Ok(Ok(None)) => break,
                Ok(Err(status)) => {
                    stats.record::<()>("WatchEvents", &Err(status));
                    break;
                }
            }
        }
    }
}

/// Generations: read to the end, cancelled after the first tokens, or abandoned.
async fn generator(addr: String, worker: u64, until: Instant, stats: Arc<Stats>) {
    let mut rng = StdRng::seed_from_u64(1000 + worker);
    let mut client = RuntimeServiceClient::new(channel(&addr).await);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let request_id = format!("soak-{worker}-{n}");
        let request = GenerateRequest {
            model: "distilgpt2".into(),
            prompt: "Write a story about caches and memory.".into(),
            max_tokens: rng.random_range(8..48),
            seed: n,
            request_id: request_id.clone(),
            ..GenerateRequest::default()
        };
        let opened = client.generate(request).await;
        let Ok(stream) = opened else {
            stats.record("Generate", &opened);
            continue;
        };
        let mut stream = stream.into_inner();
        let fate = rng.random_range(0..10);
        let mut read = 0;
        let outcome = loop {
            match stream.message().await {
                Ok(Some(_)) => {
                    read += 1;
                    if fate == 0 && read == 3 {
                        break Ok(()); // abandoned: the client goes away mid-stream
                    }
                    if fate == 1 && read == 3 {
                        let cancel = client.cancel(CancelRequest { request_id: request_id.clone() }).await;
                        // Finished just before the Cancel arrived: NOT_FOUND, as documented.
                        stats.record("Cancel", &cancel);
                    }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            }
        };
        stats.record("Generate", &outcome);
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

async fn books(addr: &str) -> (u64, u64) {
    let mut client = MemoryServiceClient::new(channel(addr).await);
    let pools = client.list_pools(ListPoolsRequest {}).await.expect("list pools").into_inner().pools;
    (pools.iter().map(|p| p.used_bytes).sum(), pools.iter().map(|p| p.live_leases).sum())
}

#[tokio::main]
async fn main() -> ExitCode {
    let minutes: f64 = std::env::args().nth(1).and_then(|m| m.parse().ok()).unwrap_or(1.0);
    let quiet = [("RUST_LOG", "warn,memory_service=info,runtime_service=info")];
    let memory = Process::start("memory-service", &[], &quiet, false);
    let memory_addr = format!("http://{}", memory.addr);
    let runtime = Process::start("runtime-service", &["--memory-addr", &memory_addr], &quiet, false);
    e2e::wait_serving(channel(&runtime.addr).await, "runtime.v1.RuntimeService").await;
    let baseline = books(&memory.addr).await;
    println!(
        "soak: {minutes} min; memory-service pid {} at {}, runtime-service pid {} at {}; baseline {} bytes in {} leases",
        memory.pid(),
        memory.addr,
        runtime.pid(),
        runtime.addr,
        baseline.0,
        baseline.1
    );

    let started = Instant::now();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    let stats = Arc::new(Stats::default());
    let mut tasks = Vec::new();
    for worker in 0..4 {
        tasks.push(tokio::spawn(allocator(memory.addr.clone(), worker, until, stats.clone())));
    }
    tasks.push(tokio::spawn(keeper(memory.addr.clone(), until, stats.clone())));
    tasks.push(tokio::spawn(watcher(memory.addr.clone(), until, stats.clone())));
    for worker in 0..3 {
        tasks.push(tokio::spawn(generator(runtime.addr.clone(), worker, until, stats.clone())));
    }

    // Rows every tenth of the run, at least every 5 s and at most every minute.
    let every = Duration::from_secs_f64((minutes * 6.0).clamp(5.0, 60.0));
    println!(
        "\n| t (s) | ops/s | memory-service RSS (MiB) | runtime-service RSS (MiB) | used bytes | leases |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut last = (started, 0u64);
    while Instant::now() < until {
        tokio::time::sleep(every.min(until - Instant::now())).await;
        let now = Instant::now();
        let ops = stats.ops.load(Ordering::Relaxed);
        let rate = (ops - last.1) as f64 / (now - last.0).as_secs_f64();
        let (used, leases) = books(&memory.addr).await;
        println!(
            "| {:.0} | {rate:.0} | {:.1} | {:.1} | {used} | {leases} |",
            (now - started).as_secs_f64(),
            rss_mib(memory.pid()),
            rss_mib(runtime.pid())
        );
        last = (now, ops);
    }
    for task in tasks {
        let _ = task.await;
    }
    let total = stats.ops.load(Ordering::Relaxed);
    let elapsed = (Instant::now() - started).as_secs_f64();
    println!("\n{total} operations in {elapsed:.0} s: {:.0} per second", total as f64 / elapsed);

    let errors = stats.errors.lock().expect("stats").clone();
    let mut unexpected = 0;
    println!("\n| operation | code | count |\n| --- | --- | ---: |");
    for ((op, code), count) in &errors {
        let expected = EXPECTED.iter().any(|c| serving::observe::code_name(*c) == code);
        if !expected {
            unexpected += count;
        }
        println!("| {op} | {code}{} | {count} |", if expected { "" } else { " (unexpected)" });
    }

    // The load's leases expire (2 s TTL) and the runtime returns its idle KV slabs (1 s): the
    // books come back to the baseline. Bounded.
    let settle = Instant::now() + Duration::from_secs(30);
    let mut end = books(&memory.addr).await;
    while end != baseline && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
        end = books(&memory.addr).await;
    }
    println!(
        "\nat the end: {} bytes in {} leases (baseline {} in {}); RSS memory-service {:.1} MiB, runtime-service {:.1} MiB",
        end.0,
        end.1,
        baseline.0,
        baseline.1,
        rss_mib(memory.pid()),
        rss_mib(runtime.pid())
    );
    runtime.stop();
    memory.stop();
    if unexpected > 0 || end != baseline {
        println!("FAILED: {unexpected} unexpected errors; end state {end:?} vs baseline {baseline:?}");
        return ExitCode::FAILURE;
    }
    println!("soak: OK");
    ExitCode::SUCCESS
}
