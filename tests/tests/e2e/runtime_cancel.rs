//! Blocks back before the status, in real time: a Cancel that lands in the middle of a device
//! step (an L4 decodes llama-3.1-8b in about 55 ms a token) is answered once the device has let go
//! of the sequence at the step's end, never while its blocks are still held. The client's stream
//! cannot end sooner: the device holds its token sender until it lets go. (On the paused clock
//! the device's step ends whenever the runtime idles, so only real time can tell.)

use e2e::{process::Process, sample};
use proto::runtime::v1::{
    CancelRequest, GenerateRequest, generate_response::Item, runtime_service_client::RuntimeServiceClient,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_step_is_answered_after_the_blocks_are_back() {
    let log = [("RUST_LOG", "warn,memory_service=info,runtime_service=info,serving=info")];
    let memory = Process::start("memory-service", &[], &log, false);
    let memory_addr = format!("http://{}", memory.addr);
    let runtime =
        Process::start("runtime-service", &["--memory-addr", &memory_addr, "--device", "l4"], &log, true);
    let mut client = RuntimeServiceClient::new(runtime.serving("runtime.v1.RuntimeService").await);
    let request = GenerateRequest {
        model: "llama-3.1-8b".into(),
        prompt: "Tell a long story.".into(),
        max_tokens: 400,
        request_id: "mid-step".into(),
        ..GenerateRequest::default()
    };
    let mut stream = client.generate(request).await.expect("accepted").into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(Item::Token(_)) = stream.message().await.expect("ok").expect("open").item {
            tokens += 1;
        }
    }
    let used = [r#"model="llama-3.1-8b""#, r#"state="used""#];
    assert!(sample(&runtime.scrape(), "runtime_kv_blocks", &used).unwrap_or_default() > 0.0);
    // Right after a token, the device is some way into its next step of 55 ms.
    let reply = client.cancel(CancelRequest { request_id: "mid-step".into() }).await.expect("in flight");
    assert!(!reply.into_inner().was_queued);
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended OK after a Cancel"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(sample(&runtime.scrape(), "runtime_kv_blocks", &used), Some(0.0), "blocks held at the status");
    runtime.kill();
    memory.kill();
}
