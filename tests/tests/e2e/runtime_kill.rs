//! memory-service killed with SIGKILL under a serving runtime: the runtime turns NOT_SERVING
//! within a second (the keep-alive stream's end is the signal), and serves again, with its
//! memory taken anew, once a new memory-service answers on the same address.

use std::time::Duration;

use e2e::{RuntimeServer, process::Process, runtime_config, wait_serving};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const POOLS: &str = "kv-cache=64MiB,activations=64MiB,uniforms=64MiB";
/// Quiet, but with the line that names the address it listens on.
const LOG: &[(&str, &str)] = &[("RUST_LOG", "warn,memory_service=info")];

#[tokio::test]
async fn a_killed_memory_service_turns_the_runtime_not_serving_within_a_second() {
    let memory = Process::start("memory-service", &["--pool", POOLS], LOG, false);
    let addr: std::net::SocketAddr = memory.addr.parse().expect("address");
    let runtime = RuntimeServer::start(runtime_config(addr)).await;
    runtime.ready().await;
    let mut health = HealthClient::new(runtime.channel().await);
    let check = HealthCheckRequest { service: "runtime.v1.RuntimeService".into() };
    let mut watch = health.watch(check).await.expect("watch").into_inner();
    assert_eq!(watch.next().await.expect("open").expect("status").status(), ServingStatus::Serving);

    let killed = Instant::now();
    memory.kill();
    while watch.next().await.expect("open").expect("status").status() != ServingStatus::NotServing {}
    let noticed = Instant::now() - killed;
    assert!(noticed < Duration::from_secs(1), "NOT_SERVING {noticed:?} after the kill");

    // A new memory-service on the same port (a new epoch, empty): the runtime serves again only
    // once it holds its memory there.
    let port = addr.port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--pool", POOLS, "--listen", listen.as_str()];
    let memory = Process::start_at("memory-service", &args, LOG);
    wait_serving(runtime.channel().await, "runtime.v1.RuntimeService").await;
    // An open health watch would keep the in-process runtime's connection (and the drain) alive.
    drop((watch, health));
    runtime.stop().await;
    memory.stop();
}
