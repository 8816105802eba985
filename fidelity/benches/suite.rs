//! The fidelity suite: every published point that can be replayed, each against its own
//! memory-service and runtime-service configured as a user would for that GPU (vLLM's defaults
//! for the card), then the error of every figure and the MAPE by metric, by GPU and overall.
//!
//! `cargo bench -p fidelity --bench suite` runs every point on a virtual clock (in-process
//! services on tokio's paused clock: the same engine core, step times measured exactly, the
//! whole suite in well under a minute). `-- --live` runs the release binaries as child
//! processes in real time instead (about ten minutes; `--time-scale N` to run the device N×
//! faster), which adds the host's own costs. `-- --offline` runs every point on the offline
//! simulator (the same device with no network; a second or so for the whole suite). `-- ID ...` (or a prefix such as `lambda-`) runs
//! only those points; `-- --max-mape ttft=20,tpot=10` exits 1 when a metric passes its bound.

#[path = "../tests/virtual_stack/mod.rs"]
mod virtual_stack;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use e2e::process::Process;
use fidelity::{
    ReplayOptions, ReplayReport, Target,
    published::{self, Comparison, Mapping},
};

struct Args {
    filters: Vec<String>,
    live: bool,
    offline: bool,
    time_scale: f64,
    bounds: BTreeMap<String, f64>,
}

fn args() -> Args {
    let mut args =
        Args { filters: Vec::new(), live: false, offline: false, time_scale: 1.0, bounds: BTreeMap::new() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--live" => args.live = true,
            "--offline" => args.offline = true,
            "--time-scale" => {
                args.time_scale = it.next().and_then(|v| v.parse().ok()).expect("--time-scale N");
            }
            "--max-mape" => {
                for pair in it.next().expect("--max-mape metric=pct,...").split(',') {
                    let (metric, pct) = pair.split_once('=').expect("metric=pct");
                    args.bounds.insert(metric.to_owned(), pct.parse().expect("a percentage"));
                }
            }
            filter => args.filters.push(filter.to_owned()),
        }
    }
    args
}

#[allow(clippy::print_stdout)] // the report is the bench's output
fn print(text: &str) {
    println!("{}", text.trim_end());
}

/// Replays one point against fresh child processes in real time (or `time_scale` faster).
async fn replay_live(scenario: &published::Scenario, time_scale: f64) -> Result<Vec<Comparison>, String> {
    let device = scenario.runtime.device.as_str();
    let memory = Process::start("memory-service", &["--device", device], &[], false);
    let mut flags = scenario.runtime.flags();
    flags.extend(["--memory-addr".to_owned(), format!("http://{}", memory.addr)]);
    if time_scale != 1.0 {
        flags.extend(["--time-scale".to_owned(), time_scale.to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let runtime = Process::start("runtime-service", &flags, &[], false);
    let channel = runtime.serving("vllm.grpc.engine.VllmEngine").await;
    let target = Target::from_channels(vec![channel]).map_err(|e| e.to_string())?;
    let info = target.model_info().await.map_err(|e| e.to_string())?;
    let plan = scenario.workload.expand(info.vocab_size).map_err(|e| e.to_string())?;
    let options = ReplayOptions {
        time_scale,
        request_timeout: Some(Duration::from_secs(900)),
        ..ReplayOptions::default()
    };
    let run = target.replay(Arc::new(plan), &options).await.map_err(|e| e.to_string())?;
    let report = ReplayReport::of_run(&run);
    runtime.stop();
    memory.stop();
    if report.failed > 0 {
        return Err(format!("{} of {} requests failed", report.failed, report.failed + report.completed));
    }
    Ok(published::compare(&scenario.point, &report))
}

fn main() -> std::process::ExitCode {
    let args = args();
    // The virtual clock: the paused clock of a current-thread runtime, as the tests run.
    let runtime = if args.live {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
    };
    runtime.expect("a tokio runtime").block_on(suite(args))
}

/// The host's own clock: on the virtual clock, tokio's time is simulated.
#[allow(clippy::disallowed_types)]
fn wall_clock() -> std::time::Instant {
    std::time::Instant::now()
}

async fn suite(args: Args) -> std::process::ExitCode {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/published.toml")).expect("data");
    let points = published::parse(&text).expect("published.toml parses");
    let wanted =
        |id: &str| args.filters.is_empty() || args.filters.iter().any(|f| id.starts_with(f.as_str()));
    let mut all = Vec::new();
    let wall = wall_clock();
    for mapping in points.iter().map(published::map_point) {
        match mapping {
            Mapping::Replay(scenario) if wanted(&scenario.point.id) => {
                let started = tokio::time::Instant::now();
                let replayed = if args.live {
                    replay_live(&scenario, args.time_scale).await
                } else {
                    let report = if args.offline {
                        let config = virtual_stack::runtime_config(&scenario);
                        ReplayReport::of_run(&virtual_stack::replay_offline(config, &scenario.workload).await)
                    } else {
                        virtual_stack::replay(&scenario).await
                    };
                    if report.failed > 0 {
                        Err(format!("{} requests failed: {:?}", report.failed, report.failures))
                    } else {
                        Ok(published::compare(&scenario.point, &report))
                    }
                };
                match replayed {
                    Ok(comparisons) => {
                        print(&published::comparison_table(&comparisons));
                        if args.live {
                            print(&format!("  ({:.1} s)", started.elapsed().as_secs_f64()));
                        }
                        all.extend(comparisons);
                    }
                    Err(why) => print(&format!("{}: not measured: {why}", scenario.point.id)),
                }
            }
            Mapping::Replay(_) => {}
            Mapping::Skip { id, reason, .. } if wanted(&id) => print(&format!("{id}: skipped: {reason}")),
            Mapping::Skip { .. } => {}
        }
    }
    print(&format!("(all points in {:.1} s of wall time)", wall.elapsed().as_secs_f64()));
    let mape = published::mape(&all);
    print("\nMAPE (mean absolute percentage error), by metric, by GPU, overall:");
    for row in mape.by_metric.iter().chain(&mape.by_gpu).chain([&mape.overall]) {
        print(&format!("  {:<28} {:>6.1}%  over {} figures", row.key, row.mape_pct, row.n));
    }
    let mut failed = false;
    for (metric, bound) in &args.bounds {
        let rows = mape.by_metric.iter().filter(|r| r.key.starts_with(metric.as_str()));
        for row in rows {
            if row.mape_pct > *bound {
                print(&format!("FAIL: {} MAPE {:.1}% above its bound {bound}%", row.key, row.mape_pct));
                failed = true;
            }
        }
    }
    if failed { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS }
}
