//! `simulate`: the offline simulator. Runs a workload (or a published point) on the device
//! runtime-service would run with the same flags (the same scheduler, KV pool and roofline) on
//! a virtual clock, with no network and no memory-service, and prints each request's timings,
//! the report and, for a point, the error against its published figures. Exits 0 when every
//! request completed, 1 when some failed, 64 on bad input.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use fidelity::{ReplayOptions, ReplayReport, WorkloadSpec, published, simulate};
use runtime_service::config::Overrides;

/// Bad flags, workload, configuration or published file (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Runs a workload on runtime-service's device offline, faster than real time, and reports
/// TTFT, TPOT, ITL, E2E and throughput as vLLM's benchmark_serving.py defines them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Workload file: TOML, or a JSONL trace when the name ends in .jsonl.
    workload: Option<PathBuf>,
    /// Run this published point (its workload and runtime flags; flags given here go over
    /// them) and compare with it.
    #[arg(long, conflicts_with = "workload")]
    point: Option<String>,
    /// Print each published point's runtime flags, or why it is skipped, and exit.
    #[arg(long)]
    list_points: bool,
    /// The published measurements.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/published.toml"))]
    published: PathBuf,
    /// runtime-service's configuration file (TOML), under the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bytes of the kv-cache pool (default: the pool memory-service gives the device by default).
    #[arg(long)]
    kv_pool_bytes: Option<u64>,
    /// Print one JSON line per request (index, lengths, sent_ms, ttft_ms, tpot_ms, e2e_ms).
    #[arg(long)]
    per_request: bool,
    /// runtime-service's own flags: the device, models, limits, scheduler...
    #[command(flatten)]
    runtime: Overrides,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => Err(format!("cannot start a runtime: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            report_error(&message);
            ExitCode::from(EXIT_USAGE)
        }
    }
}

#[allow(clippy::print_stderr)] // a command-line tool's error goes to stderr
fn report_error(message: &str) {
    eprintln!("simulate: {message}");
}

#[allow(clippy::print_stdout)] // the report is this binary's output
fn print(text: &str) {
    println!("{}", text.trim_end());
}

/// The host's own clock: the device runs on tokio's paused clock, whose time is simulated.
#[allow(clippy::disallowed_types)]
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

async fn run(args: Args) -> Result<ExitCode, String> {
    if args.list_points {
        print(&published::list(&published::read_mappings(&args.published)?));
        return Ok(ExitCode::SUCCESS);
    }
    let (workload, scenario, flags) = match (&args.workload, &args.point) {
        (Some(path), _) => (WorkloadSpec::read(path)?, None, Vec::new()),
        (None, Some(id)) => {
            let scenario = published::find_scenario(published::read_mappings(&args.published)?, id)?;
            let flags = scenario.runtime.flags();
            (scenario.workload.clone(), Some(scenario), flags)
        }
        (None, None) => return Err("a workload file, --point or --list-points is needed".into()),
    };
    let config = simulate::runtime_config(args.config.as_deref(), flags, Some(args.runtime))?;
    let pool = args.kv_pool_bytes.unwrap_or_else(|| simulate::default_kv_pool(&config));
    let wall = wall_clock();
    let run = simulate::replay_offline(config, pool, &workload, &ReplayOptions::default()).await?;
    let wall = wall.elapsed();
    if args.per_request {
        for record in &run.records {
            print(&record.json_line());
        }
    }
    let report = ReplayReport::of_run(&run);
    print(&report.table());
    print(&format!(
        "simulated {:.1} s of device time in {:.2} s of wall time ({} requests)",
        report.duration_s,
        wall.as_secs_f64(),
        run.records.len()
    ));
    if let Some(scenario) = scenario {
        print(&published::comparison_table(&published::compare(&scenario.point, &report)));
        for note in &scenario.notes {
            print(&format!("note: {note}"));
        }
    }
    Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
