//! runtime-service with identities and a secured hop to memory-service: clients authenticate,
//! Cancel stops only the caller's own generations, and the runtime proves itself to
//! memory-service with a token or a client certificate.

use e2e::{MemoryServer, RuntimeServer, certs, config_with_pools, runtime_config};
use proto::{
    memory::v1::{
        ListPoolsRequest, WatchEventsRequest, memory_service_client::MemoryServiceClient,
        watch_events_response,
    },
    runtime::v1::{CancelRequest, GenerateRequest, ListModelsRequest, generate_response},
};
use tonic::{Code, Request};

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

/// The status a Generate ends with, at its call or after its tokens; panics with `served` if it
/// completes.
async fn refusal(
    client: &mut proto::runtime::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    request: GenerateRequest,
    served: &str,
) -> tonic::Status {
    let mut stream = match client.generate(request).await {
        Err(status) => return status,
        Ok(stream) => stream.into_inner(),
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{served}"),
            Err(status) => return status,
        }
    }
}

fn generate(max_tokens: u32, request_id: &str) -> GenerateRequest {
    e2e::generate_request(max_tokens, request_id)
}

const MEMORY_POOLS: &[(&str, u64)] =
    &[("kv-cache", 64 << 20), ("activations", 64 << 20), ("uniforms", 64 << 20)];

#[tokio::test]
async fn generations_belong_to_their_caller_and_the_runtime_presents_its_token() {
    let dir = certs::TempDir::new("runtime-auth");
    // memory-service knows the runtime by its token.
    let memory_tokens = certs::token_file(&dir, &[("runtime-a", &["holder"], Some("runtime-secret"))]);
    let mut memory_config = config_with_pools(MEMORY_POOLS);
    memory_config.security.auth_tokens = Some(memory_tokens);
    let memory = MemoryServer::start(memory_config).await;

    let runtime_dir = certs::TempDir::new("runtime-tokens");
    let runtime_tokens = certs::token_file(
        &runtime_dir,
        &[
            ("alice", &["client"], Some("alice")),
            ("bob", &["client"], Some("bob")),
            ("ops", &["admin"], Some("ops")),
        ],
    );
    let mut config = runtime_config(memory.addr);
    config.security.auth_tokens = Some(runtime_tokens);
    config.memory_auth.token_file = Some(dir.write("runtime.token", "runtime-secret\n"));
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut memory_client = MemoryServiceClient::new(memory.channel().await);
    let mut events = memory_client
        .watch_events(bearer(WatchEventsRequest::default(), "runtime-secret"))
        .await
        .expect("watch")
        .into_inner();

    let anonymous = client.list_models(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert!(client.list_models(bearer(ListModelsRequest {}, "alice")).await.is_ok());

    let mut stream = client
        .generate(bearer(generate(500, "alice-1"), "alice"))
        .await
        .expect("alice generates")
        .into_inner();
    let first = stream.message().await.expect("a token").expect("not ended");
    assert!(matches!(first.item, Some(generate_response::Item::Token(_))));

    let theft =
        client.cancel(bearer(CancelRequest { request_id: "alice-1".into() }, "bob")).await.unwrap_err();
    assert_eq!(theft.code(), Code::NotFound, "{theft:?}");
    client.cancel(bearer(CancelRequest { request_id: "alice-1".into() }, "alice")).await.expect("own cancel");
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert_eq!(ended.unwrap_err().code(), Code::Cancelled);

    // The runtime's leases are held under the identity its token proves, and no request id
    // reaches memory-service's books: its events (seen in full by that identity) never name one.
    let pools =
        memory_client.list_pools(bearer(ListPoolsRequest {}, "runtime-secret")).await.expect("listed");
    assert!(pools.into_inner().pools.iter().any(|p| p.name == "uniforms" && p.live_leases > 0));
    let mut kv_events = 0;
    while kv_events < 1 {
        let reply = events.message().await.expect("event").expect("open");
        if let Some(watch_events_response::Item::Event(event)) = reply.item {
            assert_eq!(event.holder, "runtime-a", "{event:?}");
            assert!(!event.scope_id.contains("alice-1"), "a request id leaked: {event:?}");
            if event.pool == "kv-cache" {
                kv_events += 1;
            }
        }
    }
    runtime.stop().await;
    memory.stop().await;
}

/// Reads `stream` to its end: the tokens it carried, and its error if it failed.
async fn drain(
    mut stream: tonic::Streaming<proto::runtime::v1::GenerateResponse>,
) -> (u32, Result<(), tonic::Status>) {
    let mut tokens = 0;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                tokens += u32::from(matches!(message.item, Some(generate_response::Item::Token(_))))
            }
            Ok(None) => return (tokens, Ok(())),
            Err(status) => return (tokens, Err(status)),
        }
    }
}

