//! CPU use from `/proc`: the whole machine's busy share, and one process's own ticks (all its
//! threads), which the shared machine's noise moves less than rates. Zeros where there is no
//! `/proc`.

use tokio::time::Instant;

/// (busy, total) CPU ticks of the whole machine so far, from `/proc/stat` (zeros elsewhere).
pub(crate) fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait are not busy
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Microseconds per clock tick of `/proc` (USER_HZ is 100 on Linux).
const TICK_US: f64 = 10_000.0;

/// CPU ticks (user and system, all threads) process `pid` used so far, from `/proc/<pid>/stat`
/// (zero elsewhere).
pub(crate) fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime: the 14th and 15th fields of the line, the 12th and 13th after the name.
    field(11) + field(12)
}

pub(crate) fn busy_between(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}

/// Microseconds of CPU process `pid` spent per call since it had used `ticks_before` (from
/// [`process_ticks`]) at `started`, over calls made at `rate` per second.
pub(crate) fn cpu_per_call(pid: u32, ticks_before: u64, started: Instant, rate: f64) -> f64 {
    let calls = rate * started.elapsed().as_secs_f64();
    process_ticks(pid).saturating_sub(ticks_before) as f64 * TICK_US / calls
}
