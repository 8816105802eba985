//! Allocate+Free over gRPC on loopback against a no-op unary RPC (health Check) served by the
//! same server in the same run, at concurrency 1 and 32. The ratio compares RPC rates: an
//! Allocate+Free pair is two RPCs, so `ratio = 2 × pairs/s ÷ no-op calls/s`; 1.0 would mean the
//! memory logic costs nothing next to the gRPC round trip.
//!
//! Run: `cargo bench -p e2e --bench memory_grpc`; add `-- telemetry` to install the production
//! subscriber first (log filter at warn, OpenTelemetry layer without exporter), as the binaries
//! run: every call then also builds its spans.

use std::time::Duration;

use e2e::{MemoryServer, alloc};
use proto::memory::v1::{FreeRequest, memory_service_client::MemoryServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const ROUNDS: usize = 5;
/// Each round stops after this many operations or this much time, whichever comes first.
const TIME_CAP: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
enum Op {
    Noop,
    AllocFree,
}

/// Runs `total` operations split over `concurrency` tasks sharing one channel; returns ops/s.
async fn round(channel: &Channel, op: Op, concurrency: usize, total: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut memory = MemoryServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            while done < total / concurrency && Instant::now() - started < TIME_CAP {
                match op {
                    Op::Noop => {
                        health.check(HealthCheckRequest { service: String::new() }).await.expect("check");
                    }
                    Op::AllocFree => {
                        let lease = memory.allocate(alloc(&[("kv-cache", 4096)])).await.expect("allocate");
                        let lease_id = lease.into_inner().leases.remove(0).lease_id;
                        memory.free(FreeRequest { lease_id }).await.expect("free");
                    }
                }
                done += 1;
            }
            done
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += task.await.expect("bench task");
    }
    done as f64 / (Instant::now() - started).as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[allow(clippy::print_stdout)]
fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let telemetry = std::env::args().any(|a| a == "telemetry");
    runtime.block_on(async {
        let _telemetry =
            telemetry.then(|| serving::telemetry::init("bench", "warn", serving::telemetry::LogFormat::Text));
        let server = MemoryServer::with_pools(&[("kv-cache", 1 << 40)]).await;
        let channel = server.channel().await;
        let mode = if telemetry { "with the production tracing subscriber" } else { "no tracing subscriber" };
        println!(
            "memory-service over loopback gRPC (client and server in one process, 2 worker threads, {mode})"
        );
        println!("| concurrency | no-op calls/s | Allocate+Free pairs/s | RPC rate ratio |");
        println!("| ---: | ---: | ---: | ---: |");
        for (concurrency, total) in [(1usize, 3_000usize), (32, 20_000)] {
            // Warm-up: connections, allocator, caches.
            round(&channel, Op::Noop, concurrency, total / 10).await;
            round(&channel, Op::AllocFree, concurrency, total / 10).await;
            let (mut noop, mut pairs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                // Interleaved so machine noise hits both alike; the ratio is taken per round.
                let n = round(&channel, Op::Noop, concurrency, total).await;
                let p = round(&channel, Op::AllocFree, concurrency, total / 2).await;
                noop.push(n);
                pairs.push(p);
                ratios.push(2.0 * p / n);
            }
            println!(
                "| {concurrency} | {:.0} | {:.0} | {:.2} |",
                median(noop),
                median(pairs),
                median(ratios)
            );
        }
        server.stop().await;
    });
}
