//! In-process servers on loopback ports: the server and its shutdown guard ([`TestServer`]),
//! memory-service and runtime-service on it, and the health wait that says one is ready. Apart
//! from the configs they start with and the calls made to them, which need no running server.

use std::{future::Future, net::SocketAddr};

use memory_service::Config;
use proto::{
    memory::v1::memory_service_client::MemoryServiceClient,
    runtime::v1::runtime_service_client::RuntimeServiceClient,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    configs::{config_with_pools, runtime_config},
    requests::http_get,
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
