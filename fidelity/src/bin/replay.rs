//! `replay`: sends a workload (or a published point's) to a runtime-service and prints what it
//! measured; exits 0 when every request completed, 1 when some failed, 64 on bad input.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use fidelity::{ReplayOptions, ReplayReport, Target, WorkloadSpec, published};

/// Bad flags, workload or published file (EX_USAGE, as the services exit on bad configuration).
const EXIT_USAGE: u8 = 64;
/// The target could not be reached (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Replays a workload against runtime-service's engine dialect (vllm.grpc.engine.VllmEngine) and
/// reports TTFT, TPOT, ITL, E2E and throughput as vLLM's benchmark_serving.py defines them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// runtime-service's gRPC address.
    #[arg(long, env = "REPLAY_TARGET", default_value = "http://127.0.0.1:50052")]
    target: String,
    /// Workload file: TOML, or a JSONL trace when the name ends in .jsonl.
    workload: Option<PathBuf>,
    /// Replay this published point instead of a workload file, and compare with it (start the
    /// runtime with the flags --list-points prints for it).
    #[arg(long, conflicts_with = "workload")]
    point: Option<String>,
    /// Print each published point's runtime flags, or why it is skipped, and exit.
    #[arg(long)]
    list_points: bool,
    /// The published measurements.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/published.toml"))]
    published: PathBuf,
    /// How many times faster than real time the runtime's device runs (its --time-scale):
    /// arrivals are sent that much sooner, and measured times are scaled back.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// HTTP/2 connections to spread requests over (each carries up to the server's stream limit).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds (real time) after which a request without its GenerateComplete counts as failed.
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// Output: a table, or one line of key=value pairs.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Kv,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err((code, message)) => {
            report_error(&message);
            ExitCode::from(code)
        }
    }
}

#[allow(clippy::print_stderr)] // a command-line tool's error goes to stderr
fn report_error(message: &str) {
    eprintln!("replay: {message}");
}

#[allow(clippy::print_stdout)] // the report is this binary's output
fn print(text: &str) {
    println!("{}", text.trim_end());
}

async fn run(args: Args) -> Result<ExitCode, (u8, String)> {
    let usage = |message: String| (EXIT_USAGE, message);
    if args.list_points {
        print(&published::list(&published::read_mappings(&args.published).map_err(usage)?));
        return Ok(ExitCode::SUCCESS);
    }
    let (workload, scenario) = match (&args.workload, &args.point) {
        (Some(path), _) => (WorkloadSpec::read(path).map_err(usage)?, None),
        (None, Some(id)) => {
            let mappings = published::read_mappings(&args.published).map_err(usage)?;
            let scenario = published::find_scenario(mappings, id).map_err(usage)?;
            (scenario.workload.clone(), Some(scenario))
        }
        (None, None) => return Err(usage("a workload file, --point or --list-points is needed".into())),
    };
    let unavailable = |e: fidelity::DriveError| (EXIT_UNAVAILABLE, e.to_string());
    let target = Target::connect(&args.target, args.connections).await.map_err(unavailable)?;
    let info = target.model_info().await.map_err(unavailable)?;
    if let Some(scenario) = &scenario
        && info.served_model_name != scenario.runtime.engine_model
    {
        // The point's figures are for its model: a different one makes every error meaningless.
        let (served, wanted) = (&info.served_model_name, &scenario.runtime.engine_model);
        report_error(&format!("warning: the target serves {served:?}, the point is for {wanted:?}"));
    }
    let plan = workload.expand(info.vocab_size).map_err(|e| usage(e.to_string()))?;
    let options = ReplayOptions {
        time_scale: args.time_scale,
        request_timeout: Some(Duration::from_secs(args.request_timeout_s)),
        ..ReplayOptions::default()
    };
    let run = target.replay(Arc::new(plan), &options).await.map_err(|e| usage(e.to_string()))?;
    let report = ReplayReport::of_run(&run);
    match args.format {
        Format::Table => print(&report.table()),
        Format::Kv => print(&report.key_values()),
    }
    if let Some(scenario) = scenario {
        let comparisons = published::compare(&scenario.point, &report);
        print(&published::comparison_table(&comparisons));
        for note in &scenario.notes {
            print(&format!("note: {note}"));
        }
    }
    Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
