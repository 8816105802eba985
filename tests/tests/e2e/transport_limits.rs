//! Transport limits: an over-size request is RESOURCE_EXHAUSTED (gRPC's status table), not
//! OUT_OF_RANGE; over-size metadata is refused; the server goes on serving others.

use e2e::{MemoryServer, RuntimeServer, alloc, config_with_pools, runtime_config};
use proto::{
    memory::v1::{KeepAliveRequest, ListPoolsRequest},
    runtime::v1::GenerateRequest,
};
use tonic::{Code, Request};

#[tokio::test]
async fn an_over_size_request_is_resource_exhausted_on_both_services() {
    let memory = MemoryServer::start(config_with_pools(&[
        ("kv-cache", 1 << 30),
        ("activations", 1 << 30),
        ("uniforms", 1 << 30),
    ]))
    .await;
    let mut client = memory.client().await.max_encoding_message_size(64 << 20);
    let mut ask = alloc(&[("kv-cache", 1)]);
    ask.holder = "h".repeat(5 << 20);
    let refused = client.allocate(ask).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("too large"), "{}", refused.message());

    // On a stream too: the KeepAlive ends RESOURCE_EXHAUSTED saying why.
    let huge =
        KeepAliveRequest { lease_ids: vec!["x".repeat(5 << 20)], scope_ids: vec![], reclaimable: None };
    let mut replies = client.keep_alive(tokio_stream::iter([huge])).await.expect("opens").into_inner();
    let ended = replies.message().await.unwrap_err();
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");

    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    let mut runtime_client = runtime.client().await.max_encoding_message_size(64 << 20);
    let request = GenerateRequest {
        model: "test-webllm".into(),
        prompt: "p".repeat(5 << 20),
        max_tokens: 1,
        ..GenerateRequest::default()
    };
    let refused = runtime_client.generate(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(client.list_pools(ListPoolsRequest {}).await.is_ok(), "the server serves on");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test]
async fn over_size_metadata_is_refused_and_the_server_serves_on() {
    let memory = MemoryServer::with_pools(&[("kv-cache", 1024)]).await;
    let mut client = memory.client().await;
    let mut request = Request::new(ListPoolsRequest {});
    request.metadata_mut().insert("x-padding", "p".repeat(64 << 10).parse().expect("ascii"));
    assert!(client.list_pools(request).await.is_err(), "64 KiB of metadata was accepted");
    let mut fresh = memory.client().await;
    assert!(fresh.list_pools(ListPoolsRequest {}).await.is_ok());
}
