//! A no-op runtime for the stream benchmark: the production binary's tonic server stack (its
//! transport limits, TCP_NODELAY) serving `runtime.v1.RuntimeService` and the engine dialect's
//! `vllm.grpc.engine.VllmEngine` (see `engine`), with a Generate that does no engine work. One
//! ticker plays the device: every `--step-us` it gives each live stream its next token, all of a
//! step's tokens together, the messages the production server sends (same fields, same sizes),
//! then the last one (a Summary, or a GenerateComplete). What the production binary costs per
//! token beyond this is the engine.
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:0), `--step-us N` (default 10,000); other flags are
//! ignored. Logs `listening addr=…` on stderr, as the services do, and after each busy spell
//! `idle lag_s=… steps=… tokens=…`: how far the ticker fell behind its schedule.

#![allow(clippy::print_stderr)]

mod engine;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use proto::runtime::v1::{
    self as pb,
    generate_response::Item,
    runtime_service_server::{RuntimeService, RuntimeServiceServer},
};
use tokio::{
    net::TcpListener,
    sync::mpsc::{self, error::TrySendError},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Tokens buffered per stream, as the production server's (`TOKEN_BUFFER`).
const STREAM_BUFFER: usize = 32;
/// Behind schedule by more than this, the ticker counts lag (the runtime's SLACK).
const SLACK: Duration = Duration::from_millis(2);

type Reply = Result<pb::GenerateResponse, Status>;

/// Where a stream's messages go, in its front door's words.
enum Out {
    V1(mpsc::Sender<Reply>),
    Engine(mpsc::Sender<engine::Reply>),
}

struct Live {
    out: Out,
    next: u32,
    max_tokens: u32,
    started: Instant,
}

impl Live {
    /// Sends its next message: its next token, or its last message once every token is out.
    fn send_next(&self, now: Instant, step: Duration) -> Result<(), TrySendError<()>> {
        fn unit<T>(e: TrySendError<T>) -> TrySendError<()> {
            match e {
                TrySendError::Full(_) => TrySendError::Full(()),
                TrySendError::Closed(_) => TrySendError::Closed(()),
            }
        }
        let last = self.next == self.max_tokens;
        match &self.out {
            Out::V1(tx) => {
                let message =
                    if last { summary(self, now) } else { token(self.next, now - self.started, step) };
                tx.try_send(Ok(message)).map_err(unit)
            }
            Out::Engine(tx) => {
                let message = if last { engine::complete(self.max_tokens) } else { engine::chunk(self.next) };
                tx.try_send(Ok(message)).map_err(unit)
            }
        }
    }
}

/// What the no-op answers a call it does not serve.
fn not_served<T>() -> Result<T, Status> {
    Err(Status::unimplemented("no-op"))
}

#[derive(Default)]
struct Device {
    live: Mutex<Vec<Live>>,
    wake: tokio::sync::Notify,
}

/// A token as the production server words it: a word of text, its id, its times.
fn token(index: u32, elapsed: Duration, step: Duration) -> pb::GenerateResponse {
    const WORDS: [&str; 4] = [" memory", " device", " kernel", " stream"];
    pb::GenerateResponse {
        item: Some(Item::Token(pb::Token {
            index,
            text: WORDS[index as usize % WORDS.len()].to_owned(),
            token_id: 1000 + index,
            elapsed: prost_types::Duration::try_from(elapsed).ok(),
            gpu_time: prost_types::Duration::try_from(step).ok(),
        })),
    }
}

fn summary(live: &Live, now: Instant) -> pb::GenerateResponse {
    let duration = |d: Duration| prost_types::Duration::try_from(d).ok();
    pb::GenerateResponse {
        item: Some(Item::Summary(pb::Summary {
            finish_reason: pb::FinishReason::Length.into(),
            completion_tokens: live.max_tokens,
            total_time: duration(now - live.started),
            request_id: "gen-0123456789abcdef".into(),
            scheduler: "overlapped".into(),
            ..pb::Summary::default()
        })),
    }
}

/// The device: a step every `step` while any stream is live.
async fn tick(device: Arc<Device>, step: Duration) {
    loop {
        while device.live.lock().expect("lock").is_empty() {
            device.wake.notified().await;
        }
        let (mut at, mut lag, mut steps, mut tokens) = (Instant::now(), Duration::ZERO, 0u64, 0u64);
        loop {
            at += step;
            tokio::time::sleep_until(at).await;
            let now = Instant::now();
            if now > at + SLACK {
                lag += now - at;
                at = now;
            }
            let mut live = device.live.lock().expect("lock");
            live.retain_mut(|s| {
                let last = s.next == s.max_tokens;
                match s.send_next(now, step) {
                    Ok(()) if last => false,
                    Ok(()) => {
                        s.next += 1;
                        tokens += 1;
                        true
                    }
                    // The device never waits for a reader: a full buffer skips the step (the last
                    // message too: a reader behind keeps its stream).
                    Err(TrySendError::Full(())) => true,
                    Err(TrySendError::Closed(())) => false,
                }
            });
            steps += 1;
            if live.is_empty() {
                eprintln!("noop-runtime idle lag_s={:.6} steps={steps} tokens={tokens}", lag.as_secs_f64());
                break;
            }
        }
    }
}

#[derive(Clone)]
struct Noop {
    device: Arc<Device>,
}

impl Noop {
    /// Puts a stream of `max_tokens` on the device.
    fn start(&self, out: Out, max_tokens: u32) {
        let live = Live { out, next: 0, max_tokens: max_tokens.max(1), started: Instant::now() };
        self.device.live.lock().expect("lock").push(live);
        self.device.wake.notify_one();
    }
}

#[tonic::async_trait]
impl RuntimeService for Noop {
    type GenerateStream = ReceiverStream<Reply>;
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.start(Out::V1(tx), request.into_inner().max_tokens);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse::default()))
    }
    async fn cancel(&self, _: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        not_served()
    }
    type WatchKvEventsStream = ReceiverStream<Result<pb::WatchKvEventsResponse, Status>>;
    async fn watch_kv_events(
        &self,
        _: Request<pb::WatchKvEventsRequest>,
    ) -> Result<Response<Self::WatchKvEventsStream>, Status> {
        not_served()
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let listen = flag("--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let step_us: u64 = flag("--step-us").and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let listener = TcpListener::bind(&listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    eprintln!("noop-runtime listening addr={addr}");
    let device = Arc::new(Device::default());
    tokio::spawn(tick(device.clone(), Duration::from_micros(step_us.max(1))));
    let transport = serving::transport::Transport::default();
    transport
        .server()
        .add_service(RuntimeServiceServer::new(Noop { device: device.clone() }))
        .add_service(engine::server(Noop { device }))
        .serve_with_incoming_shutdown(transport.incoming(listener), async {
            // Exit 0 on SIGTERM, as the services do (the benchmark stops it so).
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            term.recv().await;
        })
        .await
        .expect("serve");
}
