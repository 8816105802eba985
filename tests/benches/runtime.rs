//! runtime-service benchmarks, each a ratio against a baseline measured in the same run:
//!
//! 1. Serving overhead: one Generate stream with zero simulated delay against a bare tonic
//!    stream of the same messages, served by the same process (goal: at least 0.8).
//! 2. Pipelining: pipelined against sequential with a millisecond-scale profile, as a fraction of
//!    the ideal speedup (cpu + gpu) / max(cpu, gpu) (goal: at least 0.95).
//! 3. Concurrency sweep, 1 to 256 streams: aggregate tokens/s, p50/p99 time to first token, and
//!    scaling efficiency against 1 stream.
//!
//! Run: `cargo bench -p e2e --bench runtime` (all three), or name some:
//! `cargo bench -p e2e --bench runtime -- overhead pipelining sweep`.

use std::{net::SocketAddr, time::Duration};

use e2e::{MemoryServer, RuntimeServer, TestServer, config_with_pools};
use proto::runtime::v1::{
    self as pb, GenerateRequest, PipelineMode,
    generate_response::Item,
    runtime_service_client::RuntimeServiceClient,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use tokio::{net::TcpListener, sync::mpsc, time::Instant};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::Channel};

const ROUNDS: usize = 5;
const POOLS: &[(&str, u64)] = &[("kv-cache", 1 << 40), ("activations", 1 << 40), ("uniforms", 1 << 40)];

/// The baseline: a RuntimeService that streams pre-built token messages and nothing else.
#[derive(Debug)]
struct Bare;

#[tonic::async_trait]
impl RuntimeService for Bare {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let n = request.into_inner().max_tokens;
        // Same channel depth as runtime-service's stream buffer.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for index in 0..n {
                let token = pb::Token {
                    index,
                    text: " token".into(),
                    token_id: index,
                    elapsed: Some(prost_types::Duration::default()),
                    gpu_time: Some(prost_types::Duration::default()),
                };
                if tx.send(Ok(pb::GenerateResponse { item: Some(Item::Token(token)) })).await.is_err() {
                    return;
                }
            }
            let _ =
                tx.send(Ok(pb::GenerateResponse { item: Some(Item::Summary(pb::Summary::default())) })).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse::default()))
    }

    async fn cancel(&self, _: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        Ok(Response::new(pb::CancelResponse::default()))
    }
}

fn models(cpu_ms: f64, gpu_ms: f64) -> String {
    format!(
        r#"
[[models]]
key = "bench"
engine = "webllm"
preload = true
uniform_bytes = "1MiB"
kv_bytes_per_token = 64
activation_bytes_per_token = 64
max_tokens_limit = 100000
max_prompt_tokens = 1024
prefill_per_token_ms = 0.0
cpu_per_token_ms = {cpu_ms}
gpu_per_token_ms = {gpu_ms}
jitter = 0.0
"#
    )
}

async fn runtime(memory: SocketAddr, cpu_ms: f64, gpu_ms: f64) -> RuntimeServer {
    let mut config = e2e::runtime_config(memory);
    config.models = runtime_service::config::parse_models(&models(cpu_ms, gpu_ms)).expect("models");
    config.max_concurrent = 512;
    config.queue_capacity = 512;
    let server = RuntimeServer::start(config).await;
    server.ready().await;
    server
}

fn request(max_tokens: u32, mode: PipelineMode) -> GenerateRequest {
    GenerateRequest {
        model: "bench".into(),
        prompt: "Benchmark the stream.".into(),
        max_tokens,
        seed: 1,
        pipeline_mode: mode.into(),
        ..GenerateRequest::default()
    }
}

