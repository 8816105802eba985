//! Unit tests of the bounds, the head-of-line policy and per-holder scopes.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::*;

fn request(holder: &str, items: &[(&str, u64)], scope: Option<&str>) -> AllocRequest {
    AllocRequest {
        items: items.iter().map(|(p, s)| (p.to_string(), *s)).collect(),
        holder: Arc::from(holder),
        scope: scope.map(Arc::from),
        ttl: Duration::from_secs(30),
        request_id: None,
    }
}

fn ledger(limits: Limits) -> Ledger {
    let mut ledger = Ledger::new(64);
    ledger.set_limits(limits);
    for (name, capacity) in [("a", 100), ("b", 100), ("c", 100)] {
        ledger.create_pool(name, capacity).expect("fresh pool");
    }
    ledger
}

fn limit_of(result: Result<AllocateOutcome, Error>) -> &'static str {
    match result {
        Err(Error::LimitReached { what, .. }) => what,
        other => panic!("expected a limit, got {other:?}"),
    }
}

#[test]
fn a_waiter_on_a_full_pool_does_not_freeze_the_other_pools_it_names() {
    let mut ledger = ledger(Limits::default());
    let now = Instant::now();
    // c is full; a request for a little of a and b and much of c waits.
    let Ok(AllocateOutcome::Granted(_)) = ledger.allocate(request("x", &[("c", 100)], None), now, false)
    else {
        panic!("c fills")
    };
    let Ok(AllocateOutcome::Queued { .. }) =
        ledger.allocate(request("y", &[("a", 10), ("b", 10), ("c", 50)], None), now, true)
    else {
        panic!("waits for c")
    };
    // Requests on a and b that leave room for the waiter pass it, with or without a wait.
    assert!(matches!(
        ledger.allocate(request("z", &[("a", 90)], None), now, false),
        Ok(AllocateOutcome::Granted(_))
    ));
    assert!(matches!(
        ledger.allocate(request("z", &[("b", 50)], None), now, true),
        Ok(AllocateOutcome::Granted(_))
    ));
    // One that would eat into the room the waiter needs does not.
    let err = ledger.allocate(request("z", &[("a", 1)], None), now, false).unwrap_err();
    assert!(matches!(err, Error::NoRoom { ref pool, .. } if pool == "a"), "{err:?}");
    ledger.check_invariants().unwrap();
}

#[test]
fn a_large_waiter_is_not_starved_by_small_requests() {
    let mut ledger = ledger(Limits::default());
    let now = Instant::now();
    let Ok(AllocateOutcome::Granted(first)) = ledger.allocate(request("x", &[("a", 60)], None), now, false)
    else {
        panic!("fits")
    };
    let Ok(AllocateOutcome::Queued { grant: mut big, .. }) =
        ledger.allocate(request("y", &[("a", 50)], None), now, true)
    else {
        panic!("waits")
    };
    // 40 bytes are free, but all are owed to the waiter.
    assert!(ledger.allocate(request("z", &[("a", 10)], None), now, false).is_err());
    ledger.free(first.leases[0].id, now).unwrap();
    assert_eq!(big.try_recv().expect("granted").expect("a grant").leases[0].size, 50);
    ledger.check_invariants().unwrap();
}

#[test]
fn lease_bounds_hold_per_holder_in_all_and_per_scope() {
    let limits = Limits { leases: 5, leases_per_holder: 3, scope_members: 2, ..Limits::default() };
    let mut ledger = ledger(limits);
    let now = Instant::now();
    assert!(ledger.allocate(request("x", &[("a", 1), ("a", 1)], Some("s")), now, false).is_ok());
    assert_eq!(
        limit_of(ledger.allocate(request("x", &[("a", 1)], Some("s")), now, false)),
        "leases per scope"
    );
    assert!(ledger.allocate(request("x", &[("a", 1)], None), now, false).is_ok());
    assert_eq!(limit_of(ledger.allocate(request("x", &[("a", 1)], None), now, false)), "leases per holder");
    assert!(ledger.allocate(request("y", &[("a", 1), ("b", 1)], None), now, false).is_ok());
    assert_eq!(limit_of(ledger.allocate(request("z", &[("a", 1)], None), now, false)), "leases");
    ledger.check_invariants().unwrap();
}

#[test]
fn waiter_bounds_hold_per_pool_and_per_holder() {
    let limits = Limits { waiters_per_pool: 2, waiters_per_holder: 1, ..Limits::default() };
    let mut ledger = ledger(limits);
    let now = Instant::now();
    assert!(ledger.allocate(request("x", &[("a", 100)], None), now, false).is_ok());
    let mut queued = Vec::new();
    for holder in ["p", "q"] {
        match ledger.allocate(request(holder, &[("a", 10)], None), now, true) {
            Ok(AllocateOutcome::Queued { grant, .. }) => queued.push(grant),
            other => panic!("expected to wait, got {other:?}"),
        }
    }
    assert_eq!(limit_of(ledger.allocate(request("r", &[("a", 10)], None), now, true)), "waiters per pool");
    assert_eq!(
        limit_of(
            ledger
                .allocate(request("p", &[("b", 100), ("c", 100)], None), now, true)
                .and_then(|_| { ledger.allocate(request("p", &[("b", 100)], None), now, true) })
        ),
        "waiting Allocate calls per holder"
    );
    ledger.check_invariants().unwrap();
}

#[test]
fn the_pool_bound_holds() {
    let mut ledger = ledger(Limits { pools: 4, ..Limits::default() });
    assert!(ledger.create_pool("d", 1).is_ok());
    assert!(matches!(ledger.create_pool("e", 1), Err(Error::LimitReached { what: "pools", .. })));
}

#[test]
fn per_holder_scopes_keep_holders_apart() {
    let mut ledger = ledger(Limits::default());
    ledger.set_scopes_per_holder(true);
    let now = Instant::now();
    let Ok(AllocateOutcome::Granted(mine)) =
        ledger.allocate(request("alice", &[("a", 10)], Some("s")), now, false)
    else {
        panic!("fits")
    };
    assert!(ledger.allocate(request("bob", &[("a", 20)], Some("s")), now, false).is_ok());
    assert_eq!(ledger.free_scope("bob", "s", now), (1, 20));
    assert_eq!(ledger.scope_ids("alice", "s", now), vec![mine.leases[0].id]);
    assert!(matches!(ledger.check_owner(mine.leases[0].id, "bob"), Err(Error::PermissionDenied(_))));
    assert!(ledger.check_owner(mine.leases[0].id, "alice").is_ok());
    ledger.check_invariants().unwrap();
}
