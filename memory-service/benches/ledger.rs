//! In-process cost of an Allocate+Free pair on the ledger, at 10k and 1M live leases, and the
//! memory each live lease costs. Prints ratios against the 10k run, measured in the same process:
//! absolute times drift on shared machines, ratios much less.
//!
//! Run: `cargo bench -p memory-service --bench ledger`

use std::{hint::black_box, sync::Arc, time::Duration};

use memory_service::ledger::{AllocRequest, AllocateOutcome, Ledger};
use tokio::time::Instant;

const ROUNDS: usize = 7;
const PAIRS_PER_ROUND: u32 = 200_000;

fn request(holder: &Arc<str>) -> AllocRequest {
    AllocRequest {
        items: vec![("kv-cache".to_owned(), 4096)],
        holder: holder.clone(),
        scope: None,
        ttl: Duration::from_secs(30),
        request_id: None,
    }
}

/// A ledger holding `live` leases, each with its own deadline.
fn ledger_with(live: usize) -> Ledger {
    let mut ledger = Ledger::new(1024);
    ledger.create_pool("kv-cache", memory_service::ledger::MAX_CAPACITY).expect("pool");
    let holder: Arc<str> = Arc::from("bench");
    let t0 = Instant::now();
    for i in 0..live {
        let mut req = request(&holder);
        req.ttl = Duration::from_millis(60_000 + i as u64);
        match ledger.allocate(req, t0, false) {
            Ok(AllocateOutcome::Granted(_)) => {}
            other => panic!("prefill failed: {other:?}"),
        }
    }
    ledger
}

/// Nanoseconds per allocate+free pair over one round.
fn pair_cost(ledger: &mut Ledger) -> f64 {
    let holder: Arc<str> = Arc::from("bench");
    let now = Instant::now();
    let started = Instant::now();
    for _ in 0..PAIRS_PER_ROUND {
        let Ok(AllocateOutcome::Granted(grant)) = ledger.allocate(request(&holder), now, false) else {
            panic!("allocation refused");
        };
        let freed = ledger.free(grant.leases[0].id, now);
        black_box(freed.is_ok());
    }
    (Instant::now() - started).as_nanos() as f64 / f64::from(PAIRS_PER_ROUND)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Resident set size of this process, from /proc (Linux only; `None` elsewhere).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[allow(clippy::print_stdout)]
fn main() {
    println!("ledger: allocate+free pair, median of {ROUNDS} interleaved rounds x {PAIRS_PER_ROUND} pairs");
    let mut small = ledger_with(10_000);
    let rss_before = rss_bytes();
    let mut big = ledger_with(1_000_000);
    let rss_after = rss_bytes();

    // Rounds alternate between the two ledgers so that noise from other tenants of the machine
    // hits both alike; the ratio is taken per round, then the median.
    let (mut small_ns, mut big_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let s = pair_cost(&mut small);
        let b = pair_cost(&mut big);
        small_ns.push(s);
        big_ns.push(b);
        ratios.push(b / s);
    }
    big.check_invariants().expect("books balance");
    let (base, at_1m, ratio) = (median(small_ns), median(big_ns), median(ratios));

    let log_growth = (1_000_000f64).ln() / (10_000f64).ln();
    println!("| live leases | ns per pair | ratio to 10k |");
    println!("| ---: | ---: | ---: |");
    println!("| 10,000 | {base:.0} | 1.00 |");
    println!("| 1,000,000 | {at_1m:.0} | {ratio:.2} |");
    println!("logarithmic growth would be {log_growth:.2}x (ln 1M / ln 10k); linear would be 100x");
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "memory per live lease: {:.0} bytes (RSS growth over 1M leases)",
            (after.saturating_sub(before)) as f64 / 1e6
        );
    }
}
