//! etcd, the lease service memory-service is most often compared with, measured on the same
//! machine in the same run: one member on loopback with its default durability (the WAL is
//! fsynced before a change is acknowledged, as `--state-dir` does), driven with lease
//! grant+revoke pairs, etcd's Allocate+Free.
//!
//! The client speaks etcd's v3 gRPC API through tonic directly: the four messages below are the
//! fields of etcd's `rpc.proto` that a grant and a revoke use (prost skips the others), so no
//! etcd client crate and no code generation are needed.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use e2e::certs::TempDir;
use http::uri::PathAndQuery;
use tonic::{client::Grpc, transport::Channel};
use tonic_prost::ProstCodec;

/// `etcdserverpb.LeaseGrantRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantRequest {
    /// Time to live, seconds.
    #[prost(int64, tag = "1")]
    ttl: i64,
    /// 0: the server picks the id.
    #[prost(int64, tag = "2")]
    id: i64,
}

/// `etcdserverpb.LeaseGrantResponse` (the header is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantResponse {
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(string, tag = "4")]
    error: String,
}

/// `etcdserverpb.LeaseRevokeRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

/// `etcdserverpb.LeaseRevokeResponse` (only a header, skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeResponse {}

/// One etcd member on loopback, killed on drop.
pub struct Etcd {
    child: Child,
    /// Its client address.
    pub addr: String,
    _data: TempDir,
}

impl Etcd {
    /// Starts etcd if it is installed; `None` (with the reason printed) otherwise.
    pub fn start() -> Option<Etcd> {
        let data = TempDir::new("bench-etcd");
        let (client, peer) = (free_port(), free_port());
        let addr = format!("127.0.0.1:{client}");
        let spawned = Command::new("etcd")
            .args(["--name", "bench", "--logger", "zap", "--data-dir"])
            .arg(data.path())
            .args(["--listen-client-urls", &format!("http://{addr}")])
            .args(["--advertise-client-urls", &format!("http://{addr}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("bench=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                println!(
                    "\netcd is not installed here ({e}; `apt-get install etcd-server`): its comparison is skipped."
                );
                return None;
            }
        };
        // Ready once it serves clients (its log says so); its log is drained for its whole life
        // so it never blocks on a full pipe.
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving client traffic") {
                    let _ = ready_tx.send(());
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            println!("\netcd did not start within 60 s: its comparison is skipped.");
            return None;
        }
        Some(Etcd { child, addr, _data: data })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its version, as `etcd --version` prints it.
    pub fn version() -> String {
        Command::new("etcd")
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.lines().next().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on loopback now (etcd must be told its ports: it advertises them).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// One lease grant (TTL 30 s) and its revoke.
async fn grant_revoke(mut grpc: Grpc<Channel>) -> Grpc<Channel> {
    grpc.ready().await.expect("etcd ready");
    let granted: LeaseGrantResponse = grpc
        .unary(
            tonic::Request::new(LeaseGrantRequest { ttl: 30, id: 0 }),
            PathAndQuery::from_static("/etcdserverpb.Lease/LeaseGrant"),
            ProstCodec::default(),
        )
        .await
        .expect("LeaseGrant")
        .into_inner();
    assert!(granted.error.is_empty(), "etcd refused a grant: {}", granted.error);
    grpc.ready().await.expect("etcd ready");
    let _: tonic::Response<LeaseRevokeResponse> = grpc
        .unary(
            tonic::Request::new(LeaseRevokeRequest { id: granted.id }),
            PathAndQuery::from_static("/etcdserverpb.Lease/LeaseRevoke"),
            ProstCodec::default(),
        )
        .await
        .expect("LeaseRevoke");
    grpc
}

/// Grant+revoke pairs for `round` from `concurrency` tasks on one connection; RPCs per second
/// (two per pair, as Allocate+Free is counted).
pub async fn grant_revoke_rate(channel: &Channel, concurrency: usize, round: Duration) -> f64 {
    super::load::pair_rate(concurrency, round, || Grpc::new(channel.clone()), grant_revoke).await
}