/// Request ids are per identity, as memory-service's scopes are per holder: two tenants use the
/// same id at once, neither can take it from the other first, and Cancel of another's id is
/// answered exactly like an id nobody uses (no existence oracle). An admin still reaches it.
#[tokio::test]
async fn request_ids_are_per_identity_and_another_identitys_id_is_not_found() {
    let memory = MemoryServer::start(config_with_pools(MEMORY_POOLS)).await;
    let dir = certs::TempDir::new("runtime-namespaces");
    let tokens = certs::token_file(
        &dir,
        &[
            ("alice", &["client"], Some("alice")),
            ("bob", &["client"], Some("bob")),
            ("ops", &["admin"], Some("ops")),
        ],
    );
    let mut config = runtime_config(memory.addr);
    config.security.auth_tokens = Some(tokens);
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let start = |client: &mut proto::runtime::v1::runtime_service_client::RuntimeServiceClient<_>,
                 id: &str,
                 who: &str| {
        let request = bearer(generate(500, id), who);
        let mut client = client.clone();
        async move { client.generate(request).await.map(tonic::Response::into_inner) }
    };
    let mut alice_shared = start(&mut client, "shared", "alice").await.expect("alice's");
    let mut bob_shared = start(&mut client, "shared", "bob").await.expect("bob uses the same id at once");
    let mut alice_only = start(&mut client, "alice-only", "alice").await.expect("alice's");
    for stream in [&mut alice_shared, &mut bob_shared, &mut alice_only] {
        stream.message().await.expect("a token").expect("running");
    }
    // Bob asks about alice's id, and about an id nobody uses: one answer, word for word.
    let cancel = |id: &str, who: &str| {
        let request = bearer(CancelRequest { request_id: id.into() }, who);
        let mut client = client.clone();
        async move { client.cancel(request).await.map(tonic::Response::into_inner) }
    };
    let theirs = cancel("alice-only", "bob").await.unwrap_err();
    let nobodys = cancel("nobody-xx", "bob").await.unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound, "{theirs:?}");
    assert_eq!(
        (nobodys.code(), nobodys.message().replace("nobody-xx", "alice-only")),
        (theirs.code(), theirs.message().into())
    );
    // Bob's Cancel of the shared id stops his generation, not alice's.
    cancel("shared", "bob").await.expect("bob cancels his own");
    let (_, ended) = drain(bob_shared).await;
    assert_eq!(ended.unwrap_err().code(), Code::Cancelled);
    // An admin reaches any identity's generation.
    cancel("alice-only", "ops").await.expect("an admin cancels alice's");
    assert_eq!(drain(alice_only).await.1.unwrap_err().code(), Code::Cancelled);
    let (tokens, ended) = drain(alice_shared).await;
    ended.expect("alice's generation with the shared id was not touched");
    assert_eq!(tokens, 499, "all but the first token, read above");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test]
