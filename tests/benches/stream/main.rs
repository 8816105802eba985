//! The token stream at the gRPC ceiling: how many tokens per second one runtime-service process
//! delivers to many live streams on this machine, and what the engine costs per token beyond
//! gRPC itself.
//!
//! For each level of live streams (256, 1,024, 4,096; name some to run fewer), a closed loop of
//! that many clients (this process, over one HTTP/2 connection per 512 streams) runs a request of
//! 32 prompt + 512 output tokens of llama-3.1-8b against the production binaries (memory-service
//! and runtime-service as child processes, h100-sxm): decode-bound, so the simulated H100 asks
//! for about 50,000 tokens per second at 1,024 streams (more than its KV cache holds at 4,096,
//! which queues the rest, as vLLM would). Then the same client
//! drives `noop-runtime` (the same tonic stack, no engine: one ticker gives every live stream a
//! token per step, the production Token messages) at the engine's delivered rate. Printed for
//! both: tokens per second delivered, how far the device (or the ticker) fell behind real time,
//! and CPU per token of the server process (and of this client) from /proc.
//!
//! `--door engine` speaks the engine dialect (`vllm.grpc.engine.VllmEngine`, what a gateway
//! sends: token ids in, one `GenerateStreamChunk` per token out) to both servers instead of
//! `runtime.v1`.
//!
//! Run: `cargo bench -p e2e --bench stream` (about six minutes), `-- 1024`, `-- --door engine`,
//! `-- --time-scale 4`.
#![allow(clippy::print_stdout)] // a benchmark's report is its output

#[path = "../memory_process/cpu.rs"]
#[allow(dead_code)] // this bench reads process ticks only
mod cpu;

use std::time::Duration;

