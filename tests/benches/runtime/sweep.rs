//! The concurrency sweep against physics and published vLLM figures, and the keep-up check.

use std::time::Duration;

use serving::{arch::Arch, device::DeviceSpec};

use crate::load::{self, Scratch, ms, pct, request};

const MODEL: &str = "llama-3.1-8b";
const PROMPT: u32 = 1024;
const OUTPUT: u32 = 128;
const LEVELS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// Requests per client at each level (closed loop, like vLLM's benchmark with --max-concurrency).
const ROUNDS: usize = 4;

/// Only the swept model, preloaded: an A100-40GB's uniforms pool holds it and not the rest.
const MODELS: &str = "[[models]]\nkey = \"llama-3.1-8b\"\nengine = \"webllm\"\npreload = true\n";

/// Published vLLM measurements of Llama-3(.1)-8B in BF16 (docs/simulated-device.md, "Fidelity", cites each).
fn published(device: &str, concurrency: usize) -> &'static str {
    match (device, concurrency) {
        ("h100-sxm", 8) => "TPOT 7.56 ms @~10 (Lambda)",
        ("h100-sxm", 64) => "TPOT 9.94 ms @80 (Lambda)",
        ("a100-40gb", 1) => "TPOT 13.3 ms (75 tok/s)",
        ("a100-40gb", 8) => "~495 tok/s (6.6x of c=1)",
        _ => "",
    }
}

/// A decode step can never beat this: the weights and the batch's KV read once at the
/// datasheet bandwidth (no efficiency factor, no overhead).
fn bandwidth_bound(device: &DeviceSpec, arch: &Arch, concurrency: usize) -> Duration {
    let context = f64::from(PROMPT + OUTPUT / 2);
    let bytes = arch.weight_bytes() as f64 + concurrency as f64 * arch.kv_bytes_per_token() as f64 * context;
    Duration::from_secs_f64(bytes / device.bandwidth_bytes_per_s)
}

pub async fn run() {
    let scratch = Scratch::new("sweep");
    let models = scratch.file("models.toml", MODELS);
    let arch = Arch::preset(MODEL).expect("preset");
    for name in ["h100-sxm", "a100-40gb"] {
        let device = DeviceSpec::preset(name).expect("preset");
        let memory = load::memory(&["--device", name]);
        let (runtime, client) =
            load::runtime(&memory, &["--device", name, "--config", &models, "--prefix-caching", "off"]).await;
        load::level(&client, vec![request(MODEL, 16, 8, 0.0, 0)]).await; // first slabs, warm caches
        println!(
            "\n== sweep: {MODEL} on {name}, {PROMPT}-token prompts, {OUTPUT} output tokens, {ROUNDS} requests per client =="
        );
        println!(
            "{:>5} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}  published vLLM",
            "conc", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "bound", "p50/bnd"
        );
        for concurrency in LEVELS {
            let make = |w: usize, r: usize| request(MODEL, PROMPT, OUTPUT, 0.0, (w * ROUNDS + r) as u64);
            let (streams, wall) = load::closed_loop(&client, concurrency, ROUNDS, make).await;
            let tokens: u32 = streams.iter().map(|s| s.tokens).sum();
            let mut ttft: Vec<Duration> = streams.iter().map(|s| s.ttft).collect();
            let mut tpot: Vec<Duration> = streams.iter().filter_map(|s| s.tpot).collect();
            let bound = bandwidth_bound(&device, &arch, concurrency);
            let p50 = pct(&mut tpot, 0.5);
            println!(
                "{concurrency:>5} {:>9.0} {:>8.1}ms {:>8.1}ms {:>8.2}ms {:>8.2}ms {:>7.2}ms {:>7.2}  {}",
                f64::from(tokens) / wall.as_secs_f64(),
                ms(pct(&mut ttft, 0.5)),
                ms(pct(&mut ttft, 0.99)),
                ms(p50),
                ms(pct(&mut tpot, 0.99)),
                ms(bound),
                p50.as_secs_f64() / bound.as_secs_f64(),
                published(name, concurrency),
            );
            assert!(p50 > bound, "a decode step beat the memory bandwidth: {p50:?} <= {bound:?}");
        }
        runtime.stop();
        memory.stop();
    }
}
