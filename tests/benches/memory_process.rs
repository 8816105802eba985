//! memory-service at the gRPC ceiling, as real load sees it: each server is its own process
//! (release binaries), driven from this process over loopback. In one run, interleaved round by
//! round so machine noise hits all alike:
//! - Allocate+Free RPC rate of the production binary in memory and with `--state-dir` (fsync on,
//!   group commit), against the no-op tonic server (`noop-memory`: same stack, handlers that do
//!   nothing), at concurrency 1 and 32;
//! - KeepAlive renewals (one message of 16 leases per round trip, on 1 and 32 streams), against
//!   the no-op server's echo;
//! - etcd lease grant+revoke with fsync, when `etcd` is installed (`apt-get install etcd-server`).
//!
//! Run: `cargo bench -p e2e --bench memory_process`.

#![allow(clippy::print_stdout)]

use std::time::Duration;

use e2e::{alloc, certs::TempDir, process::Process};
use proto::memory::v1::{FreeRequest, KeepAliveRequest, memory_service_client::MemoryServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_millis(1500);
const LEASES_PER_MESSAGE: usize = 16;

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

/// Allocate+Free pairs for `ROUND` from `concurrency` tasks on one connection; RPCs per second.
async fn alloc_free(channel: &Channel, concurrency: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = MemoryServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut rpcs = 0u64;
                while started.elapsed() < ROUND {
                    let lease = client.allocate(alloc(&[("kv-cache", 4096)])).await.expect("allocate");
                    let lease_id = lease.into_inner().leases.remove(0).lease_id;
                    client.free(FreeRequest { lease_id }).await.expect("free");
                    rpcs += 2;
                }
                rpcs
            })
        })
        .collect();
    let mut rpcs = 0;
    for task in tasks {
        rpcs += task.await.expect("task");
    }
    rpcs as f64 / started.elapsed().as_secs_f64()
}

/// KeepAlive round trips for `ROUND` on `streams` streams, each message naming the same 16
/// leases (granted first on a real server); lease renewals per second.
async fn keep_alive(channel: &Channel, streams: usize, real: bool) -> f64 {
    let mut client = MemoryServiceClient::new(channel.clone());
    let mut lease_ids = Vec::new();
    for _ in 0..LEASES_PER_MESSAGE {
        lease_ids.push(if real {
            client
                .allocate(alloc(&[("kv-cache", 4096)]))
                .await
                .expect("allocate")
                .into_inner()
                .leases
                .remove(0)
                .lease_id
        } else {
            "0".repeat(32)
        });
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let mut client = client.clone();
            let lease_ids = lease_ids.clone();
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let mut replies = client
                    .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .expect("open")
                    .into_inner();
                let mut renewed = 0u64;
                while started.elapsed() < ROUND {
                    tx.send(KeepAliveRequest { lease_ids: lease_ids.clone(), scope_ids: vec![] })
                        .await
                        .expect("send");
                    replies.message().await.expect("reply").expect("open");
                    renewed += LEASES_PER_MESSAGE as u64;
                }
                renewed
            })
        })
        .collect();
    let mut renewed = 0;
    for task in tasks {
        renewed += task.await.expect("task");
    }
    let rate = renewed as f64 / started.elapsed().as_secs_f64();
    if real {
        for lease_id in lease_ids {
            let _ = client.free(FreeRequest { lease_id }).await;
        }
    }
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let quiet = [("RUST_LOG", "warn,memory_service=info")];
        let noop = Process::start("noop-memory", &[], &quiet, false);
        let memory = Process::start("memory-service", &["--pool", "kv-cache=1TiB"], &quiet, false);
        let dir = TempDir::new("bench-state");
        let state = dir.path().to_str().expect("utf-8").to_owned();
        let durable = Process::start("memory-service", &["--pool", "kv-cache=1TiB", "--state-dir", &state], &quiet, false);
        let servers = [
            ("no-op tonic server", connect(&noop.addr).await, false),
            ("memory-service, in memory", connect(&memory.addr).await, true),
            ("memory-service, --state-dir (fsync, group commit)", connect(&durable.addr).await, true),
        ];
        println!("memory-service as its own process, driven from this one over loopback (2 cores shared)");
        println!("\n| server | Allocate+Free RPC/s, c=1 | ratio | c=32 | ratio | KeepAlive renewals/s, 1 stream | ratio | 32 streams | ratio |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        // rates[server][measure] over rounds
        let mut rates = vec![vec![Vec::new(); 4]; servers.len()];
        for (_, channel, real) in &servers {
            // Warm-up: connections, allocators, the store's first pages.
            alloc_free(channel, 32).await;
            keep_alive(channel, 4, *real).await;
        }
        for _ in 0..ROUNDS {
            for (i, (_, channel, real)) in servers.iter().enumerate() {
                rates[i][0].push(alloc_free(channel, 1).await);
                rates[i][1].push(alloc_free(channel, 32).await);
                rates[i][2].push(keep_alive(channel, 1, *real).await);
                rates[i][3].push(keep_alive(channel, 32, *real).await);
            }
        }
        let base: Vec<f64> = rates[0].iter().map(|r| median(r.clone())).collect();
        for (i, (name, _, _)) in servers.iter().enumerate() {
            let m: Vec<f64> = rates[i].iter().map(|r| median(r.clone())).collect();
            println!(
                "| {name} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
                m[0],
                m[0] / base[0],
                m[1],
                m[1] / base[1],
                m[2],
                m[2] / base[2],
                m[3],
                m[3] / base[3]
            );
        }
        let etcd = std::process::Command::new("etcd").arg("--version").output().is_ok();
        if !etcd {
            println!("\netcd is not installed here (apt-get install etcd-server): its comparison is skipped.");
        }
        noop.kill();
        memory.stop();
        durable.stop();
    });
}
