//! What the tests send: requests built with the usual defaults, and the one-shot calls that read
//! a server's state (pool stats, the services reflection lists, an admin page).

use std::time::Duration;

use proto::memory::v1::{
    AllocateRequest, AllocationItem, GetPoolStatsRequest, PoolStats,
    memory_service_client::MemoryServiceClient,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

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
