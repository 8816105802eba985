//! The one-command demo: starts memory-service and runtime-service on loopback (the binaries
//! built next to this one), waits for health, streams a generation to the terminal, compares
//! pipelined with sequential scheduling, shows pool use before, during and after, and stops both.
//!
//! Run it with `scripts/demo` (which builds everything first).
#![allow(clippy::print_stdout)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use clap::Parser;
use proto::{
    memory::v1::{ListPoolsRequest, PoolStats, memory_service_client::MemoryServiceClient},
    runtime::v1::{
        GenerateRequest, ListModelsRequest, PipelineMode, Summary, generate_response::Item,
        runtime_service_client::RuntimeServiceClient,
    },
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Streams one generation through both services and explains what happened.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Model key (see ListModels).
    #[arg(long, default_value = "llama-3.2-1b-webllm")]
    model: String,
    /// The prompt.
    #[arg(long, default_value = "Explain how an inference server overlaps CPU and GPU work.")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where the services' logs go.
    #[arg(long, default_value = "target/demo-logs")]
    logs: PathBuf,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A child service; killed if the demo exits early, stopped with SIGTERM otherwise.
struct Service {
    name: &'static str,
    child: Child,
}

impl Service {
    /// Starts `binary` with `args` on an ephemeral loopback port and returns it with its address,
    /// read from its "listening" log line (no port guessing, no sleeping).
    fn start(
        name: &'static str,
        binary: &Path,
        args: &[String],
        logs: &Path,
    ) -> Result<(Self, String), Error> {
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start {}: {e} (run scripts/demo, which builds it)", binary.display())
            })?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening addr=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_owned());
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let service = Service { name, child };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("{name} did not start; see its log"))?;
        Ok((service, addr))
    }

    fn stop(mut self) -> Result<(), Error> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let status = self.child.wait()?;
        println!("  {} stopped ({status})", self.name);
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn secs(d: Option<prost_types::Duration>) -> f64 {
    d.and_then(|d| Duration::try_from(d).ok()).map_or(0.0, |d| d.as_secs_f64())
}

fn print_pools(label: &str, pools: &[PoolStats]) {
    let line: Vec<String> = pools
        .iter()
        .map(|p| format!("{} {} / {}", p.name, mib(p.used_bytes), mib(p.capacity_bytes)))
        .collect();
    println!("  pools {label:<7} {}", line.join(" | "));
}

async fn pools(memory: &mut MemoryServiceClient<Channel>) -> Result<Vec<PoolStats>, Error> {
    Ok(memory.list_pools(ListPoolsRequest {}).await?.into_inner().pools)
}

async fn wait_serving(channel: Channel) -> Result<(), Error> {
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(request).await?.into_inner();
    while let Some(reply) = watch.next().await {
        if reply?.status() == ServingStatus::Serving {
            return Ok(());
        }
    }
    Err("runtime-service never became ready".into())
}

