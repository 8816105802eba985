//! The RPC-rate table: every server measured round by round, interleaved, medians printed with
//! their ratio to the no-op server's; then each server's CPU, the durable server against etcd,
//! the durable rate with many leases held, and how its group commits went.

use e2e::{alloc, process::Process};
use proto::memory::v1::{FreeScopeRequest, memory_service_client::MemoryServiceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{
    Kind, ROUNDS, connect,
    cpu::{busy_between, cpu_per_call, cpu_ticks, process_ticks},
    etcd,
    load::alloc_free,
    measure, median,
};

/// The RPC-rate table: every server measured round by round, interleaved, medians printed;
/// `pids` are the in-memory and durable servers' processes.
pub(crate) async fn rates(in_memory: &Channel, on_disk: &Channel, pids: [u32; 2]) {
    let noop = Process::start("noop-memory", &[], &[], false);
    let etcd = etcd::Etcd::start();
    let mut servers = vec![
        ("no-op tonic server", connect(&noop.addr).await, Kind::Noop, noop.pid()),
        ("memory-service, in memory", in_memory.clone(), Kind::Memory, pids[0]),
        ("memory-service, --state-dir (fsync, group commit)", on_disk.clone(), Kind::Memory, pids[1]),
    ];
    if let Some(etcd) = &etcd {
        let name = "etcd lease grant+revoke (fsync)";
        servers.push((name, connect(&etcd.addr).await, Kind::Etcd, etcd.pid()));
        println!("etcd: {}", etcd::Etcd::version());
    }
    println!(
        "\n| server | Allocate+Free RPC/s, c=1 | ratio | c=32 | ratio | KeepAlive renewals/s, 1 stream | ratio | 32 streams | ratio |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // rates[server][measure] over rounds; busy[server]: the machine's CPU use during c=32 pairs
    let mut rates = vec![vec![Vec::new(); 4]; servers.len()];
    let mut busy = vec![Vec::new(); servers.len()];
    // cpu[server]: the server process's own CPU per call during c=32 pairs, in µs
    let mut cpu = vec![Vec::new(); servers.len()];
    for (_, channel, kind, _) in &servers {
        // Warm-up: connections, allocators, the stores' first pages, etcd's leader election.
        measure(channel, *kind, 0).await;
        measure(channel, *kind, 2).await;
    }
    for _ in 0..ROUNDS {
        for (i, (_, channel, kind, pid)) in servers.iter().enumerate() {
            for (m, rate) in rates[i].iter_mut().enumerate() {
                let (before, server_before, started) = (cpu_ticks(), process_ticks(*pid), Instant::now());
                let measured = measure(channel, *kind, m).await;
                rate.extend(measured);
                if m == 1 {
                    busy[i].push(busy_between(before, cpu_ticks()));
                    if let Some(r) = measured {
                        cpu[i].push(cpu_per_call(*pid, server_before, started, r));
                    }
                }
            }
        }
    }
    let base: Vec<f64> = rates[0].iter().map(|r| median(r.clone())).collect();
    for (i, (name, _, _, _)) in servers.iter().enumerate() {
        let cells: Vec<String> = rates[i]
            .iter()
            .zip(&base)
            .map(|(r, b)| {
                if r.is_empty() {
                    "— | —".to_owned()
                } else {
                    format!("{:.0} | {:.2}", median(r.clone()), median(r.clone()) / b)
                }
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let busy: Vec<String> = servers
        .iter()
        .zip(busy)
        .map(|((name, _, _, _), b)| format!("{name} {:.0}%", median(b) * 100.0))
        .collect();
    println!(
        "\nmachine CPU busy during Allocate+Free at c=32 (both cores, client included): {}",
        busy.join(", ")
    );
    let cpu: Vec<String> =
        servers.iter().zip(cpu).map(|((name, _, _, _), c)| format!("{name} {:.1} µs", median(c))).collect();
    println!(
        "\nserver process CPU per call during Allocate+Free at c=32 (all its threads): {}",
        cpu.join(", ")
    );
    let durable = median(rates[2][1].clone());
    if servers.len() > 3 {
        let etcd = median(rates[3][1].clone());
        println!(
            // Two decimals: the goal is 2×, and 1.96 must not print as "2.0".
            "\nmemory-service with --state-dir against etcd, Allocate+Free against grant+revoke at c=32: {:.2}× ({durable:.0} against {etcd:.0} RPC/s)",
            durable / etcd
        );
    }
    let live = with_live_leases(&servers[2].1).await;
    println!(
        "\n--state-dir with {LIVE_LEASES} other leases held, Allocate+Free at c=32: {live:.0} RPC/s, {:.2} of its rate \
         with none",
        live / durable
    );
    noop.kill();
}

/// Leases held during [`with_live_leases`].
const LIVE_LEASES: usize = 10_240;

/// Allocate+Free at concurrency 32 while [`LIVE_LEASES`] other leases are held, as a device's
/// runtimes would hold them: the durable store's leases table is then many pages, not one.
async fn with_live_leases(channel: &Channel) -> f64 {
    const SCOPE: &str = "bench-live-leases";
    let mut client = MemoryServiceClient::new(channel.clone());
    for _ in 0..LIVE_LEASES / 64 {
        let mut ask = alloc(&[("kv-cache", 4096); 64]);
        ask.scope_id = SCOPE.into();
        client.allocate(ask).await.expect("hold leases");
    }
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        rates.push(alloc_free(channel, 32).await);
    }
    client.free_scope(FreeScopeRequest { scope_id: SCOPE.into() }).await.expect("free the held leases");
    median(rates)
}

/// How the durable server's group commits went so far, from its metrics.
pub(crate) async fn commits(admin: &str) -> String {
    let (_, metrics) = e2e::http_get(admin, "/metrics").await;
    let value = |name: &str| e2e::sample(&metrics, name, &[]).unwrap_or(0.0);
    let count = value("memory_store_commit_seconds_count").max(1.0);
    format!(
        "{:.0} group commits, {:.1} records and {:.2} ms each on average",
        value("memory_store_commit_seconds_count"),
        value("memory_store_commit_records_sum") / count,
        value("memory_store_commit_seconds_sum") / count * 1e3
    )
}
