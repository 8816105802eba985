//! 32 concurrent clients × 1,000 random operations against one server over loopback. Afterwards
//! every pool is back to zero and the counters add up.

use std::time::Duration;

use e2e::{MemoryServer, alloc, pb_duration};
use proto::memory::v1::{
    CanAllocateRequest, FreeRequest, FreeScopeRequest, GetPoolStatsRequest, ListPoolsRequest,
    RenewLeaseRequest,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

const CLIENTS: u64 = 32;
const OPS: usize = 1_000;
const POOLS: [&str; 3] = ["kv-cache", "activations", "uniforms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_operations_leave_the_books_exact() {
    let server =
        MemoryServer::with_pools(&[("kv-cache", 4_000), ("activations", 1_000), ("uniforms", 500)]).await;
    let mut tasks = Vec::new();
    for client_id in 0..CLIENTS {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(client_id);
            let mut held: Vec<String> = Vec::new();
            let mut refusals = 0u64;
            let scope = format!("client-{client_id}");
            for _ in 0..OPS {
                match rng.next_u32() % 8 {
                    0..=2 => {
                        let n = 1 + rng.next_u32() as usize % 3;
                        let items: Vec<_> = (0..n)
                            .map(|_| {
                                (POOLS[rng.next_u32() as usize % 3], 1 + u64::from(rng.next_u32() % 200))
                            })
                            .collect();
                        let mut req = alloc(&items);
                        if rng.next_u32() % 2 == 0 {
                            req.scope_id = scope.clone();
                        }
                        if rng.next_u32() % 4 == 0 {
                            req.max_wait =
                                Some(pb_duration(Duration::from_millis(u64::from(rng.next_u32() % 20))));
                        }
                        match client.allocate(req).await {
                            Ok(reply) => {
                                held.extend(reply.into_inner().leases.into_iter().map(|l| l.lease_id))
                            }
                            Err(status) => {
                                assert!(
                                    matches!(
                                        status.code(),
                                        Code::ResourceExhausted | Code::FailedPrecondition
                                    ),
                                    "{status:?}"
                                );
                                refusals += 1;
                            }
                        }
                    }
                    3 | 4 if !held.is_empty() => {
                        let id = held.swap_remove(rng.next_u32() as usize % held.len());
                        if let Err(status) = client.free(FreeRequest { lease_id: id }).await {
                            // Freed earlier through its scope.
                            assert_eq!(status.code(), Code::NotFound, "{status:?}");
                        }
                    }
                    5 if !held.is_empty() => {
                        let id = held[rng.next_u32() as usize % held.len()].clone();
                        if let Err(status) = client.renew_lease(RenewLeaseRequest { lease_id: id }).await {
                            assert_eq!(status.code(), Code::NotFound, "{status:?}");
                        }
                    }
                    6 => {
                        client.free_scope(FreeScopeRequest { scope_id: scope.clone() }).await.unwrap();
                    }
                    _ => {
                        let pool = POOLS[rng.next_u32() as usize % 3];
                        let stats =
                            client.get_pool_stats(GetPoolStatsRequest { name: pool.into() }).await.unwrap();
                        let stats = stats.into_inner().pool.unwrap();
                        assert_eq!(stats.used_bytes + stats.available_bytes, stats.capacity_bytes);
                        let items = alloc(&[(pool, 1)]).items;
                        client.can_allocate(CanAllocateRequest { items }).await.unwrap();
                    }
                }
            }
            client.free_scope(FreeScopeRequest { scope_id: scope }).await.unwrap();
            for id in held {
                let _ = client.free(FreeRequest { lease_id: id }).await;
            }
            refusals
        }));
    }
    let mut refusals = 0;
    for task in tasks {
        refusals += task.await.expect("client task");
    }

    let mut client = server.client().await;
    let pools = client.list_pools(ListPoolsRequest {}).await.unwrap().into_inner().pools;
    let mut granted = 0;
    let mut charged = 0;
    for pool in pools {
        charged += pool.rejected_total + pool.wait_timeouts_total;
        assert_eq!((pool.used_bytes, pool.live_leases, pool.waiters), (0, 0, 0), "{pool:?}");
        assert_eq!(pool.available_bytes, pool.capacity_bytes);
        assert_eq!(pool.granted_total, pool.freed_total + pool.expired_total, "{pool:?}");
        assert_eq!(pool.granted_bytes_total, pool.released_bytes_total, "{pool:?}");
        assert!(pool.peak_used_bytes <= pool.capacity_bytes);
        granted += pool.granted_total;
    }
    assert!(granted > 1_000, "the load really allocated ({granted} leases)");
    // Each refusal a client saw is charged to the one to three pools that blocked it.
    assert!(refusals > 0, "the load really contended");
    assert!(charged >= refusals && charged <= 3 * refusals, "{charged} charges for {refusals} refusals");
    server.stop().await;
}
