//! Overlapped against sequential scheduling, against the ideal (cpu + gpu) / max(cpu, gpu). The
//! last column is the time the host fell behind the simulated clock, over the run's wall time
//! (overlapped / sequential): what the serving path, not the simulation, cost.

use std::time::Duration;

use runtime_service::roofline::{Roofline, Work};
use serving::{arch::Arch, device::DeviceSpec};

use crate::load::{self, Scratch, counter, ms, pct, request};

/// (device, model): a datacenter GPU where the GPU dominates, and the browser-class device the
/// seed's engines target, where the CPU stage is as heavy as the GPU's.
const CASES: [(&str, &str, &str); 2] =
    [("h100-sxm", "llama-3.1-8b", "webllm"), ("webgpu-laptop", "distilgpt2", "transformers-js")];

pub async fn run() {
    let scratch = Scratch::new("overlap");
    println!("\n== overlap: overlapped vs sequential scheduling (TPOT p50, 64-token prompts, 128 tokens) ==");
    println!(
        "{:<28} {:>5} {:>9} {:>9} {:>11} {:>8} {:>8} {:>7} {:>11}",
        "device / model", "batch", "cpu", "gpu", "sequential", "overlap", "speedup", "ideal", "host lag"
    );
    for (device_name, model, engine) in CASES {
        let models = scratch.file(
            &format!("{model}.toml"),
            &format!("[[models]]\nkey = \"{model}\"\nengine = \"{engine}\"\npreload = true\n"),
        );
        let memory = load::memory(&["--device", device_name]);
        let (mut tpot, mut lags) = (Vec::new(), Vec::new());
        for scheduler in ["overlapped", "sequential"] {
            let args =
                ["--device", device_name, "--config", &models, "--scheduler", scheduler, "--jitter", "0"];
            let (runtime, client) = load::runtime(&memory, &args).await;
            load::level(&client, vec![request(model, 16, 8, 0.0, 0)]).await;
            for batch in [1usize, 32] {
                let lag_before = counter(&runtime, "runtime_device_lag_seconds_total", &[]);
                let requests = (0..batch).map(|i| request(model, 64, 128, 0.0, i as u64)).collect();
                let (streams, wall) = load::level(&client, requests).await;
                let mut gaps: Vec<Duration> = streams.iter().filter_map(|s| s.tpot).collect();
                tpot.push(pct(&mut gaps, 0.5));
                let lag = counter(&runtime, "runtime_device_lag_seconds_total", &[]) - lag_before;
                lags.push(lag / wall.as_secs_f64());
            }
            runtime.stop();
        }
        memory.stop();
        let device = DeviceSpec::preset(device_name).expect("preset");
        let roofline = Roofline::new(&device, &Arch::preset(model).expect("preset"));
        for (i, batch) in [1u32, 32].into_iter().enumerate() {
            let step = roofline.step((0..batch).map(|_| Work { tokens: 1, context: 128 }));
            let ideal = (step.cpu + step.gpu).as_secs_f64() / step.cpu.max(step.gpu).as_secs_f64();
            let (overlapped, sequential) = (tpot[i], tpot[2 + i]);
            println!(
                "{:<28} {batch:>5} {:>7.2}ms {:>7.2}ms {:>9.2}ms {:>6.2}ms {:>7.2}x {:>6.2}x {:>4.1}%/{:>4.1}%",
                format!("{device_name} / {model}"),
                ms(step.cpu),
                ms(step.gpu),
                ms(sequential),
                ms(overlapped),
                sequential.as_secs_f64() / overlapped.as_secs_f64(),
                ideal,
                100.0 * lags[i],
                100.0 * lags[2 + i],
            );
        }
    }
}
