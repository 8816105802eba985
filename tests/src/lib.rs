//! Helpers shared by the end-to-end tests: start real servers on `127.0.0.1:0`, connect clients,
//! and stop them by joining their tasks, so a server error fails the test.
#![forbid(unsafe_code)]

pub mod certs;
pub mod otlp;
pub mod process;

use std::{future::Future, net::SocketAddr, time::Duration};

use memory_service::Config;
use proto::{
    memory::v1::{
        AllocateRequest, AllocationItem, GetPoolStatsRequest, PoolStats,
        memory_service_client::MemoryServiceClient,
    },
    runtime::v1::runtime_service_client::RuntimeServiceClient,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A server running in this process on a loopback port.
#[derive(Debug)]
pub struct TestServer {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Where it serves Prometheus metrics (`/metrics`).
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// Binds `addr` (`127.0.0.1:0` for an ephemeral port) and serves with `serve`. The port is
    /// bound before this returns, so clients can connect at once: no readiness wait is needed.
    pub async fn spawn<F, Fut, E>(addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(TcpListener, TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let admin_listener = TcpListener::bind(loopback()).await.expect("bind loopback");
        let admin = admin_listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = serve(listener, admin_listener, stopped);
        let task = tokio::spawn(async move { serving.await.map_err(|e| e.to_string()) });
        TestServer { addr, admin, stop: Some(stop), task: Some(task) }
    }

    /// The Prometheus text its admin port serves now.
    pub async fn scrape(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `GET path` on its admin port: the HTTP status and the body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin.to_string(), path).await
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .connect()
            .await
            .expect("connect to loopback server")
    }

    /// A channel whose HTTP/2 windows hold only 1 KiB: a client that does not read soon pushes
    /// back on the server (to test slow readers).
    pub async fn tiny_window_channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await
            .expect("connect to loopback server")
    }

    /// Asks the server to shut down without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and joins the server task; panics if the server failed.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.join().await;
    }

    /// Joins the server task (after [`TestServer::begin_shutdown`]); panics if it failed.
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.expect("server task panicked").expect("server returned an error");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A memory-service running in this process.
#[derive(Debug)]
pub struct MemoryServer(pub TestServer);

impl std::ops::Deref for MemoryServer {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

impl std::ops::DerefMut for MemoryServer {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.0
    }
}

impl MemoryServer {
    /// Serves `config` on an ephemeral loopback port.
    pub async fn start(config: Config) -> Self {
        Self::start_at(loopback(), config).await
    }

    /// Serves `config` on `addr` (to restart a server on the port it had).
    pub async fn start_at(addr: SocketAddr, config: Config) -> Self {
        MemoryServer(
            TestServer::spawn(addr, |listener, admin, stopped| {
                memory_service::run(listener, Some(admin), config, async {
                    let _ = stopped.await;
                })
            })
            .await,
        )
    }

    /// Starts with pools `(name, capacity)` and otherwise default settings.
    pub async fn with_pools(pools: &[(&str, u64)]) -> Self {
        Self::start(config_with_pools(pools)).await
    }

    /// A connected client.
    pub async fn client(&self) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::new(self.channel().await)
    }

    /// Shuts down and joins.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

/// A runtime-service running in this process.
#[derive(Debug)]
pub struct RuntimeServer(pub TestServer);

impl std::ops::Deref for RuntimeServer {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

impl std::ops::DerefMut for RuntimeServer {
    fn deref_mut(&mut self) -> &mut TestServer {
        &mut self.0
    }
}

impl RuntimeServer {
    /// Serves `config` on an ephemeral loopback port.
    pub async fn start(config: runtime_service::Config) -> Self {
        RuntimeServer(
            TestServer::spawn(loopback(), |listener, admin, stopped| {
                runtime_service::run(listener, Some(admin), config, async {
                    let _ = stopped.await;
                })
            })
            .await,
        )
    }

    /// A connected client.
    pub async fn client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    /// Resolves once health reports SERVING (event-driven: a health Watch stream, no polling).
    pub async fn ready(&self) {
        wait_serving(self.channel().await, "runtime.v1.RuntimeService").await;
    }

