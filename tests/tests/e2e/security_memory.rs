//! memory-service with identities: authentication, roles, lease ownership, per-holder scopes and
//! private events, over real sockets.

use std::time::Duration;

use e2e::{MemoryServer, alloc, certs, config_with_pools};
use proto::memory::v1::{
    CreatePoolRequest, EventKind, FreeRequest, FreeScopeRequest, KeepAliveRequest, ListPoolsRequest,
    ReclaimableSet, RenewLeaseRequest, WatchEventsRequest, memory_service_client::MemoryServiceClient,
    watch_events_response,
};
use tonic::{Code, Request, transport::Channel};

const ADMIN: &str = "admin-secret";
const ALICE: &str = "alice-secret";
const BOB: &str = "bob-secret";
const VIEWER: &str = "viewer-secret";

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

async fn secured() -> (MemoryServer, certs::TempDir) {
    let dir = certs::TempDir::new("memory-auth");
    let tokens = certs::token_file(
        &dir,
        &[
            ("ops", &["admin"], Some(ADMIN)),
            ("alice", &["holder"], Some(ALICE)),
            ("bob", &["holder"], Some(BOB)),
            ("dashboard", &["viewer"], Some(VIEWER)),
        ],
    );
    let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
    config.security.auth_tokens = Some(tokens);
    (MemoryServer::start(config).await, dir)
}

#[tokio::test]
async fn calls_without_valid_credentials_are_unauthenticated_but_health_stays_open() {
    let (server, _dir) = secured().await;
    let mut client = server.client().await;
    let none = client.list_pools(ListPoolsRequest {}).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("Bearer"), "{}", none.message());
    let wrong = client.list_pools(bearer(ListPoolsRequest {}, "guess")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let mut malformed = Request::new(ListPoolsRequest {});
    malformed.metadata_mut().insert("authorization", "Basic Zm9v".parse().expect("ascii"));
    assert_eq!(client.list_pools(malformed).await.unwrap_err().code(), Code::Unauthenticated);

    // Probes speak no credentials: health answers anyway; reflection does not.
    e2e::wait_serving(server.channel().await, "memory.v1.MemoryService").await;
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        server.channel().await,
    );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let refused = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(client.list_pools(bearer(ListPoolsRequest {}, VIEWER)).await.is_ok());
}

