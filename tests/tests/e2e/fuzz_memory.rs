//! Fuzzing every memory-service handler with arbitrary decoded messages, over a real socket:
//! nothing panics, every refusal is a proper status (a code a caller can act on, a message that
//! says why, bounded in size), and the books still balance afterwards. Bounded: 128 cases of up
//! to 24 calls in CI (`PROPTEST_CASES` raises it).

use std::time::Duration;

use e2e::{MemoryServer, config_with_pools};
use proptest::prelude::*;
use proto::memory::v1::{
    AllocateRequest, AllocationItem, CanAllocateRequest, CreatePoolRequest, FreeRequest, FreeScopeRequest,
    GetPoolStatsRequest, KeepAliveRequest, ListPoolsRequest, ReclaimableSet, RenewLeaseRequest,
    WatchEventsRequest, memory_service_client::MemoryServiceClient,
};
use tonic::{Code, transport::Channel};

/// Text a caller might send: valid names, ids, junk, control characters, huge strings.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("kv-cache".to_owned()),
        Just("activations".to_owned()),
        Just(String::new()),
        "[a-z0-9-]{1,70}",
        "[0-9a-f]{32}",
        "\\PC{0,40}",
        ".{0,20}",
        (1usize..20_000).prop_map(|n| "x".repeat(n)),
        Just("a\u{0}b\nc".to_owned()),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4096, Just(u64::MAX), Just(1 << 62), Just((1 << 62) + 1), any::<u64>()]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (0i64..5, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ]
}

fn items() -> impl Strategy<Value = Vec<AllocationItem>> {
    prop::collection::vec(
        (text(), size()).prop_map(|(pool, size_bytes)| AllocationItem { pool, size_bytes }),
        0..70,
    )
}

#[derive(Debug, Clone)]
enum Call {
    CreatePool(CreatePoolRequest),
    ListPools,
    GetPoolStats(String),
    CanAllocate(Vec<AllocationItem>),
    Allocate(AllocateRequest),
    Renew(String),
    Free(String),
    FreeScope(String),
    KeepAlive(Vec<KeepAliveRequest>),
    Watch(WatchEventsRequest),
}

fn call() -> impl Strategy<Value = Call> {
    let allocate = (items(), text(), text(), duration(), prop_oneof![Just(None), duration()], text())
        .prop_map(|(items, holder, scope_id, ttl, max_wait, request_id)| {
            // Waits stay short so a case cannot stall the run.
            let max_wait = max_wait.map(|mut d| {
                d.seconds = d.seconds.clamp(-1, 0);
                d
            });
            Call::Allocate(AllocateRequest { items, holder, scope_id, ttl, max_wait, request_id })
        });
    let keepalive = prop::collection::vec(
        (
            prop::collection::vec(text(), 0..40),
            prop::collection::vec(text(), 0..70),
            prop::option::of(prop::collection::vec(text(), 0..40)),
        )
            .prop_map(|(lease_ids, scope_ids, offered)| KeepAliveRequest {
                lease_ids,
                scope_ids,
                reclaimable: offered.map(|lease_ids| ReclaimableSet { lease_ids }),
            }),
        0..4,
    );
    prop_oneof![
        (text(), size())
            .prop_map(|(name, capacity_bytes)| Call::CreatePool(CreatePoolRequest { name, capacity_bytes })),
        Just(Call::ListPools),
        text().prop_map(Call::GetPoolStats),
        items().prop_map(Call::CanAllocate),
        allocate,
        text().prop_map(Call::Renew),
        text().prop_map(Call::Free),
        text().prop_map(Call::FreeScope),
        keepalive.prop_map(Call::KeepAlive),
        (
            prop::collection::vec(text(), 0..5),
            prop::collection::vec(any::<i32>(), 0..5),
            prop_oneof![Just(0u64), any::<u64>()],
            prop_oneof![Just(0u64), any::<u64>()],
        )
            .prop_map(|(pools, kinds, resume_after_sequence, resume_epoch)| {
                Call::Watch(WatchEventsRequest { pools, kinds, resume_after_sequence, resume_epoch })
            }),
    ]
}

/// A refusal a caller can act on: the right family of code, a message saying why, bounded.
fn check(status: &tonic::Status) -> Result<(), TestCaseError> {
    e2e::proper_refusal(
        status,
        &[
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::OutOfRange,
        ],
    )
    .map_err(TestCaseError::fail)
}

async fn run(client: &mut MemoryServiceClient<Channel>, call: Call) -> Result<(), TestCaseError> {
    let result = match call {
        Call::CreatePool(r) => client.create_pool(r).await.map(drop),
        Call::ListPools => client.list_pools(ListPoolsRequest {}).await.map(drop),
        Call::GetPoolStats(name) => client.get_pool_stats(GetPoolStatsRequest { name }).await.map(drop),
        Call::CanAllocate(items) => client.can_allocate(CanAllocateRequest { items }).await.map(drop),
        Call::Allocate(r) => client.allocate(r).await.map(drop),
        Call::Renew(lease_id) => client.renew_lease(RenewLeaseRequest { lease_id }).await.map(drop),
        Call::Free(lease_id) => client.free(FreeRequest { lease_id }).await.map(drop),
        Call::FreeScope(scope_id) => client.free_scope(FreeScopeRequest { scope_id }).await.map(drop),
        Call::KeepAlive(messages) => match client.keep_alive(tokio_stream::iter(messages)).await {
            Ok(replies) => {
                let mut replies = replies.into_inner();
                loop {
                    match replies.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break Ok(()),
                        Err(status) => break Err(status),
                    }
                }
            }
            Err(status) => Err(status),
        },
        Call::Watch(r) => client.watch_events(r).await.map(drop),
    };
    match result {
        Ok(()) => Ok(()),
        Err(status) => check(&status),
    }
}

#[test]
fn every_handler_answers_arbitrary_messages_with_a_proper_status() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime
        .block_on(MemoryServer::start(config_with_pools(&[("kv-cache", 1 << 20), ("activations", 4096)])));
    let client = runtime.block_on(server.client());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128);
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    runner
        .run(&prop::collection::vec(call(), 1..24), |calls| {
            let mut client = client.clone();
            runtime.block_on(async {
                for call in calls {
                    tokio::time::timeout(Duration::from_secs(10), run(&mut client, call))
                        .await
                        .map_err(|_| TestCaseError::fail("a call hung"))??;
                }
                // The server is alive and its books balance.
                let pools = client
                    .list_pools(ListPoolsRequest {})
                    .await
                    .map_err(|s| TestCaseError::fail(s.to_string()))?;
                for pool in pools.into_inner().pools {
                    prop_assert_eq!(pool.used_bytes + pool.available_bytes, pool.capacity_bytes);
                    prop_assert_eq!(
                        pool.granted_total,
                        pool.freed_total + pool.expired_total + pool.live_leases
                    );
                }
                Ok(())
            })
        })
        .expect("no handler misbehaved");
    drop(client);
    runtime.block_on(server.stop());
}
