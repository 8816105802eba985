//! KV memory: paged against up-front reservation, and two runtimes sharing one kv-cache pool
//! elastically against static halves.

use std::time::Duration;

use tokio::time::Instant;

use crate::load::{self, Scratch, request};

const MODEL: &str = "llama-3.1-8b";
const MODELS: &str = "[[models]]\nkey = \"llama-3.1-8b\"\nengine = \"webllm\"\npreload = true\n";

/// Paged KV against up-front reservation of prompt + max_tokens, on one 2 GiB kv-cache pool
/// (1,024 blocks of 16 tokens of Llama-3.1-8B): 64 requests of 256 prompt tokens asking for up to
/// 1,024 output tokens, sampled at temperature 1 so they stop at varied lengths, as chat does.
pub async fn paged() {
    let scratch = Scratch::new("paged");
    let models = scratch.file("models.toml", MODELS);
    println!(
        "\n== paged vs up-front KV: {MODEL} on h100-sxm, 2 GiB kv-cache, 64 requests, 256 + up to 1024 tokens =="
    );
    println!("{:<9} {:>14} {:>10} {:>8} {:>12}", "kv", "mean batch", "tok/s", "wall", "preemptions");
    let mut results = Vec::new();
    for reserve in ["paged", "upfront"] {
        let memory = load::memory(&["--pool", "kv-cache=2GiB,activations=4GiB,uniforms=20GiB"]);
        let args = ["--device", "h100-sxm", "--config", &models, "--kv-reserve", reserve];
        let (runtime, client) = load::runtime(&memory, &args).await;
        let requests = (0..64).map(|i| request(MODEL, 256, 1024, 1.0, 1000 + i)).collect();
        let (streams, wall) = load::level(&client, requests).await;
        let tokens: u32 = streams.iter().map(|s| s.tokens).sum();
        // Mean batch weighted by each request's tokens: the sequences the pool held at once.
        let weighted: f64 = streams.iter().map(|s| s.summary.mean_batch_size * f64::from(s.tokens)).sum();
        let preemptions: u32 = streams.iter().map(|s| s.summary.preemptions).sum();
        let batch = weighted / f64::from(tokens);
        let rate = f64::from(tokens) / wall.as_secs_f64();
        println!("{reserve:<9} {batch:>14.1} {rate:>10.0} {:>7.1}s {preemptions:>12}", wall.as_secs_f64());
        results.push((batch, rate));
        runtime.stop();
        memory.stop();
    }
    println!(
        "paged / up-front: {:.2}x the sequences at once, {:.2}x the throughput (same outputs: same seeds)",
        results[0].0 / results[1].0,
        results[0].1 / results[1].1
    );
}

/// Two runtimes on one kv-cache pool under shifting load (A busy and B light, then the reverse)
/// against the same two runtimes each on its own memory-service with half the pool.
pub async fn elastic() {
    let scratch = Scratch::new("elastic");
    let config = scratch.file("runtime.toml", &format!("kv_idle_release_ms = 100\n{MODELS}"));
    println!("\n== elastic sharing: two runtimes, {MODEL} on h100-sxm, 2 GiB of kv-cache in all ==");
    let mut walls = Vec::new();
    for shared in [true, false] {
        let pools = |kv: &str| format!("kv-cache={kv},activations=4GiB,uniforms=40GiB");
        let (one, two) = if shared {
            (load::memory(&["--pool", &pools("2GiB")]), None)
        } else {
            (load::memory(&["--pool", &pools("1GiB")]), Some(load::memory(&["--pool", &pools("1GiB")])))
        };
        let args = ["--device", "h100-sxm", "--config", &config];
        let (a, client_a) = load::runtime(&one, &[&args[..], &["--instance", "a"]].concat()).await;
        let (b, client_b) =
            load::runtime(two.as_ref().unwrap_or(&one), &[&args[..], &["--instance", "b"]].concat()).await;
        let started = Instant::now();
        let mut phases = Vec::new();
        for (busy, light) in [(&client_a, &client_b), (&client_b, &client_a)] {
            let heavy = (0..48).map(|i| request(MODEL, 256, 256, 0.0, i)).collect();
            let small = (0..4).map(|i| request(MODEL, 256, 256, 0.0, 100 + i)).collect();
            let phase = Instant::now();
            tokio::join!(load::level(busy, heavy), load::level(light, small));
            phases.push(phase.elapsed());
        }
        let wall = started.elapsed();
        let tokens = 2.0 * 52.0 * 256.0;
        println!(
            "{:<22} phase 1 {:>5.2} s, phase 2 {:>5.2} s, {:>6.0} tok/s",
            if shared { "one shared pool" } else { "static halves" },
            phases[0].as_secs_f64(),
            phases[1].as_secs_f64(),
            tokens / wall.as_secs_f64(),
        );
        walls.push(wall);
        a.stop();
        b.stop();
        one.stop();
        if let Some(two) = two {
            two.stop();
        }
    }
    let ratio = |w: &[Duration]| w[1].as_secs_f64() / w[0].as_secs_f64();
    println!("shared / static halves: {:.2}x the throughput", ratio(&walls));
}
