//! Durable memory-service against etcd with each server on a core of its own and the client on
//! the other one. In the shared-core table the client's CPU (about 25 µs per call, the same for
//! both servers) competes with the server's, which pulls every rate ratio towards 1; load that
//! comes from other machines, as it does in production, does not. Each server is started afresh
//! inside a one-core affinity mask, so it sizes itself as it would in a one-core cpuset: tokio
//! starts one worker, Go sets GOMAXPROCS to 1.

use std::process::{Command, Stdio};

use e2e::{certs::TempDir, process::Process};
use tokio::time::Instant;

use super::{
    Kind, QUIET, ROUNDS, connect,
    cpu::{cpu_per_call, process_ticks},
    etcd, measure, median,
};

/// The core the servers run on; the client runs on core 0.
const SERVER_CPU: &str = "1";

/// `taskset` with `args`; whether it ran and succeeded.
fn taskset(args: &[&str]) -> bool {
    Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Prints the durable memory-service's and etcd's Allocate+Free (grant+revoke) rates at
/// concurrency 32, each server alone on core 1 and this process on core 0, interleaved round by
/// round; skipped (with the reason) on one core or without `taskset` or etcd.
pub async fn durable_against_etcd() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 || !taskset(&["-V"]) {
        println!("\neach server on a core of its own: skipped (needs 2 cores and `taskset`, util-linux)");
        return;
    }
    let me = std::process::id().to_string();
    // A child inherits the affinity of the thread that spawns it: this thread (the main thread,
    // whose id is the process id) moves to the servers' core while it starts them.
    if !taskset(&["-c", "-p", SERVER_CPU, &me]) {
        println!("\neach server on a core of its own: skipped (cores 0 and 1 are not both allowed here)");
        return;
    }
    let dir = TempDir::new("bench-own-core");
    let state = dir.path().to_str().expect("utf-8").to_owned();
    let durable =
        Process::start("memory-service", &["--pool", "kv-cache=1TiB", "--state-dir", &state], &QUIET, false);
    let etcd = etcd::Etcd::start();
    // Then every thread of this process, the client, moves to the other core.
    assert!(taskset(&["-a", "-c", "-p", "0", &me]), "pin the client to core 0");
    if let Some(etcd) = &etcd {
        let servers = [
            (connect(&durable.addr).await, Kind::Memory, durable.pid()),
            (connect(&etcd.addr).await, Kind::Etcd, etcd.pid()),
        ];
        // Measure 1 of the shared-core table: Allocate+Free (grant+revoke) at c=32.
        const C32: usize = 1;
        for (channel, kind, _) in &servers {
            measure(channel, *kind, C32).await; // warm-up
        }
        let (mut rates, mut cpu) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for _ in 0..ROUNDS {
            for (i, (channel, kind, pid)) in servers.iter().enumerate() {
                let (ticks, started) = (process_ticks(*pid), Instant::now());
                let rate = measure(channel, *kind, C32).await.expect("every server has measure 1");
                cpu[i].push(cpu_per_call(*pid, ticks, started, rate));
                rates[i].push(rate);
            }
        }
        let [durable_rate, etcd_rate] = rates.map(median);
        let [durable_cpu, etcd_cpu] = cpu.map(median);
        println!(
            "\neach server alone on core {SERVER_CPU}, the client on core 0, at c=32: memory-service with --state-dir \
             {durable_rate:.0} RPC/s ({durable_cpu:.1} µs of CPU per call), etcd {etcd_rate:.0} RPC/s \
             ({etcd_cpu:.1} µs): {:.2}×",
            durable_rate / etcd_rate
        );
    }
    assert!(taskset(&["-a", "-c", "-p", &format!("0-{}", cpus - 1), &me]), "unpin the client");
    durable.stop();
}
