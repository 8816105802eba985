//! runtime-service benchmarks. Each runs the production binaries (memory-service and
//! runtime-service) as their own processes and drives them from this one, as real load would, and
//! prints its numbers beside a baseline measured in the same run or a bound from physics:
//!
//! 1. `sweep`: concurrency 1 to 64 of `llama-3.1-8b` on `h100-sxm` and `a100-40gb`, 1024-token
//!    prompts and 128 output tokens: throughput, TTFT and TPOT p50/p99, beside the bandwidth bound
//!    of each point and published vLLM measurements.
//! 2. `overlap`: overlapped against sequential scheduling at batch 1 and 32, against the ideal
//!    (cpu + gpu) / max(cpu, gpu).
//! 3. `paged`: paged KV against up-front reservation on one kv-cache pool: sequences held at once
//!    and throughput on the same workload.
//! 4. `elastic`: two runtimes on one memory-service under shifting load against static halves.
//!
//! How many streams one runtime keeps up with is the `stream` bench (`benches/stream`).
//!
//! Run: `cargo bench -p e2e --bench runtime` (all), or name some:
//! `cargo bench -p e2e --bench runtime -- sweep overlap`.
#![allow(clippy::print_stdout)] // a benchmark's report is its output

mod load;
mod overlap;
mod sharing;
mod sweep;

use tokio::time::Instant;

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let started = Instant::now();
    runtime.block_on(async {
        if wanted("sweep") {
            sweep::run().await;
        }
        if wanted("overlap") {
            overlap::run().await;
        }
        if wanted("paged") {
            sharing::paged().await;
        }
        if wanted("elastic") {
            sharing::elastic().await;
        }
    });
    println!("\nall done in {:.0} s", started.elapsed().as_secs_f64());
}
