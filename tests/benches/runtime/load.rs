//! Load helpers: service processes, configs, and a level of concurrent streams measured from the
//! client side.

use std::{path::PathBuf, time::Duration};

use e2e::{process::Process, sample};
use proto::runtime::v1::{
    GenerateRequest, Summary, generate_response::Item, runtime_service_client::RuntimeServiceClient,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// A scratch directory for config files, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("runtime-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// Writes `text` to `name` and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Quiet logs: the benchmark reads only addresses from them.
const ENV: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info,runtime_service=info,serving=info")];

/// A memory-service process with `args`.
pub fn memory(args: &[&str]) -> Process {
    Process::start("memory-service", args, ENV, false)
}

/// A runtime-service process on `memory` with `args`, admin port on, ready to serve.
pub async fn runtime(memory: &Process, args: &[&str]) -> (Process, RuntimeServiceClient<Channel>) {
    let url = format!("http://{}", memory.addr);
    let mut all = vec!["--memory-addr", url.as_str()];
    all.extend_from_slice(args);
    let process = Process::start("runtime-service", &all, ENV, true);
    let channel = process.serving("runtime.v1.RuntimeService").await;
    (process, RuntimeServiceClient::new(channel))
}

/// A prompt of `tokens` whole-word tokens (the WebLLM-like tokenizer counts words).
pub fn prompt(tokens: u32) -> String {
    const WORDS: [&str; 8] = ["memory", "device", "kernel", "batch", "token", "stream", "cache", "layer"];
    (0..tokens as usize).map(|i| WORDS[i % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

/// A request for `model`.
pub fn request(
    model: &str,
    prompt_tokens: u32,
    max_tokens: u32,
    temperature: f32,
    seed: u64,
) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: prompt(prompt_tokens),
        max_tokens,
        seed,
        temperature,
        ..GenerateRequest::default()
    }
}

/// One stream, measured at the client.
#[derive(Debug, Clone)]
pub struct Stream {
    pub ttft: Duration,
    /// Mean gap between tokens after the first.
    pub tpot: Option<Duration>,
    pub tokens: u32,
    pub summary: Summary,
}

/// Runs one stream to its end.
pub async fn stream(mut client: RuntimeServiceClient<Channel>, request: GenerateRequest) -> Stream {
    let started = Instant::now();
    let mut responses = client.generate(request).await.expect("generate").into_inner();
    let (mut first, mut last, mut tokens) = (None, started, 0u32);
    while let Some(item) = responses.next().await {
        match item.expect("stream item").item {
            Some(Item::Token(_)) => {
                last = Instant::now();
                first.get_or_insert(last);
                tokens += 1;
            }
            Some(Item::Summary(summary)) => {
                let first = first.unwrap_or(last);
                let tpot = (tokens >= 2).then(|| (last - first) / (tokens - 1));
                return Stream { ttft: first - started, tpot, tokens, summary };
            }
            None => {}
        }
    }
    panic!("stream ended without a summary")
}

/// `requests` streams started at once; returns them and the wall time until the last ended.
pub async fn level(
    client: &RuntimeServiceClient<Channel>,
    requests: Vec<GenerateRequest>,
) -> (Vec<Stream>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = requests.into_iter().map(|r| tokio::spawn(stream(client.clone(), r))).collect();
    let mut streams = Vec::with_capacity(tasks.len());
    for task in tasks {
        streams.push(task.await.expect("stream task"));
    }
    (streams, started.elapsed())
}

/// A closed loop, as `vllm bench serve --max-concurrency C` runs: `workers` clients each send
/// `rounds` requests one after the other (`make(worker, round)`), so arrivals spread out after the
/// first round as they do under sustained load. Returns every stream and the wall time.
pub async fn closed_loop(
    client: &RuntimeServiceClient<Channel>,
    workers: usize,
    rounds: usize,
    make: impl Fn(usize, usize) -> GenerateRequest,
) -> (Vec<Stream>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let requests: Vec<_> = (0..rounds).map(|r| make(w, r)).collect();
            tokio::spawn(async move {
                let mut done = Vec::with_capacity(requests.len());
                for request in requests {
                    done.push(stream(client.clone(), request).await);
                }
                done
            })
        })
        .collect();
    let mut streams = Vec::new();
    for task in tasks {
        streams.extend(task.await.expect("worker"));
    }
    (streams, started.elapsed())
}

/// The `p`-th percentile (0 to 1) of `values`.
pub fn pct(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds, for tables.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A counter's value on a runtime's admin port.
pub fn counter(process: &Process, name: &str, labels: &[&str]) -> f64 {
    sample(&process.scrape(), name, labels).unwrap_or(0.0)
}
