//! Fencing by construction: a memory-service that hangs (stopped, not killed: its connections
//! stay open and nothing reports an error) must not let the device step past the time its
//! leases are known to hold. The runtime keeps a local lease timer (the last renewal's send time
//! + TTL − a margin) and runs no step that would end after it, whatever failure detection costs.

use std::{process::Command, time::Duration};

use e2e::process::Process;
use proto::runtime::v1::{GenerateRequest, generate_response, runtime_service_client::RuntimeServiceClient};
use tokio::time::Instant;

const TTL: Duration = Duration::from_millis(2000);

fn signal(process: &Process, signal: &str) {
    let status = Command::new("kill").args([signal, &process.pid().to_string()]).status().expect("kill");
    assert!(status.success(), "kill {signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_memory_service_stops_the_device_before_its_leases_could_expire() {
    let log = [("RUST_LOG", "warn,memory_service=info,runtime_service=info")];
    let memory = Process::start("memory-service", &[], &log, false);
    let memory_addr = format!("http://{}", memory.addr);
    let ttl = TTL.as_millis().to_string();
    // An L4 decodes llama-3.1-8b at about 55 ms a token: a stream of several seconds.
    let runtime = Process::start(
        "runtime-service",
        // A small batch keeps the longest possible step (which a lease must cover) short.
        &["--memory-addr", &memory_addr, "--device", "l4", "--lease-ttl-ms", &ttl, "--max-batch-size", "8"],
        &log,
        false,
    );
    let channel = runtime.serving("runtime.v1.RuntimeService").await;
    let request = GenerateRequest {
        model: "llama-3.1-8b".into(),
        prompt: "Tell a long story.".into(),
        max_tokens: 400,
        ..GenerateRequest::default()
    };
    let mut stream =
        RuntimeServiceClient::new(channel).generate(request).await.expect("accepted").into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(generate_response::Item::Token(_)) =
            stream.message().await.expect("ok").expect("open").item
        {
            tokens += 1;
        }
    }

    // memory-service hangs. Its last answer was to a renewal sent before now, so every lease
    // it holds for the runtime dies by now + TTL at the latest.
    signal(&memory, "-STOP");
    let stopped = Instant::now();
    let mut last_token = None;
    // Bounded: the stream either pauses (fenced) or runs on; 4 s covers the old failure
    // detection (a 2 s call timeout after a renewal every third of the TTL).
    while let Ok(Ok(Some(reply))) = tokio::time::timeout(Duration::from_secs(4), stream.message()).await {
        if let Some(generate_response::Item::Token(_)) = reply.item {
            last_token = Some(stopped.elapsed());
        }
        if stopped.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    signal(&memory, "-CONT");
    drop(stream);
    runtime.kill();
    memory.kill();
    // The lease timer closes a tenth of the TTL early; delivery adds a little to each token's
    // step, and 100 ms (still short of the TTL) covers it on a loaded machine.
    let last_token = last_token.unwrap_or_default();
    assert!(
        last_token < TTL * 9 / 10 + Duration::from_millis(100),
        "a token arrived {last_token:?} after memory-service hung, past the {TTL:?} its leases were sure to hold"
    );
}