/// Streams one generation; returns (time to first token, total time, tokens).
async fn stream(
    client: &mut RuntimeServiceClient<Channel>,
    req: GenerateRequest,
) -> (Duration, Duration, u32) {
    let started = Instant::now();
    let mut ttft = None;
    let mut tokens = 0;
    let mut s = client.generate(req).await.expect("generate").into_inner();
    while let Some(item) = s.next().await {
        if let Some(Item::Token(_)) = item.expect("stream item").item {
            ttft.get_or_insert_with(|| Instant::now() - started);
            tokens += 1;
        }
    }
    (ttft.unwrap_or_default(), Instant::now() - started, tokens)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[allow(clippy::print_stdout)]
async fn serving_overhead(memory: SocketAddr) {
    const TOKENS: u32 = 5_000;
    let ours = runtime(memory, 0.0, 0.0).await;
    let bare =
        TestServer::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), |listener: TcpListener, _admin, stopped| {
            tonic::transport::Server::builder()
                .add_service(RuntimeServiceServer::new(Bare))
                .serve_with_incoming_shutdown(serving::grpc::incoming(listener), async {
                    let _ = stopped.await;
                })
        })
        .await;
    let mut ours_client = ours.client().await;
    let mut bare_client = RuntimeServiceClient::new(bare.channel().await);
    stream(&mut ours_client, request(TOKENS, PipelineMode::Pipelined)).await; // warm-up
    stream(&mut bare_client, request(TOKENS, PipelineMode::Pipelined)).await;
    let (mut ours_rates, mut bare_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (_, t_ours, n_ours) = stream(&mut ours_client, request(TOKENS, PipelineMode::Pipelined)).await;
        let (_, t_bare, n_bare) = stream(&mut bare_client, request(TOKENS, PipelineMode::Pipelined)).await;
        let (o, b) = (f64::from(n_ours) / t_ours.as_secs_f64(), f64::from(n_bare) / t_bare.as_secs_f64());
        ours_rates.push(o);
        bare_rates.push(b);
        ratios.push(o / b);
    }
    println!("\n1. serving overhead: one stream of {TOKENS} tokens, zero simulated delay");
    println!("| stream | tokens/s |\n| --- | ---: |");
    println!("| bare tonic stream (baseline) | {:.0} |", median(bare_rates));
    println!("| runtime-service Generate | {:.0} |", median(ours_rates));
    println!("ratio: {:.2} (goal >= 0.80)", median(ratios));
    ours.stop().await;
    bare.stop().await;
}

#[allow(clippy::print_stdout)]
async fn pipelining(memory: SocketAddr) {
    const TOKENS: u32 = 200;
    let (cpu, gpu) = (2.0, 3.0);
    let server = runtime(memory, cpu, gpu).await;
    let mut client = server.client().await;
    let mut fractions = Vec::new();
    let (mut pipelined_ms, mut sequential_ms) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (_, p, _) = stream(&mut client, request(TOKENS, PipelineMode::Pipelined)).await;
        let (_, s, _) = stream(&mut client, request(TOKENS, PipelineMode::Sequential)).await;
        pipelined_ms.push(p.as_secs_f64() * 1e3);
        sequential_ms.push(s.as_secs_f64() * 1e3);
        fractions.push((s.as_secs_f64() / p.as_secs_f64()) / ((cpu + gpu) / gpu));
    }
    let (p, s) = (median(pipelined_ms), median(sequential_ms));
    println!("\n2. pipelining: {TOKENS} tokens, CPU {cpu} ms + GPU {gpu} ms per token, no jitter");
    println!("| schedule | wall time | ideal |\n| --- | ---: | ---: |");
    println!("| sequential | {s:.0} ms | {:.0} ms |", f64::from(TOKENS) * (cpu + gpu));
    println!("| pipelined | {p:.0} ms | {:.0} ms |", f64::from(TOKENS) * gpu + cpu);
    println!(
        "speedup {:.2}x, ideal {:.2}x: {:.2} of ideal (goal >= 0.95)",
        s / p,
        (cpu + gpu) / gpu,
        median(fractions)
    );
    server.stop().await;
}

#[allow(clippy::print_stdout)]
async fn concurrency_sweep(memory: SocketAddr) {
    const TOKENS: u32 = 32;
    let server = runtime(memory, 2.0, 3.0).await;
    let channel = server.channel().await;
    println!("\n3. concurrency sweep: streams of {TOKENS} tokens, CPU 2 ms + GPU 3 ms per token");
    println!("| streams | aggregate tokens/s | p50 TTFT | p99 TTFT | scaling vs 1 stream |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let mut single = 0.0;
    for concurrency in [1usize, 4, 16, 64, 256] {
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let mut client = RuntimeServiceClient::new(channel.clone());
                tokio::spawn(
                    async move { stream(&mut client, request(TOKENS, PipelineMode::Pipelined)).await },
                )
            })
            .collect();
        let mut ttfts = Vec::with_capacity(concurrency);
        let mut tokens = 0;
        for task in tasks {
            let (ttft, _, n) = task.await.expect("stream task");
            ttfts.push(ttft);
            tokens += n;
        }
        let rate = f64::from(tokens) / (Instant::now() - started).as_secs_f64();
        if concurrency == 1 {
            single = rate;
        }
        println!(
            "| {concurrency} | {rate:.0} | {:.1} ms | {:.1} ms | {:.2} |",
            percentile(&mut ttfts, 0.5).as_secs_f64() * 1e3,
            percentile(&mut ttfts, 0.99).as_secs_f64() * 1e3,
            rate / (single * concurrency as f64)
        );
    }
    server.stop().await;
}

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let picked: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    runtime.block_on(async {
        let memory = MemoryServer::start(config_with_pools(POOLS)).await;
        if run("overhead") {
            serving_overhead(memory.addr).await;
        }
        if run("pipelining") {
            pipelining(memory.addr).await;
        }
        if run("sweep") {
            concurrency_sweep(memory.addr).await;
        }
        memory.stop().await;
    });
}
