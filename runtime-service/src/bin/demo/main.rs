//! The one-command demo: starts memory-service and runtime-service on loopback (the binaries built
//! next to this one) and shows the simulated device at work: a generation streamed to the
//! terminal, a concurrency sweep as a live table, overlapped against sequential scheduling, and a
//! small kv-cache pool where sequences are preempted and still all complete.
//!
//! Run it with `scripts/demo` (which builds everything first).
#![allow(clippy::print_stdout)]

mod service;

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use proto::{
    memory::v1::{ListPoolsRequest, memory_service_client::MemoryServiceClient},
    runtime::v1::{
        GenerateRequest, ListModelsRequest, Summary, generate_response::Item,
        runtime_service_client::RuntimeServiceClient,
    },
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use self::service::Service;

/// Shows a simulated GPU serving models: streaming, continuous batching, overlap, preemption.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Model key (see ListModels).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// The prompt of the streamed generation.
    #[arg(long, default_value = "Explain how an inference server overlaps CPU and GPU work.")]
    prompt: String,
    /// Tokens to generate in the streamed generation.
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where the services' logs go.
    #[arg(long, default_value = "target/demo-logs")]
    logs: PathBuf,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn secs(d: Option<prost_types::Duration>) -> f64 {
    d.and_then(|d| Duration::try_from(d).ok()).map_or(0.0, |d| d.as_secs_f64())
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A prompt of `n` of the model's own words (one token each), different for each `seed` from its
/// first word: the sweeps measure batching, not the prefix cache (identical prompts would all
/// hit it after the first).
fn words(n: u32, seed: u64) -> String {
    let nouns = runtime_service::mock_lm::text::NOUN;
    let mut rng = runtime_service::rng::SplitMix64::new(seed);
    (0..n).map(|_| nouns[(rng.next_u64() % nouns.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
}

/// kv-cache used and capacity in memory-service.
async fn kv_pool(memory: &mut MemoryServiceClient<Channel>) -> (u64, u64) {
    let pools =
        memory.list_pools(ListPoolsRequest {}).await.map(|r| r.into_inner().pools).unwrap_or_default();
    pools.iter().find(|p| p.name == "kv-cache").map_or((0, 1), |p| (p.used_bytes, p.capacity_bytes.max(1)))
}

/// One stream measured at the client; `echo` prints its tokens as they arrive.
async fn stream(
    mut client: RuntimeServiceClient<Channel>,
    request: GenerateRequest,
    seen: Arc<AtomicU32>,
    echo: bool,
) -> Result<(Duration, Summary), Error> {
    let started = Instant::now();
    let mut responses = client.generate(request).await?.into_inner();
    let mut first = None;
    let mut out = std::io::stdout();
    while let Some(item) = responses.next().await {
        match item?.item {
            Some(Item::Token(token)) => {
                first.get_or_insert_with(|| started.elapsed());
                seen.fetch_add(1, Ordering::Relaxed);
                if echo {
                    print!("{}", token.text);
                    out.flush()?;
                }
            }
            Some(Item::Summary(summary)) => return Ok((first.unwrap_or_default(), summary)),
            None => {}
        }
    }
    Err("the stream ended without a summary".into())
}

/// What a batch of concurrent streams did.
struct Level {
    wall: Duration,
    tokens: u32,
    ttft: Vec<Duration>,
    summaries: Vec<Summary>,
    peak_kv: f64,
}

impl Level {
    fn median(values: &mut [f64]) -> f64 {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    }

    fn tpot_ms(&self) -> f64 {
        Self::median(
            &mut self.summaries.iter().map(|s| secs(s.time_per_output_token) * 1e3).collect::<Vec<_>>(),
        )
    }

    fn ttft_ms(&self) -> f64 {
        Self::median(&mut self.ttft.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>())
    }

    fn mean_batch(&self) -> f64 {
        Self::median(&mut self.summaries.iter().map(|s| s.mean_batch_size).collect::<Vec<_>>())
    }
}

/// Runs `requests` at once, showing live progress (tokens so far, kv-cache use) while they run.
async fn level(
    client: &RuntimeServiceClient<Channel>,
    memory: &mut MemoryServiceClient<Channel>,
    label: &str,
    requests: Vec<GenerateRequest>,
) -> Result<Level, Error> {
    let total: u32 = requests.iter().map(|r| r.max_tokens).sum();
    let seen = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let mut tasks: Vec<_> =
        requests.into_iter().map(|r| tokio::spawn(stream(client.clone(), r, seen.clone(), false))).collect();
    let mut peak_kv: f64 = 0.0;
    let mut out = std::io::stdout();
    // A live line on a terminal; nothing but the final row when the output is a file or a pipe.
    let live = out.is_terminal();
    while !tasks.iter().all(|t| t.is_finished()) {
        let (used, capacity) = kv_pool(memory).await;
        let kv = used as f64 / capacity as f64;
        peak_kv = peak_kv.max(kv);
        if !live {
            tokio::time::sleep(Duration::from_millis(150)).await;
            continue;
        }
        print!(
            "\r\x1b[2K  {label:<14} {:>6}/{total} tokens  kv-cache {:>5.1}% in use  {:>4.1} s",
            seen.load(Ordering::Relaxed),
            kv * 100.0,
            started.elapsed().as_secs_f64()
        );
        out.flush()?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    if live {
        print!("\r\x1b[2K");
    }
    let (mut ttft, mut summaries) = (Vec::new(), Vec::new());
    for task in tasks.drain(..) {
        let (first, summary) = task.await??;
        ttft.push(first);
        summaries.push(summary);
    }
    Ok(Level { wall: started.elapsed(), tokens: seen.load(Ordering::Relaxed), ttft, summaries, peak_kv })
}

fn request(model: &str, prompt_tokens: u32, max_tokens: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: words(prompt_tokens, seed),
        max_tokens,
        seed,
        ..GenerateRequest::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let here = std::env::current_exe()?.parent().ok_or("no binary directory")?.to_path_buf();
    let (memory_bin, runtime_bin) = (here.join("memory-service"), here.join("runtime-service"));
    std::fs::create_dir_all(&args.logs)?;
    let logs = args.logs.as_path();
    let model = args.model.as_str();

    println!("▶ starting memory-service and runtime-service on 127.0.0.1 (logs in {})", logs.display());
    let memory_service = Service::start("memory-service", &memory_bin, &[], logs)?;
    let memory_url = format!("http://{}", memory_service.addr);
    let runtime_service =
        Service::start("runtime-service", &runtime_bin, &["--memory-addr", &memory_url], logs)?;
    let mut memory = MemoryServiceClient::new(memory_service.channel().await?);
    let mut runtime = runtime_service.runtime_ready().await?;
    println!(
        "  memory-service  {}   runtime-service {}   (SERVING)",
        memory_service.addr, runtime_service.addr
    );

    let listed = runtime.list_models(ListModelsRequest {}).await?.into_inner();
    if let Some(device) = &listed.device {
        println!(
            "\n▶ device {}: {} memory, {:.2} TB/s, {:.0} TFLOP/s; {} scheduler, batches of up to {} sequences / {} tokens",
            device.name,
            gib(device.memory_bytes),
            device.bandwidth_bytes_per_second / 1e12,
            device.flops_per_second / 1e12,
            device.scheduler,
            device.max_batch_size,
            device.max_batched_tokens
        );
    }
    println!(
        "  {:<14} {:>9} {:>10} {:>12} {:>13} {:>7}",
        "model", "weights", "KV/token", "decode step", "(floor)", "loaded"
    );
    for m in &listed.models {
        println!(
            "  {:<14} {:>9} {:>7} KiB {:>9.2} ms {:>10.2} ms {:>7}",
            m.key,
            gib(m.uniform_bytes),
            m.kv_cache_bytes_per_token >> 10,
            secs(m.gpu_per_token) * 1e3,
            secs(m.decode_floor) * 1e3,
            m.loaded
        );
    }

    println!("\n▶ streaming one generation from {model}: {:?}\n", args.prompt);
    let one = GenerateRequest {
        model: model.into(),
        prompt: args.prompt.clone(),
        max_tokens: args.max_tokens,
        seed: args.seed,
        temperature: 0.7,
        top_p: 0.95,
        ..GenerateRequest::default()
    };
    let (ttft, summary) = stream(runtime.clone(), one, Arc::default(), true).await?;
    println!(
        "\n  TTFT {:.1} ms, TPOT {:.2} ms ({:.0} tokens/s), {} KV blocks at peak",
        ttft.as_secs_f64() * 1e3,
        secs(summary.time_per_output_token) * 1e3,
        summary.tokens_per_second,
        summary.peak_kv_blocks
    );

    println!(
        "\n▶ continuous batching: concurrent streams share each device step (512-token prompts, 64 tokens out)"
    );
    println!(
        "  {:>5} {:>9} {:>10} {:>10} {:>11} {:>9}",
        "conc", "tok/s", "TTFT p50", "TPOT p50", "mean batch", "peak KV"
    );
    for concurrency in [1u64, 4, 16, 64] {
        // Seeds unique across levels: no prompt repeats an earlier level's (a prefix-cache hit).
        let requests = (0..concurrency).map(|i| request(model, 512, 64, concurrency * 1_000 + i)).collect();
        let done = level(&runtime, &mut memory, &format!("{concurrency} streams"), requests).await?;
        println!(
            "  {concurrency:>5} {:>9.0} {:>8.1}ms {:>8.2}ms {:>11.1} {:>8.1}%",
            f64::from(done.tokens) / done.wall.as_secs_f64(),
            done.ttft_ms(),
            done.tpot_ms(),
            done.mean_batch(),
            done.peak_kv * 100.0
        );
    }
    println!(
        "  per-stream TPOT rises a little, aggregate throughput a lot: the weights are read once per step"
    );

    println!("\n▶ overlapped vs sequential scheduling (a second device, --scheduler sequential)");
    let memory_two = Service::start("memory-service-2", &memory_bin, &[], logs)?;
    let url_two = format!("http://{}", memory_two.addr);
    let args_two =
        ["--memory-addr", url_two.as_str(), "--scheduler", "sequential", "--instance", "demo-sequential"];
    let sequential_service = Service::start("runtime-service-sequential", &runtime_bin, &args_two, logs)?;
    let sequential = sequential_service.runtime_ready().await?;
    let mut memory_two_client = MemoryServiceClient::new(memory_two.channel().await?);
    println!("  {:>5} {:>16} {:>16} {:>8}", "batch", "overlapped TPOT", "sequential TPOT", "speedup");
    for batch in [1u64, 32] {
        let requests = |_: ()| {
            (0..batch).map(|i| request(model, 64, 64, 100_000 + batch * 1_000 + i)).collect::<Vec<_>>()
        };
        let overlapped = level(&runtime, &mut memory, "overlapped", requests(())).await?;
        let sequential = level(&sequential, &mut memory_two_client, "sequential", requests(())).await?;
        println!(
            "  {batch:>5} {:>13.2} ms {:>13.2} ms {:>7.2}x",
            overlapped.tpot_ms(),
            sequential.tpot_ms(),
            sequential.tpot_ms() / overlapped.tpot_ms().max(f64::EPSILON)
        );
    }
    println!("  the CPU prepares step N+1 while the GPU computes step N, so its time hides behind the GPU's");
    sequential_service.stop()?;
    memory_two.stop()?;

    println!(
        "\n▶ memory pressure: a 256 MiB kv-cache pool (128 blocks of {model}) and 16 generations of 256 + 256 tokens"
    );
    let small = Service::start(
        "memory-service-small",
        &memory_bin,
        &["--pool", "kv-cache=256MiB,activations=4GiB,uniforms=30GiB"],
        logs,
    )?;
    let url_small = format!("http://{}", small.addr);
    let args_small = ["--memory-addr", url_small.as_str(), "--instance", "demo-small"];
    let small_runtime_service = Service::start("runtime-service-small", &runtime_bin, &args_small, logs)?;
    let small_runtime = small_runtime_service.runtime_ready().await?;
    let mut small_memory = MemoryServiceClient::new(small.channel().await?);
    let requests = (0..16).map(|i| request(model, 256, 256, 200_000 + i)).collect();
    let done = level(&small_runtime, &mut small_memory, "16 streams", requests).await?;
    let preemptions: u32 = done.summaries.iter().map(|s| s.preemptions).sum();
    let completed = done.summaries.iter().filter(|s| s.completion_tokens == 256).count();
    println!(
        "  {completed}/16 completed all 256 tokens, {preemptions} preemptions (recomputed, no token sent twice), \
         peak kv-cache {:.0}%, mean batch {:.1}",
        done.peak_kv * 100.0,
        done.mean_batch()
    );
    small_runtime_service.stop()?;
    let (used, _) = kv_pool(&mut small_memory).await;
    println!("  kv-cache in use after the runtime stopped: {used} bytes");
    small.stop()?;

    println!("\n▶ stopping");
    runtime_service.stop()?;
    let (used, _) = kv_pool(&mut memory).await;
    println!("  every slab returned: kv-cache in use {used} bytes");
    memory_service.stop()?;
    Ok(())
}
