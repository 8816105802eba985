//! Every memory-service RPC over real gRPC on loopback, including its misuse and the status code
//! each misuse earns.

use std::time::Duration;

use e2e::{MemoryServer, alloc, pb_duration, stats};
use proto::memory::v1::{
    AllocationItem, CanAllocateRequest, CreatePoolRequest, FreeRequest, FreeScopeRequest, ListPoolsRequest,
    RenewLeaseRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

#[tokio::test]
async fn pools_are_created_listed_and_described() {
    let server = MemoryServer::start(memory_service::Config::default()).await;
    let mut client = server.client().await;

    let listed = client.list_pools(ListPoolsRequest {}).await.unwrap().into_inner();
    let names: Vec<_> = listed.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["activations", "kv-cache", "uniforms"], "defaults, sorted by name");
    assert_ne!(listed.server_epoch, 0);

    let created = client
        .create_pool(CreatePoolRequest { name: "scratch".into(), capacity_bytes: 4096 })
        .await
        .unwrap()
        .into_inner();
    let pool = created.pool.unwrap();
    assert_eq!((pool.capacity_bytes, pool.available_bytes, pool.used_bytes), (4096, 4096, 0));
    assert_eq!(created.server_epoch, listed.server_epoch, "same server, same epoch");

    let dup = client.create_pool(CreatePoolRequest { name: "scratch".into(), capacity_bytes: 1 }).await;
    assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);
    for (name, capacity) in [("Bad_Name", 1), ("", 1), ("-x", 1), ("ok-name", 0)] {
        let err = client.create_pool(CreatePoolRequest { name: name.into(), capacity_bytes: capacity }).await;
        let err = err.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}/{capacity}: {err:?}");
        assert!(err.get_error_details().bad_request().is_some(), "field violation attached");
    }

    assert_eq!(stats(&mut client, "scratch").await.capacity_bytes, 4096);
    let missing = client.get_pool_stats(proto::memory::v1::GetPoolStatsRequest { name: "nope".into() }).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn allocate_free_and_renew_keep_the_books() {
    let server = MemoryServer::with_pools(&[("kv-cache", 1000), ("activations", 100)]).await;
    let mut client = server.client().await;

    let mut req = alloc(&[("kv-cache", 600), ("activations", 40)]);
    req.scope_id = "gen-1".into();
    req.ttl = Some(pb_duration(Duration::from_secs(5)));
    let granted = client.allocate(req).await.unwrap().into_inner();
    assert_eq!(granted.leases.len(), 2);
    let kv = &granted.leases[0];
    assert_eq!((kv.pool.as_str(), kv.size_bytes, kv.scope_id.as_str()), ("kv-cache", 600, "gen-1"));
    assert_eq!(kv.lease_id.len(), 32);
    assert_eq!(kv.ttl, Some(pb_duration(Duration::from_secs(5))));
    assert!(kv.expire_time.is_some());

    let kv_stats = stats(&mut client, "kv-cache").await;
    assert_eq!((kv_stats.used_bytes, kv_stats.available_bytes, kv_stats.live_leases), (600, 400, 1));

    let can = client
        .can_allocate(CanAllocateRequest {
            items: vec![AllocationItem { pool: "kv-cache".into(), size_bytes: 500 }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!can.can_allocate_now && can.fits_capacity);
    assert_eq!(can.pools[0].available_bytes, 400);

    let renewed =
        client.renew_lease(RenewLeaseRequest { lease_id: kv.lease_id.clone() }).await.unwrap().into_inner();
    let secs = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    assert!(secs(renewed.lease.unwrap().expire_time) >= secs(kv.expire_time));

    let freed = client.free(FreeRequest { lease_id: kv.lease_id.clone() }).await.unwrap().into_inner();
    assert_eq!(freed.lease.unwrap().size_bytes, 600);
    let again = client.free(FreeRequest { lease_id: kv.lease_id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "double free");
    let renew_freed = client.renew_lease(RenewLeaseRequest { lease_id: kv.lease_id.clone() }).await;
    assert_eq!(renew_freed.unwrap_err().code(), Code::NotFound);

    let scope = client.free_scope(FreeScopeRequest { scope_id: "gen-1".into() }).await.unwrap().into_inner();
    assert_eq!((scope.freed_leases, scope.freed_bytes), (1, 40));
    let empty = client.free_scope(FreeScopeRequest { scope_id: "gen-1".into() }).await.unwrap().into_inner();
    assert_eq!(empty.freed_leases, 0);

    let kv_stats = stats(&mut client, "kv-cache").await;
    assert_eq!((kv_stats.used_bytes, kv_stats.granted_total, kv_stats.freed_total), (0, 1, 1));
    server.stop().await;
}

#[tokio::test]
async fn misuse_gets_precise_codes_and_numbers() {
    let server = MemoryServer::with_pools(&[("kv-cache", 1000)]).await;
    let mut client = server.client().await;

    let too_big = client.allocate(alloc(&[("kv-cache", 1001)])).await.unwrap_err();
    assert_eq!(too_big.code(), Code::FailedPrecondition);
    assert!(
        too_big.message().contains("1001") && too_big.message().contains("1000"),
        "{}",
        too_big.message()
    );

    let unknown = client.allocate(alloc(&[("nope", 1)])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let _hold = client.allocate(alloc(&[("kv-cache", 900)])).await.unwrap();
    let no_room = client.allocate(alloc(&[("kv-cache", 200)])).await.unwrap_err();
    assert_eq!(no_room.code(), Code::ResourceExhausted);
    assert!(no_room.message().contains("100 of 1000"), "{}", no_room.message());
    assert!(no_room.get_error_details().retry_info().is_some(), "retry hint attached");

    let mut cases = Vec::new();
    let mut no_holder = alloc(&[("kv-cache", 1)]);
    no_holder.holder.clear();
    cases.push(("holder", no_holder));
    cases.push(("items", alloc(&[])));
    cases.push(("size", alloc(&[("kv-cache", 0)])));
    let mut zero_ttl = alloc(&[("kv-cache", 1)]);
    zero_ttl.ttl = Some(pb_duration(Duration::ZERO));
    cases.push(("zero ttl", zero_ttl));
    let mut sub_ms_ttl = alloc(&[("kv-cache", 1)]);
    sub_ms_ttl.ttl = Some(prost_types::Duration { seconds: 1, nanos: 1 });
    cases.push(("sub-ms ttl", sub_ms_ttl));
    let mut huge_ttl = alloc(&[("kv-cache", 1)]);
    huge_ttl.ttl = Some(pb_duration(Duration::from_secs(100_000)));
    cases.push(("huge ttl", huge_ttl));
    let mut negative_wait = alloc(&[("kv-cache", 1)]);
    negative_wait.max_wait = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    cases.push(("negative wait", negative_wait));
    let mut control = alloc(&[("kv-cache", 1)]);
    control.scope_id = "a\u{7}b".into();
    cases.push(("control char", control));
    for (what, req) in cases {
        let err = client.allocate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }

    for bad in ["", "not-hex", "ABCDEF0123456789ABCDEF0123456789"] {
        let err = client.free(FreeRequest { lease_id: bad.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    let unknown_lease = client.free(FreeRequest { lease_id: "0".repeat(32) }).await.unwrap_err();
    assert_eq!(unknown_lease.code(), Code::NotFound);
    let no_scope = client.free_scope(FreeScopeRequest { scope_id: String::new() }).await.unwrap_err();
    assert_eq!(no_scope.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn idempotent_retry_returns_the_same_leases() {
    let server = MemoryServer::with_pools(&[("kv-cache", 1000)]).await;
    let mut client = server.client().await;
    let mut req = alloc(&[("kv-cache", 300)]);
    req.request_id = "req-42".into();

    let first = client.allocate(req.clone()).await.unwrap().into_inner();
    let retry = client.allocate(req.clone()).await.unwrap().into_inner();
    assert!(!first.replayed && retry.replayed);
    assert_eq!(first.leases[0].lease_id, retry.leases[0].lease_id);
    let kv = stats(&mut client, "kv-cache").await;
    assert_eq!((kv.used_bytes, kv.granted_total), (300, 1), "allocated once");

    req.items[0].size_bytes = 301;
    let changed = client.allocate(req).await.unwrap_err();
    assert_eq!(changed.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let server = MemoryServer::with_pools(&[("kv-cache", 1)]).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "memory.v1.MemoryService"] {
        let reply = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    // Its own API only (not runtime.v1), plus health and reflection.
    assert_eq!(
        e2e::reflected_services(channel.clone()).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "memory.v1.MemoryService"
        ]
    );
    let mut reflection = ServerReflectionClient::new(channel);
    // The google.rpc detail types every error carries resolve, so grpcurl and buf curl decode them.
    for symbol in ["google.rpc.BadRequest", "google.rpc.RetryInfo", "google.rpc.Status"] {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut replies =
            reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let reply = replies.next().await.unwrap().unwrap().message_response;
        assert!(matches!(reply, Some(MessageResponse::FileDescriptorResponse(_))), "{symbol}: {reply:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_violation_of_a_request_is_listed() {
    use proto::memory::v1::{AllocationItem, CreatePoolRequest};
    let server = MemoryServer::with_pools(&[("kv-cache", 1 << 20)]).await;
    let mut client = server.client().await;
    let mut bad = alloc(&[("kv-cache", 0)]);
    bad.items.push(AllocationItem { pool: "Not A Pool".into(), size_bytes: 1 });
    bad.holder = String::new();
    bad.ttl = Some(pb_duration(std::time::Duration::from_micros(1500)));
    let err = client.allocate(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let fields = e2e::bad_request_fields(&err);
    assert_eq!(fields, ["items[0].size_bytes", "items[1].pool", "holder", "ttl"], "{}", err.message());
    let err = client
        .create_pool(CreatePoolRequest { name: "Bad Name".into(), capacity_bytes: 0 })
        .await
        .unwrap_err();
    let fields = e2e::bad_request_fields(&err);
    assert_eq!(fields, ["name", "capacity_bytes"]);
    server.stop().await;
}

/// A megabyte of caller input is quoted cut short: echoed in full, the status's trailers would
/// pass the client's header-list limit and the caller would see RESOURCE_EXHAUSTED from its own
/// transport instead of the real code.
#[tokio::test]
async fn errors_quote_huge_input_cut_short() {
    use proto::memory::v1::{GetPoolStatsRequest, WatchEventsRequest};
    let server = MemoryServer::with_pools(&[("kv-cache", 1000)]).await;
    let mut client = server.client().await;
    let huge = "x".repeat(1 << 20);
    let short = |err: &tonic::Status| {
        let size = err.message().len() + err.details().len();
        assert!(size < 1024, "{size} bytes of message and details: {}", err.message());
    };

    let err = client.free(FreeRequest { lease_id: huge.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    short(&err);
    let err = client.renew_lease(RenewLeaseRequest { lease_id: huge.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    short(&err);
    let err = client.get_pool_stats(GetPoolStatsRequest { name: huge.clone() }).await.unwrap_err();
    assert!(matches!(err.code(), Code::InvalidArgument | Code::NotFound), "{err:?}");
    short(&err);
    let watch = WatchEventsRequest { pools: vec![huge.clone()], kinds: vec![], ..Default::default() };
    let err = client.watch_events(watch).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    short(&err);
    server.stop().await;
}

/// A KeepAliveRequest as the wire sees it, but with bytes where the server expects UTF-8: the
/// only way a well-behaved client library can send a message the server cannot decode.
#[derive(Clone, PartialEq, prost::Message)]
struct RawKeepAlive {
    #[prost(bytes = "vec", repeated, tag = "1")]
    lease_ids: Vec<Vec<u8>>,
}

/// An undecodable message on a KeepAlive stream ends it with INVALID_ARGUMENT saying why, not a
/// silent OK that leaves the client's later renewals unanswered.
#[tokio::test]
async fn an_undecodable_keep_alive_message_ends_the_stream_with_invalid_argument() {
    use proto::memory::v1::KeepAliveResponse;
    let server = MemoryServer::with_pools(&[("kv-cache", 1000)]).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("channel ready");
    let invalid_utf8 = RawKeepAlive { lease_ids: vec![vec![0xff, 0xfe]] };
    let path = http::uri::PathAndQuery::from_static("/memory.v1.MemoryService/KeepAlive");
    let codec = tonic_prost::ProstCodec::<RawKeepAlive, KeepAliveResponse>::default();
    let requests = tokio_stream::iter([invalid_utf8]);
    let mut replies =
        grpc.streaming(tonic::Request::new(requests), path, codec).await.expect("opened").into_inner();
    let err = replies.message().await.expect_err("an error status, not OK");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("decoded"), "{}", err.message());
    server.stop().await;
}
