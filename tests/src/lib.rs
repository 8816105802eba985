//! Helpers shared by the end-to-end tests: start a real server on `127.0.0.1:0`, connect clients,
//! and stop it by joining its task, so a server error fails the test.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use memory_service::{Config, server::ServeError};
use proto::memory::v1::{
    AllocateRequest, AllocationItem, GetPoolStatsRequest, PoolStats,
    memory_service_client::MemoryServiceClient,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A memory-service running in this process on an ephemeral loopback port.
#[derive(Debug)]
pub struct MemoryServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl MemoryServer {
    /// Binds `127.0.0.1:0` and serves `config` on it. The port is bound before this returns, so
    /// clients can connect at once: no readiness wait is needed.
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(memory_service::run(listener, config, async {
            let _ = stopped.await;
        }));
        MemoryServer { addr, stop: Some(stop), task: Some(task) }
    }

    /// Starts with pools `(name, capacity)` and otherwise default settings.
    pub async fn with_pools(pools: &[(&str, u64)]) -> Self {
        Self::start(config_with_pools(pools)).await
    }

    /// A connected client.
    pub async fn client(&self) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::new(self.channel().await)
    }

    /// A connected channel (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
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

    /// Joins the server task (after [`MemoryServer::begin_shutdown`]); panics if it failed.
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            task.await.expect("server task panicked").expect("server returned an error");
        }
    }
}

impl Drop for MemoryServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
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
