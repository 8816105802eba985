//! The store against a real redb file in a temporary directory: commits read back after a
//! reopen, bulk removals, damaged files, and lease keys rebuilt on open.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::*;
use crate::ledger::{LeaseId, StoredLease, StoredPool};

fn lease(raw: u128) -> StoredLease {
    let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    StoredLease {
        id: LeaseId::from_raw(raw),
        pool: Arc::from("kv-cache"),
        size: 4096,
        holder: Arc::from("runtime-0"),
        scope: Some(Arc::from("model-a")),
        ttl: Duration::from_secs(30),
        deadline: at,
        granted: at - Duration::from_secs(30),
        request_key: None,
    }
}

#[test]
fn commits_read_back_after_a_reopen_with_the_epoch_written_once() {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("store-test-{}-{nanos}", std::process::id()));
    let pool = StoredPool {
        name: Arc::from("kv-cache"),
        capacity: 1 << 30,
        peak_used: 8192,
        counters: crate::ledger::Counters::default(),
    };
    {
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().epoch, None, "a fresh store");
        let first = Batch { seq: 2, pools: vec![pool.clone()], ..batch(vec![lease(1), lease(2)], vec![]) };
        store.commit(&first).unwrap();
        // The second commit does not write the epoch again, and removes a lease.
        let second = Batch { seq: 3, ..batch(vec![], vec![LeaseId::from_raw(1)]) };
        store.commit(&second).unwrap();
    }
    let store = Store::open(&dir).unwrap();
    let snapshot = store.load().unwrap();
    assert_eq!(snapshot.epoch, Some(7));
    assert_eq!(snapshot.pools, vec![pool]);
    assert_eq!(snapshot.leases, vec![lease(2)]);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_mass_removal_takes_the_bulk_path_and_leaves_the_rest() {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("store-bulk-{}-{nanos}", std::process::id()));
    let count = leases::BULK_REMOVAL as u128 + 1000;
    let store = Store::open(&dir).unwrap();
    // Stored in the reverse of their ids' order: keys follow the order of storing.
    store.commit(&batch((1..=count).rev().map(lease).collect(), vec![])).unwrap();
    // All but the last 100 go at once: more than a quarter of the table, so one pass.
    let gone: Vec<LeaseId> = (1..=count - 100).map(LeaseId::from_raw).collect();
    assert!(leases::one_pass(gone.len(), count as u64));
    store.commit(&batch(vec![], gone)).unwrap();
    // A single removal takes the per-key path.
    assert!(!leases::one_pass(1, 100));
    store.commit(&batch(vec![], vec![LeaseId::from_raw(count)])).unwrap();
    let left: Vec<u128> = store.load().unwrap().leases.iter().map(|l| l.id.raw()).collect();
    assert_eq!(left, (count - 99..count).rev().collect::<Vec<_>>());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_file_is_refused_with_an_error_never_a_panic() {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("store-damaged-{}-{nanos}", std::process::id()));
    Store::open(&dir).unwrap().commit(&batch((1..1000).map(lease).collect(), vec![])).unwrap();
    let path = dir.join(FILE);
    let clean = std::fs::read(&path).unwrap();
    // Pages past the header: (refused, read whole).
    let (mut refused, mut read, mut advised) = (0, 0, 0);
    // 8 garbled bytes at a time across the header page (its two commit slots), then 64 at a
    // time across the rest of the file.
    for offset in (0..4096).step_by(61).chain((4096..clean.len()).step_by(2039)) {
        let mut bytes = clean.clone();
        let header = offset < 4096;
        let end = (offset + if header { 8 } else { 64 }).min(bytes.len());
        bytes[offset..end].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(&path, &bytes).unwrap();
        let opened = std::panic::catch_unwind(|| Store::open(&dir).and_then(|store| store.load()));
        match opened {
            Err(_) => panic!("a damaged file (bytes {offset}..{end}) made the open panic"),
            Ok(Err(error)) => {
                let error = error.to_string();
                assert!(error.contains(&*path.to_string_lossy()), "{error}");
                // A checksum that fails says what to do about it.
                advised += usize::from(error.contains("damaged. Restore it from a backup"));
                refused += usize::from(!header);
            }
            // Garbled bytes in pages no tree uses, or in the header's padding, change nothing read.
            Ok(Ok(snapshot)) => {
                assert_eq!(snapshot.leases.len(), 999, "damage read as data (bytes {offset}..{end})");
                read += usize::from(!header);
            }
        }
    }
    assert!(refused > read, "past the header, {refused} damaged copies refused, {read} read whole");
    assert!(advised > 0, "no refusal said the file is damaged");
    let _ = std::fs::remove_dir_all(&dir);
}

fn batch(leases: Vec<StoredLease>, gone: Vec<LeaseId>) -> Batch {
    Batch { seq: 1, epoch: 7, pools: vec![], leases, gone, ..Batch::default() }
}

#[test]
fn a_renewal_or_removal_after_a_reopen_finds_the_lease_where_it_was_stored() {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("store-keys-{}-{nanos}", std::process::id()));
    Store::open(&dir).unwrap().commit(&batch(vec![lease(10), lease(20), lease(30)], vec![])).unwrap();
    // Committed right after opening, without a load first: the keys are read by the commit.
    // The renewed lease is the last stored, so a map wrongly started empty would miss it.
    let renewed = StoredLease { deadline: lease(30).deadline + Duration::from_secs(60), ..lease(30) };
    Store::open(&dir).unwrap().commit(&batch(vec![renewed.clone()], vec![LeaseId::from_raw(20)])).unwrap();
    {
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().leases, vec![lease(10), renewed.clone()]);
        // After a load, and a new lease after the ones stored.
        store.commit(&batch(vec![lease(5)], vec![LeaseId::from_raw(10)])).unwrap();
    }
    let leases = Store::open(&dir).unwrap().load().unwrap().leases;
    assert_eq!(leases, vec![renewed, lease(5)], "each lease once, in the order first stored");
    let _ = std::fs::remove_dir_all(&dir);
}