async fn the_runtime_reaches_a_mutual_tls_memory_service_with_its_certificate() {
    let ca = certs::TestCa::new("cluster CA");
    let dir = certs::TempDir::new("runtime-mtls");
    let memory = MemoryServer::start(e2e::mtls_memory_config(MEMORY_POOLS, &ca, &dir)).await;

    let client_pem = ca.issue("runtime-b");
    let mut config = runtime_config(memory.addr);
    config.memory_addr = format!("https://localhost:{}", memory.addr.port());
    config.memory_auth.tls_ca = Some(dir.path().join("ca.crt"));
    config.memory_auth.tls_identity =
        Some((dir.write("runtime.crt", &client_pem.cert), dir.write("runtime.key", &client_pem.key)));
    let runtime = RuntimeServer::start(config).await;
    runtime.ready().await;
    let mut client = runtime.client().await;
    let mut stream = client.generate(generate(8, "over-mtls")).await.expect("served").into_inner();
    let mut summary = None;
    while let Some(message) = stream.message().await.expect("stream ok") {
        if let Some(generate_response::Item::Summary(s)) = message.item {
            summary = Some(s);
        }
    }
    assert_eq!(summary.expect("a summary").completion_tokens, 8);
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test]
async fn a_client_certificate_rotated_on_disk_is_used_without_a_restart() {
    let ca = certs::TestCa::new("cluster CA");
    let dir = certs::TempDir::new("runtime-rotate");
    let memory = MemoryServer::start(e2e::mtls_memory_config(MEMORY_POOLS, &ca, &dir)).await;

    // The runtime starts with a certificate memory-service does not trust: it cannot get ready.
    let untrusted = certs::TestCa::new("stranger CA").issue("runtime-c");
    let mut config = runtime_config(memory.addr);
    config.memory_addr = format!("https://localhost:{}", memory.addr.port());
    config.memory_auth.tls_ca = Some(dir.path().join("ca.crt"));
    config.memory_auth.tls_identity =
        Some((dir.write("runtime.crt", &untrusted.cert), dir.write("runtime.key", &untrusted.key)));
    config.memory_auth.tls_reload = std::time::Duration::from_millis(50);
    let runtime = RuntimeServer::start(config).await;
    let mut client = runtime.client().await;
    let refused =
        refusal(&mut client, generate(4, "before-rotation"), "served with an untrusted certificate").await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // The Secret is fixed: a certificate the CA signed replaces the files.
    let trusted = ca.issue("runtime-c");
    dir.write("runtime.key.new", &trusted.key);
    dir.write("runtime.crt.new", &trusted.cert);
    std::fs::rename(dir.path().join("runtime.key.new"), dir.path().join("runtime.key")).expect("swap key");
    std::fs::rename(dir.path().join("runtime.crt.new"), dir.path().join("runtime.crt")).expect("swap cert");
    tokio::time::timeout(std::time::Duration::from_secs(60), runtime.ready())
        .await
        .expect("the runtime never used the rotated certificate");
    runtime.stop().await;
    memory.stop().await;
}

#[tokio::test]
async fn a_lease_ttl_above_what_memory_service_accepts_is_a_misconfiguration_not_an_internal_error() {
    let mut memory_config = config_with_pools(MEMORY_POOLS);
    memory_config.max_ttl = std::time::Duration::from_secs(10);
    memory_config.default_ttl = std::time::Duration::from_secs(5);
    let memory = MemoryServer::start(memory_config).await;
    // The runtime's default lease TTL is 30 s: above the 10 s memory-service accepts.
    let runtime = RuntimeServer::start(runtime_config(memory.addr)).await;
    let mut client = runtime.client().await;
    let refused =
        refusal(&mut client, generate(4, "misconfigured"), "served with a TTL memory-service refuses").await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("ttl"), "{}", refused.message());
    // Readiness says so too: the runtime is not SERVING while the pair is misconfigured.
    let mut health = tonic_health::pb::health_client::HealthClient::new(runtime.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "runtime.v1.RuntimeService".into() })
        .await
        .expect("health answers")
        .into_inner()
        .status();
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    runtime.stop().await;
    memory.stop().await;
}