/// Streams one generation; prints tokens as they arrive if `echo`. Calls `during` once, after the
/// first token, to sample pool use mid-stream.
async fn generate(
    runtime: &mut RuntimeServiceClient<Channel>,
    request: GenerateRequest,
    echo: bool,
    memory: &mut MemoryServiceClient<Channel>,
) -> Result<(Summary, Vec<PoolStats>), Error> {
    let mut stream = runtime.generate(request).await?.into_inner();
    let mut during = Vec::new();
    let mut out = std::io::stdout();
    while let Some(item) = stream.next().await {
        match item?.item {
            Some(Item::Token(token)) => {
                if during.is_empty() {
                    during = pools(memory).await?;
                }
                if echo {
                    print!("{}", token.text);
                    out.flush()?;
                }
            }
            Some(Item::Summary(summary)) => {
                if echo {
                    println!();
                }
                return Ok((summary, during));
            }
            None => {}
        }
    }
    Err("the stream ended without a summary".into())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let here = std::env::current_exe()?.parent().ok_or("no binary directory")?.to_path_buf();
    std::fs::create_dir_all(&args.logs)?;

    println!("▶ starting memory-service and runtime-service on 127.0.0.1 (logs in {})", args.logs.display());
    let (memory_service, memory_addr) =
        Service::start("memory-service", &here.join("memory-service"), &[], &args.logs)?;
    let runtime_args = vec!["--memory-addr".to_owned(), format!("http://{memory_addr}")];
    let (runtime_service, runtime_addr) =
        Service::start("runtime-service", &here.join("runtime-service"), &runtime_args, &args.logs)?;
    println!("  memory-service  {memory_addr}\n  runtime-service {runtime_addr}");

    let runtime_channel = Channel::from_shared(format!("http://{runtime_addr}"))?.connect().await?;
    let mut memory =
        MemoryServiceClient::new(Channel::from_shared(format!("http://{memory_addr}"))?.connect().await?);
    let mut runtime = RuntimeServiceClient::new(runtime_channel.clone());
    wait_serving(runtime_channel).await?;
    println!("  runtime-service is SERVING (memory-service reachable, preload models loaded)");

    let models = runtime.list_models(ListModelsRequest {}).await?.into_inner().models;
    let model =
        models.iter().find(|m| m.key == args.model).ok_or_else(|| format!("no model {:?}", args.model))?;
    let (cpu, gpu) = (secs(model.cpu_per_token), secs(model.gpu_per_token));
    println!(
        "  model {} ({} engine): CPU {:.0} ms + GPU {:.0} ms per token",
        model.key,
        model.engine,
        cpu * 1e3,
        gpu * 1e3
    );
    let before = pools(&mut memory).await?;

    let request = GenerateRequest {
        model: args.model.clone(),
        prompt: args.prompt.clone(),
        max_tokens: args.max_tokens,
        seed: args.seed,
        temperature: 0.7,
        top_p: 0.95,
        ..GenerateRequest::default()
    };
    println!("\n▶ {:?}\n", args.prompt);
    let (pipelined, during) = generate(&mut runtime, request.clone(), true, &mut memory).await?;
    println!("\n▶ again, sequentially (CPU and GPU stages not overlapped)...");
    let sequential = GenerateRequest { pipeline_mode: PipelineMode::Sequential.into(), ..request };
    let (sequential, _) = generate(&mut runtime, sequential, false, &mut memory).await?;
    let after = pools(&mut memory).await?;

    let decode = |s: &Summary| secs(s.total_time) - secs(s.time_to_first_token);
    println!("\n▶ results");
    println!(
        "  pipelined   TTFT {:>6.1} ms   {:>6.1} tokens/s   GPU idle waiting for CPU {:>6.1} ms   memory wait {:.1} ms",
        secs(pipelined.time_to_first_token) * 1e3,
        pipelined.tokens_per_second,
        secs(pipelined.gpu_idle_waiting_for_cpu) * 1e3,
        secs(pipelined.memory_wait) * 1e3,
    );
    println!(
        "  sequential  TTFT {:>6.1} ms   {:>6.1} tokens/s",
        secs(sequential.time_to_first_token) * 1e3,
        sequential.tokens_per_second
    );
    println!(
        "  speedup     {:.2}x decode time (ideal (cpu+gpu)/max(cpu,gpu) = {:.2}x)",
        decode(&sequential) / decode(&pipelined).max(f64::EPSILON),
        (cpu + gpu) / cpu.max(gpu).max(f64::EPSILON),
    );
    println!(
        "  reserved    {} kv-cache + {} activations for this generation, in one Allocate",
        mib(pipelined.kv_cache_bytes),
        mib(pipelined.activation_bytes)
    );
    print_pools("before", &before);
    print_pools("during", &during);
    print_pools("after", &after);

    println!("\n▶ stopping");
    runtime_service.stop()?;
    memory_service.stop()?;
    Ok(())
}