    /// Shuts down and joins.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

/// The value of the first sample of metric `name` whose labels include every `labels` pair
/// (written `key="value"`), in Prometheus text; `None` if there is none.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

/// Waits on a health Watch stream until `service` is SERVING.
pub async fn wait_serving(channel: Channel, service: &str) {
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest { service: service.into() })
        .await
        .expect("health watch")
        .into_inner();
    while let Some(reply) = watch.next().await {
        if reply.expect("health update").status() == ServingStatus::Serving {
            return;
        }
    }
    panic!("health stream ended before {service} was serving");
}

/// Default config with the given pools.
pub fn config_with_pools(pools: &[(&str, u64)]) -> Config {
    Config {
        pools: pools
            .iter()
            .map(|(name, capacity)| memory_service::config::PoolSpec {
                name: (*name).into(),
                capacity: *capacity,
            })
            .collect(),
        ..Config::default()
    }
}

/// Test models: tiny architectures, so steps are quick and memory footprints small. On
/// [`test_device`] a decode step of `test-webllm` reads 1 MB of weights at 1 GB/s (1 ms) plus a
/// 2 ms launch, about 3 ms; its CPU stage costs 2 ms per step. KV: 256 bytes per token, so a
/// 16-token block is 4 KiB.
pub const TEST_MODELS: &str = r#"
[[models]]
key = "test-webllm"
mock_lm = "webllm"
preload = true
max_tokens_limit = 512
max_prompt_tokens = 256
[models.arch]
parameters = 1000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 128
dtype_bytes = 1
context_length = 4096

[[models]]
key = "test-tjs"
mock_lm = "transformers-js"
preload = false
max_tokens_limit = 512
max_prompt_tokens = 256
[models.arch]
parameters = 2000000
layers = 2
hidden_size = 64
attention_heads = 2
kv_heads = 2
head_dim = 32
intermediate_size = 128
dtype_bytes = 1
context_length = 4096
"#;

/// The test device in config-file form (for child processes), selected by `device = "test-gpu"`.
pub const TEST_DEVICE: &str = r#"
device = "test-gpu"
jitter = 0.0
kv_idle_release_ms = 0
kv_slab_blocks = 16
[[devices]]
name = "test-gpu"
memory_bytes = 1073741824
bandwidth_bytes_per_s = 1e9
flops_per_s = 1e12
bandwidth_efficiency = 1.0
flops_efficiency = 1.0
launch_overhead_s = 0.002
cpu_per_step_s = 0.002
cpu_per_seq_s = 0.0
"#;

/// The test device: round numbers, so step times can be checked by hand.
pub fn test_device() -> serving::device::DeviceSpec {
    serving::device::DeviceSpec {
        name: "test-gpu".into(),
        memory_bytes: 1 << 30,
        bandwidth_bytes_per_s: 1e9,
        flops_per_s: 1e12,
        bandwidth_efficiency: 1.0,
        flops_efficiency: 1.0,
        kv_bandwidth_efficiency: None,
        attention_flops_efficiency: None,
        launch_overhead_s: 0.002,
        cpu_per_step_s: 0.002,
        cpu_per_seq_s: 0.0,
        cpu_per_prompt_token_s: 0.0,
        frontend_s: 0.0,
    }
}

/// Bytes of one KV block of the test models (16 tokens × 256 bytes).
pub const TEST_BLOCK_BYTES: u64 = 4096;

/// A runtime config pointing at `memory` with the test models on the test device, no jitter,
/// 16-block slabs returned as soon as a model falls idle, and the prefix cache off: it would keep
/// an idle model's slabs as cache, and most tests check that memory comes back (the prefix-cache
/// tests turn it on).
pub fn runtime_config(memory: SocketAddr) -> runtime_service::Config {
    runtime_service::Config {
        memory_addr: format!("http://{memory}"),
        instance: "test-runtime".into(),
        device: test_device(),
        models: runtime_service::config::parse_models(TEST_MODELS).expect("test models parse"),
        jitter: 0.0,
        kv_idle_release: Duration::ZERO,
        kv_slab_blocks: 16,
        prefix_caching: false,
        ..runtime_service::Config::default()
    }
}

/// Waits until `pool` holds `used` bytes, woken by its FREED and EXPIRED events (no polling):
/// slabs go back to memory-service in the background once a model falls idle.
pub async fn wait_for_used(memory: &MemoryServer, pool: &str, used: u64) {
    use proto::memory::v1::{EventKind, WatchEventsRequest};
    let mut client = memory.client().await;
    let filter = WatchEventsRequest {
        pools: vec![pool.into()],
        kinds: vec![EventKind::Freed.into(), EventKind::Expired.into(), EventKind::Allocated.into()],
        ..Default::default()
    };
    let mut events = client.watch_events(filter).await.expect("watch events").into_inner();
    loop {
        if stats(&mut client, pool).await.used_bytes == used {
            return;
        }
        let next = tokio::time::timeout(Duration::from_secs(60), events.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "{pool} never reached {used} bytes used");
    }
}

/// An Allocate of `items` by holder "test", no wait, default TTL.
pub fn alloc(items: &[(&str, u64)]) -> AllocateRequest {
    AllocateRequest {
        items: items
            .iter()
            .map(|(pool, size)| AllocationItem { pool: (*pool).into(), size_bytes: *size })
            .collect(),
        holder: "test".into(),
        ..AllocateRequest::default()
    }
}

/// `GET path` from the HTTP/1 server at `addr` (an admin port): the status and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect admin port");
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, body.to_owned())
}