#[tokio::test]
async fn roles_bound_what_each_identity_may_call() {
    let (server, _dir) = secured().await;
    let mut client = server.client().await;
    let pool = || CreatePoolRequest { name: "scratch".into(), capacity_bytes: 1024 };
    for token in [VIEWER, ALICE] {
        let denied = client.create_pool(bearer(pool(), token)).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("admin"), "{}", denied.message());
    }
    assert!(client.create_pool(bearer(pool(), ADMIN)).await.is_ok());
    let viewer_alloc = client.allocate(bearer(alloc(&[("kv-cache", 10)]), VIEWER)).await.unwrap_err();
    assert_eq!(viewer_alloc.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_holder_touches_only_its_own_leases_and_scopes() {
    let (server, _dir) = secured().await;
    let mut client = server.client().await;
    let mut ask = alloc(&[("kv-cache", 100)]);
    ask.holder = String::new();
    ask.scope_id = "weights".into();
    let granted = client.allocate(bearer(ask.clone(), ALICE)).await.expect("alice allocates").into_inner();
    let lease = granted.leases[0].clone();
    assert_eq!(lease.holder, "alice", "an empty holder takes the caller's identity");

    let mut impostor = ask.clone();
    impostor.holder = "bob".into();
    assert_eq!(client.allocate(bearer(impostor, ALICE)).await.unwrap_err().code(), Code::PermissionDenied);

    let id = || lease.lease_id.clone();
    let free = client.free(bearer(FreeRequest { lease_id: id() }, BOB)).await.unwrap_err();
    assert_eq!(free.code(), Code::PermissionDenied, "{free:?}");
    let renew = client.renew_lease(bearer(RenewLeaseRequest { lease_id: id() }, BOB)).await.unwrap_err();
    assert_eq!(renew.code(), Code::PermissionDenied);
    let keepalive = KeepAliveRequest { lease_ids: vec![id()], scope_ids: vec![], reclaimable: None };
    let mut replies = client
        .keep_alive(bearer(tokio_stream::iter([keepalive]), BOB))
        .await
        .expect("stream opens")
        .into_inner();
    assert_eq!(replies.message().await.unwrap_err().code(), Code::PermissionDenied);
    // Nor may bob offer alice's lease as reclaimable (so have it revoked).
    let offer = KeepAliveRequest {
        reclaimable: Some(ReclaimableSet { lease_ids: vec![id()] }),
        ..KeepAliveRequest::default()
    };
    let mut replies =
        client.keep_alive(bearer(tokio_stream::iter([offer]), BOB)).await.expect("stream opens").into_inner();
    assert_eq!(replies.message().await.unwrap_err().code(), Code::PermissionDenied);

    // Scopes are per holder: bob's "weights" is not alice's.
    let freed = client
        .free_scope(bearer(FreeScopeRequest { scope_id: "weights".into() }, BOB))
        .await
        .expect("bob frees his own (empty) scope")
        .into_inner();
    assert_eq!(freed.freed_leases, 0);
    assert!(client.renew_lease(bearer(RenewLeaseRequest { lease_id: id() }, ALICE)).await.is_ok());

    // An admin may free any lease.
    assert!(client.free(bearer(FreeRequest { lease_id: id() }, ADMIN)).await.is_ok());
}

#[tokio::test]
async fn events_show_other_holders_only_as_pool_figures() {
    let (server, _dir) = secured().await;
    let mut client = server.client().await;
    let watch = |token| {
        let mut client = client.clone();
        async move {
            client
                .watch_events(bearer(
                    WatchEventsRequest {
                        pools: vec![],
                        kinds: vec![EventKind::Allocated as i32],
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .expect("watch opens")
                .into_inner()
        }
    };
    let mut as_bob = watch(BOB).await;
    let mut as_viewer = watch(VIEWER).await;
    let mut as_admin = watch(ADMIN).await;
    let mut ask = alloc(&[("kv-cache", 64)]);
    ask.holder = String::new();
    ask.scope_id = "req-secret-42".into();
    client.allocate(bearer(ask.clone(), ALICE)).await.expect("alice allocates");
    client.allocate(bearer(ask, BOB)).await.expect("bob allocates");

    let (alice_seen, bob_seen) = (next_event(&mut as_bob).await, next_event(&mut as_bob).await);
    assert_eq!(
        (alice_seen.holder.as_str(), alice_seen.lease_id.as_str(), alice_seen.scope_id.as_str()),
        ("", "", "")
    );
    assert_eq!(alice_seen.size_bytes, 64, "pool-level figures stay");
    assert_eq!(bob_seen.holder, "bob");
    assert_eq!(bob_seen.scope_id, "req-secret-42");
    for _ in 0..2 {
        let event = next_event(&mut as_viewer).await;
        assert!(
            event.holder.is_empty() && event.lease_id.is_empty() && event.scope_id.is_empty(),
            "{event:?}"
        );
    }
    assert_eq!(next_event(&mut as_admin).await.holder, "alice");
    assert_eq!(next_event(&mut as_admin).await.holder, "bob");
}

async fn next_event(
    stream: &mut tonic::Streaming<proto::memory::v1::WatchEventsResponse>,
) -> proto::memory::v1::Event {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(reply))) => match reply.item {
            Some(watch_events_response::Item::Event(event)) => event,
            other => panic!("expected an event, got {other:?}"),
        },
        other => panic!("stream ended: {other:?}"),
    }
}

/// A TLS client of `server` trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&certs::Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pem) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key));
    }
    Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls)?.connect().await
}