use e2e::{process::Process, sample};
use proto::{
    runtime::v1::{GenerateRequest, generate_response::Item, runtime_service_client::RuntimeServiceClient},
    vllm::grpc::engine::{
        self as vllm, SamplingParams, TokenizedInput, generate_request::Input,
        generate_response::Response as EngineMessage, vllm_engine_client::VllmEngineClient,
    },
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const LEVELS: [usize; 3] = [256, 1024, 4096];
const MODEL: &str = "llama-3.1-8b";
const PROMPT_WORDS: usize = 32;
const OUTPUT: u32 = 512;
/// Requests per client: bounded; one 512-token request is mostly steady decoding.
const ROUNDS: usize = 1;
/// Streams per HTTP/2 connection (under the servers' limit of 1,024 concurrent streams).
const STREAMS_PER_CONNECTION: usize = 512;
/// Microseconds per /proc tick (USER_HZ = 100).
const TICK_US: f64 = 10_000.0;
const ENV: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info,runtime_service=info,serving=info")];

/// One level's measurements on one server.
#[derive(Debug, Clone, Copy)]
struct Measured {
    tokens: u64,
    wall: Duration,
    lag: f64,
    server_us_per_token: f64,
    client_us_per_token: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
}

fn prompt() -> String {
    const WORDS: [&str; 8] = ["memory", "device", "kernel", "batch", "token", "stream", "cache", "layer"];
    (0..PROMPT_WORDS).map(|i| WORDS[i % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

/// Which front door the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// `runtime.v1.RuntimeService`: a prompt in, Token messages out.
    V1,
    /// `vllm.grpc.engine.VllmEngine`: token ids in, a chunk per token out.
    Engine,
}

/// Runs one stream to its end through `door`; the tokens it carried.
async fn stream(channel: Channel, door: Door, id: usize) -> u64 {
    match door {
        Door::V1 => {
            let request = GenerateRequest {
                model: MODEL.into(),
                prompt: prompt(),
                max_tokens: OUTPUT,
                seed: id as u64,
                ..GenerateRequest::default()
            };
            let mut client = RuntimeServiceClient::new(channel);
            let mut responses = client.generate(request).await.expect("generate").into_inner();
            let mut tokens = 0;
            while let Some(item) = responses.next().await {
                match item.expect("stream item").item {
                    Some(Item::Token(_)) => tokens += 1,
                    Some(Item::Summary(_)) => return tokens,
                    None => {}
                }
            }
        }
        Door::Engine => {
            let request = vllm::GenerateRequest {
                request_id: format!("stream-bench-{id}"),
                input: Some(Input::Tokenized(TokenizedInput {
                    original_text: String::new(),
                    input_ids: (0..PROMPT_WORDS as u32).map(|i| 100 + i * 7 % 90).collect(),
                })),
                sampling_params: Some(SamplingParams {
                    max_tokens: Some(OUTPUT),
                    ignore_eos: true,
                    seed: Some(id as i32),
                    ..SamplingParams::default()
                }),
                stream: true,
                ..vllm::GenerateRequest::default()
            };
            let mut client = VllmEngineClient::new(channel);
            let mut responses = client.generate(request).await.expect("generate").into_inner();
            let mut tokens = 0;
            while let Some(message) = responses.next().await {
                match message.expect("stream item").response {
                    Some(EngineMessage::Chunk(chunk)) => tokens += chunk.token_ids.len() as u64,
                    Some(EngineMessage::Complete(_)) => return tokens,
                    None => {}
                }
            }
        }
    }
    panic!("stream ended without its last message")
}

/// `streams` clients, each running [`ROUNDS`] requests one after the other; tokens and wall time.
async fn closed_loop(channels: &[Channel], streams: usize, door: Door) -> (u64, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|w| {
            let channel = channels[w % channels.len()].clone();
            tokio::spawn(async move {
                let mut tokens = 0;
                for round in 0..ROUNDS {
                    tokens += stream(channel.clone(), door, w * ROUNDS + round).await;
                }
                tokens
            })
        })
        .collect();
    let mut tokens = 0;
    for task in tasks {
        tokens += task.await.expect("client task");
    }
    (tokens, started.elapsed())
}

/// Connections enough for `streams` at [`STREAMS_PER_CONNECTION`] each.
async fn channels(process: &Process, streams: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..streams.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(process.channel().await);
    }
    channels
}

/// Measures a closed loop of `streams` against `server`; `lag` reads its lag counter (seconds).
async fn measure(server: &Process, streams: usize, door: Door, lag: impl Fn() -> f64) -> Measured {
    let channels = channels(server, streams).await;
    let (lag_before, server_before, client_before) =
        (lag(), cpu::process_ticks(server.pid()), cpu::process_ticks(std::process::id()));
    let (tokens, wall) = closed_loop(&channels, streams, door).await;
    let per_token = |ticks: u64| ticks as f64 * TICK_US / tokens.max(1) as f64;
    Measured {
        tokens,
        wall,
        lag: lag() - lag_before,
        server_us_per_token: per_token(cpu::process_ticks(server.pid()) - server_before),
        client_us_per_token: per_token(cpu::process_ticks(std::process::id()) - client_before),
    }
}

/// The no-op server's lag so far: the sum of its `idle lag_s=` lines.
fn noop_lag(noop: &Process) -> f64 {
    let logs = noop.logs.lock().expect("logs");
    logs.iter().filter_map(|l| l.split("lag_s=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok()).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--time-scale N`: the device runs N× faster than real time, so it asks N× the tokens.
    let scale = args.windows(2).find(|w| w[0] == "--time-scale").map_or("1".to_owned(), |w| w[1].clone());
    let door = match args.windows(2).find(|w| w[0] == "--door").map(|w| w[1].as_str()) {
        None | Some("v1") => Door::V1,
        Some("engine") => Door::Engine,
        Some(other) => panic!("--door {other}: expected v1 or engine"),
    };
    let service = match door {
        Door::V1 => "runtime.v1.RuntimeService",
        Door::Engine => "vllm.grpc.engine.VllmEngine",
    };
    let filters: Vec<usize> =
        args.iter().filter_map(|a| a.parse().ok()).filter(|l| LEVELS.contains(l)).collect();
    let levels: Vec<usize> =
        LEVELS.into_iter().filter(|l| filters.is_empty() || filters.contains(l)).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let memory = Process::start("memory-service", &["--device", "h100-sxm"], ENV, false);
        let url = format!("http://{}", memory.addr);
        let flags = [
            "--memory-addr", &url, "--device", "h100-sxm", "--engine-model", MODEL, "--max-batch-size", "4096", "--max-batched-tokens", "8192",
            "--queue-capacity", "8192", "--ttft-timeout-ms", "3600000", "--idle-timeout-ms", "3600000",
            "--max-stream-lifetime-ms", "3600000", "--time-scale", &scale,
        ];
        let engine = Process::start("runtime-service", &flags, ENV, true);
        engine.serving(service).await;
        let scrape = |name: &str| sample(&engine.scrape(), name, &[]).unwrap_or(0.0);
        // Warm: the model loaded, the connections' windows grown.
        measure(&engine, 8, door, || 0.0).await;
        println!(
            "\n== token stream ceiling: {MODEL} on h100-sxm at {scale}× real time, {PROMPT_WORDS} + {OUTPUT} tokens, \
             N streams at once, through {service} =="
        );
        println!(
            "{:>6} | {:>10} {:>6} {:>9} {:>9} | {:>10} {:>6} {:>9} {:>9} | {:>6}",
            "N", "engine/s", "lag", "srv µs/t", "cli µs/t", "no-op/s", "lag", "srv µs/t", "cli µs/t", "ratio"
        );
        for streams in levels {
            let engine_run = measure(&engine, streams, door, || scrape("runtime_device_lag_seconds_total")).await;
            // The no-op streams at the engine's delivered rate: a token per stream every step.
            let step = engine_run.wall.mul_f64(streams as f64 / engine_run.tokens.max(1) as f64);
            let step_us = step.as_micros().max(1).to_string();
            let noop = Process::start("noop-runtime", &["--step-us", &step_us], &[], false);
            let noop_run = measure(&noop, streams, door, || noop_lag(&noop)).await;
            noop.stop();
            let pct = |m: &Measured| 100.0 * m.lag / m.wall.as_secs_f64();
            println!(
                "{streams:>6} | {:>10.0} {:>5.1}% {:>9.1} {:>9.1} | {:>10.0} {:>5.1}% {:>9.1} {:>9.1} | {:>5.2}×",
                engine_run.rate(),
                pct(&engine_run),
                engine_run.server_us_per_token,
                engine_run.client_us_per_token,
                noop_run.rate(),
                pct(&noop_run),
                noop_run.server_us_per_token,
                noop_run.client_us_per_token,
                engine_run.server_us_per_token / noop_run.server_us_per_token.max(f64::MIN_POSITIVE),
            );
        }
        println!(
            "(lag: the device clock (engine) or the ticker (no-op) behind real time, share of the run; \
             µs/t: CPU per token of the server process and of this client, from /proc; \
             ratio: engine server CPU per token ÷ no-op's)"
        );
        engine.stop();
        memory.stop();
    });
}