/// A protobuf duration.
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("duration in range")
}

/// Polls `pool`'s stats (a bounded loop yielding between calls, never a sleep) until it has
/// `waiters` queued Allocate calls; false if that never happens.
pub async fn wait_for_waiters(client: &mut MemoryServiceClient<Channel>, pool: &str, waiters: u64) -> bool {
    for _ in 0..1000 {
        if stats(client, pool).await.waiters == waiters {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

/// Stats of `pool`.
pub async fn stats(client: &mut MemoryServiceClient<Channel>, pool: &str) -> PoolStats {
    client
        .get_pool_stats(GetPoolStatsRequest { name: pool.into() })
        .await
        .expect("get_pool_stats")
        .into_inner()
        .pool
        .expect("pool stats present")
}

/// The services a server's reflection lists (v1), sorted.
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.next().await.expect("a reply").expect("no error").message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort_unstable();
    names
}

/// The fields a status's BadRequest details name, in order.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// `n` runtimes named a, b, ... on `memory` with 4-block slabs, each ready.
pub async fn runtimes_on(memory: SocketAddr, n: usize) -> Vec<RuntimeServer> {
    let mut runtimes = Vec::new();
    for name in ["a", "b", "c", "d"].into_iter().take(n) {
        let config =
            runtime_service::Config { kv_slab_blocks: 4, instance: name.into(), ..runtime_config(memory) };
        let runtime = RuntimeServer::start(config).await;
        runtime.ready().await;
        runtimes.push(runtime);
    }
    runtimes
}

/// Whether `status` is a refusal a caller can act on: a code in `allowed`, a message saying
/// why, bounded in size. The fuzz tests' check of every error.
pub fn proper_refusal(status: &tonic::Status, allowed: &[tonic::Code]) -> Result<(), String> {
    if !allowed.contains(&status.code()) {
        return Err(format!("unexpected code: {status:?}"));
    }
    if status.message().is_empty() {
        return Err(format!("no message: {status:?}"));
    }
    if status.message().len() >= 8192 {
        return Err(format!("message of {} bytes", status.message().len()));
    }
    Ok(())
}

/// A Generate of `max_tokens` tokens of the test model, under `request_id`.
pub fn generate_request(max_tokens: u32, request_id: &str) -> proto::runtime::v1::GenerateRequest {
    proto::runtime::v1::GenerateRequest {
        model: "test-webllm".into(),
        prompt: "Write a long story about caches.".into(),
        max_tokens,
        seed: 3,
        request_id: request_id.into(),
        ..proto::runtime::v1::GenerateRequest::default()
    }
}

/// A memory-service config with the test pools and mutual TLS from `ca` (server certificate for
/// `localhost`, files written to `dir`).
pub fn mtls_memory_config(pools: &[(&str, u64)], ca: &certs::TestCa, dir: &certs::TempDir) -> Config {
    let server = ca.issue("memory-service");
    let mut config = config_with_pools(pools);
    config.security.tls = Some(serving::tls::TlsFiles {
        cert: dir.write("memory.crt", &server.cert),
        key: dir.write("memory.key", &server.key),
        client_ca: Some(dir.write("ca.crt", &ca.cert_pem())),
    });
    config
}
