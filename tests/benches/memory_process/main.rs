//! memory-service at the gRPC ceiling, as real load sees it: each server is its own process
//! (release binaries), driven from this process over loopback. In one run, interleaved round by
//! round so machine noise hits all alike:
//! - Allocate+Free RPC rate of the production binary in memory and with `--state-dir` (fsync on,
//!   group commit), against the no-op tonic server (`noop-memory`: same stack, handlers that do
//!   nothing, replies of the same shape), at concurrency 1 and 32;
//! - KeepAlive renewals (one message of 16 leases per round trip, on 1 and 32 streams), against
//!   the no-op server's echo;
//! - etcd lease grant+revoke with fsync, when `etcd` is installed (`apt-get install etcd-server`);
//! - each server process's own CPU per call at concurrency 32 (from `/proc`, all its threads), which
//!   the shared machine's noise moves less than rates;
//! - the durable rate again while 10,240 other leases are held (a store of many pages);
//! - mass expiry: 100,000 leases due at once, reclaimed how long after their deadline, in memory
//!   and with `--state-dir`;
//! - the durable rate against etcd's again with each server alone on one core and this client on
//!   the other (`own_core`), so that the client's CPU does not count against the server's.
//!
//! Run: `cargo bench -p e2e --bench memory_process [-- rates] [own-core] [expiry]` (all by
//! default).

#![allow(clippy::print_stdout)]

mod cpu;
mod etcd;
mod expiry;
mod load;
mod own_core;
mod rates;

use std::time::Duration;

use e2e::{certs::TempDir, process::Process};
use tonic::transport::Channel;

use self::{
    load::{alloc_free, keep_alive},
    rates::{commits, rates},
};

pub(crate) const ROUNDS: usize = 5;
pub(crate) const ROUND: Duration = Duration::from_millis(1500);
/// The servers' log filter: their addresses (which `Process` reads) and warnings.
pub(crate) const QUIET: [(&str, &str); 1] = [("RUST_LOG", "warn,memory_service=info,serving=info")];

pub(crate) async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let sections: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let memory = Process::start("memory-service", &["--pool", "kv-cache=1TiB"], &QUIET, false);
        let dir = TempDir::new("bench-state");
        let state = dir.path().to_str().expect("utf-8").to_owned();
        let durable = Process::start("memory-service", &["--pool", "kv-cache=1TiB", "--state-dir", &state], &QUIET, true);
        let (in_memory, on_disk) = (connect(&memory.addr).await, connect(&durable.addr).await);
        println!("memory-service as its own process, driven from this one over loopback (2 cores shared)");
        if wants("rates") {
            rates(&in_memory, &on_disk, [memory.pid(), durable.pid()]).await;
            println!("\n--state-dir: {}", commits(durable.admin.as_deref().expect("admin port")).await);
        }
        if wants("own-core") {
            own_core::durable_against_etcd().await;
        }
        if wants("expiry") {
            println!("\n| mass expiry: {} leases due at once | deadline spread | all reclaimed after the last deadline | next Allocate took |", expiry::LEASES);
            println!("| --- | ---: | ---: | ---: |");
            for (name, channel) in [("memory-service, in memory", &in_memory), ("memory-service, --state-dir", &on_disk)] {
                let e = expiry::mass_expiry(channel, "kv-cache").await;
                println!(
                    "| {name} | {:.1} ms | {:.1} ms | {:.1} ms |",
                    e.deadline_spread.as_secs_f64() * 1e3,
                    e.reclaimed_after.as_secs_f64() * 1e3,
                    e.next_grant.as_secs_f64() * 1e3
                );
            }
        }
        memory.stop();
        durable.stop();
    });
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Noop,
    Memory,
    Etcd,
}

/// Measure `m` (Allocate+Free c=1, c=32, KeepAlive 1 stream, 32 streams) of one server; `None`
/// where the server has no such call (etcd's keep-alive renews one lease per message).
pub(crate) async fn measure(channel: &Channel, kind: Kind, m: usize) -> Option<f64> {
    let concurrency = if m.is_multiple_of(2) { 1 } else { 32 };
    match (kind, m < 2) {
        (Kind::Etcd, true) => Some(etcd::grant_revoke_rate(channel, concurrency, ROUND).await),
        (Kind::Etcd, false) => None,
        (_, true) => Some(alloc_free(channel, concurrency).await),
        (_, false) => Some(keep_alive(channel, concurrency, kind == Kind::Memory).await),
    }
}
