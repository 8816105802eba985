//! Helpers shared by the end-to-end tests: start real servers on `127.0.0.1:0`, connect clients,
//! and stop them by joining their tasks, so a server error fails the test.
#![forbid(unsafe_code)]

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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.expect("connect admin port");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read response");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
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

/// Test models: fast, jitter-free profiles and small memory footprints.
pub const TEST_MODELS: &str = r#"
[[models]]
key = "test-webllm"
engine = "webllm"
preload = true
uniform_bytes = "1MiB"
kv_bytes_per_token = "1KiB"
activation_bytes_per_token = "4KiB"
max_tokens_limit = 512
max_prompt_tokens = 256
# Whole milliseconds: tokio's timer (paused or not) has millisecond resolution.
prefill_per_token_ms = 1.0
cpu_per_token_ms = 2.0
gpu_per_token_ms = 3.0
jitter = 0.0

[[models]]
key = "test-tjs"
engine = "transformers-js"
preload = false
uniform_bytes = "2MiB"
kv_bytes_per_token = "2KiB"
activation_bytes_per_token = "8KiB"
max_tokens_limit = 512
max_prompt_tokens = 256
prefill_per_token_ms = 0.1
cpu_per_token_ms = 3.0
gpu_per_token_ms = 2.0
jitter = 0.2
"#;

/// A runtime config pointing at `memory` with the test models.
pub fn runtime_config(memory: SocketAddr) -> runtime_service::Config {
    runtime_service::Config {
        memory_addr: format!("http://{memory}"),
        instance: "test-runtime".into(),
        models: runtime_service::config::parse_models(TEST_MODELS).expect("test models parse"),
        ..runtime_service::Config::default()
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