#[tokio::test]
async fn mutual_tls_admits_certified_clients_only_and_serves_no_plaintext() {
    let ca = certs::TestCa::new("test CA");
    let dir = certs::TempDir::new("memory-mtls");
    let server = MemoryServer::start(e2e::mtls_memory_config(&[("kv-cache", 1 << 20)], &ca, &dir)).await;

    let client_pem = ca.issue("runtime-7");
    let channel = tls_channel(server.addr, &ca.cert_pem(), Some(&client_pem)).await.expect("mTLS connects");
    let mut client = MemoryServiceClient::new(channel);
    let mut ask = alloc(&[("kv-cache", 10)]);
    ask.holder = String::new();
    let lease = client.allocate(ask).await.expect("a certified client allocates").into_inner();
    assert_eq!(lease.leases[0].holder, "runtime-7", "the certificate's common name is the identity");

    // No client certificate: the handshake is refused, so no call gets through.
    let anonymous = match tls_channel(server.addr, &ca.cert_pem(), None).await {
        Ok(channel) => MemoryServiceClient::new(channel).list_pools(ListPoolsRequest {}).await.map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("connect failed")),
    };
    assert!(anonymous.is_err(), "a client without a certificate was served");
    // A certificate from another CA: refused too.
    let stranger = certs::TestCa::new("other CA").issue("mallory");
    let forged = match tls_channel(server.addr, &ca.cert_pem(), Some(&stranger)).await {
        Ok(channel) => MemoryServiceClient::new(channel).list_pools(ListPoolsRequest {}).await.map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("connect failed")),
    };
    assert!(forged.is_err(), "a certificate from another CA was accepted");
    // Plaintext gRPC on the TLS port: nothing answers.
    let plain = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect().await;
    let plain = match plain {
        Ok(channel) => MemoryServiceClient::new(channel).list_pools(ListPoolsRequest {}).await.map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("connect failed")),
    };
    assert!(plain.is_err(), "plaintext was served on a TLS port");
    // Probes still work, on the admin port.
    assert_eq!(server.admin_get("/readyz").await, (200, "SERVING\n".to_owned()));
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_is_served_without_a_restart() {
    let old_ca = certs::TestCa::new("old CA");
    let new_ca = certs::TestCa::new("new CA");
    let dir = certs::TempDir::new("memory-rotate");
    let first = old_ca.issue("memory-service");
    let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
    config.security.tls = Some(serving::tls::TlsFiles {
        cert: dir.write("tls.crt", &first.cert),
        key: dir.write("tls.key", &first.key),
        client_ca: None,
    });
    config.security.tls_reload = Duration::from_millis(50);
    let server = MemoryServer::start(config).await;
    let channel = tls_channel(server.addr, &old_ca.cert_pem(), None).await.expect("old certificate served");
    MemoryServiceClient::new(channel).list_pools(ListPoolsRequest {}).await.expect("served over TLS");
    assert!(tls_channel(server.addr, &new_ca.cert_pem(), None).await.is_err(), "not yet rotated");

    // As a Secret update does: new key and certificate, from a new CA.
    let second = new_ca.issue("memory-service");
    dir.write("tls.key.new", &second.key);
    dir.write("tls.crt.new", &second.cert);
    std::fs::rename(dir.path().join("tls.key.new"), dir.path().join("tls.key")).expect("swap key");
    std::fs::rename(dir.path().join("tls.crt.new"), dir.path().join("tls.crt")).expect("swap cert");
    // The reload is a background check every 50 ms: retry new connections, bounded.
    let mut rotated = false;
    for _ in 0..200 {
        if let Ok(channel) = tls_channel(server.addr, &new_ca.cert_pem(), None).await {
            rotated = MemoryServiceClient::new(channel).list_pools(ListPoolsRequest {}).await.is_ok();
            if rotated {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rotated, "the new certificate was never served");
}

#[tokio::test]
async fn a_token_added_to_the_file_is_accepted_without_a_restart() {
    let dir = certs::TempDir::new("memory-token-reload");
    let tokens = certs::token_file(&dir, &[("ops", &["admin"], Some(ADMIN))]);
    let mut config = config_with_pools(&[("kv-cache", 1 << 20)]);
    config.security.auth_tokens = Some(tokens);
    config.security.tls_reload = Duration::from_millis(50);
    let server = MemoryServer::start(config).await;
    let mut client = server.client().await;
    let refused = client.list_pools(bearer(ListPoolsRequest {}, VIEWER)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // As a Secret update does: the new file replaces the old one whole.
    let staging = certs::TempDir::new("memory-token-staging");
    let updated = certs::token_file(
        &staging,
        &[("ops", &["admin"], Some(ADMIN)), ("dashboard", &["viewer"], Some(VIEWER))],
    );
    std::fs::copy(&updated, dir.path().join("tokens.toml.new")).expect("stage");
    std::fs::rename(dir.path().join("tokens.toml.new"), dir.path().join("tokens.toml")).expect("swap");
    let mut accepted = false;
    for _ in 0..200 {
        if client.list_pools(bearer(ListPoolsRequest {}, VIEWER)).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(accepted, "the new token was never accepted");
}
