//! The durable store under `--state-dir`: one redb file holding pools, leases, idempotency
//! records and the epoch. redb gives ACID transactions with an fsync per commit (durability
//! `Immediate`, its default), so a commit that returned is on disk and a crash mid-commit
//! leaves the previous state. Group commit happens one level up (`service::durability`): every
//! change made while a commit is in flight goes into the next one.

mod leases;
mod records;

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use self::{
    leases::{LEASES, LeaseKeys},
    records::{EventRecord, PoolRecord, ReplayRecord},
};
use crate::ledger::{Batch, Snapshot};

const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const REPLAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("replays");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The latest events, by sequence number: watchers resume from them after a restart.
const EVENT_TAIL: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EPOCH: &str = "epoch";
/// The sequence number of the latest event released: watchers resume by it across a restart.
const EVENTS: &str = "events";

/// The file in the state directory.
pub const FILE: &str = "ledger.redb";

/// Why the store failed; the message names the file and what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

/// The opened store.
#[derive(Debug)]
pub struct Store {
    open: parking_lot::Mutex<Opened>,
    path: PathBuf,
}

/// The database and what is known to be in it, changed together by a commit.
#[derive(Debug)]
struct Opened {
    /// `None` after a failed commit: redb refuses further writes on a database that saw an I/O
    /// error until it is opened again (which checks and repairs it), so the next commit reopens.
    db: Option<Database>,
    /// The epoch known to be on disk. It never changes while the server runs, so only the first
    /// commit of an opening writes it (rewriting its table in every commit cost a page copy per
    /// fsync).
    epoch_on_disk: Option<u64>,
    /// The event sequence known to be on disk: written only by commits that move it.
    events_on_disk: Option<u64>,
    /// Where each stored lease is (see `leases`). `None` until read from this opening of `db`.
    keys: Option<LeaseKeys>,
}

/// Opens (creating if needed) the redb file at `path`, verifying every page's checksum first.
/// A plain open trusts the file and may panic on a damaged one (redb's documentation says so, and
/// a test here flipping bytes found it: 12 panics in 121 damaged copies); checked, a damaged
/// file is an error naming it, and the server refuses to start instead of crashing or serving
/// from it. The check reads the whole file once per open: 9–15 ms for 100,000 leases here
/// (against 0.2–1.5 ms unchecked; reading them back takes 100 ms anyway), at start-up and when a
/// commit reopens the file after a failure. A failed check says what to do about it, whichever
/// of the two opens meets it.
fn open_checked(path: &Path) -> Result<Database, String> {
    Database::builder().set_check_integrity_on_open(true).create(path).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => format!(
            "{e}: the file is damaged. Restore it from a backup, or move it away to start with an \
             empty ledger (every lease it holds is then forgotten: stop the holders first, or wait \
             one TTL)"
        ),
        e => e.to_string(),
    })
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        let fail = |message: String| StoreError { path: path.display().to_string(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create the state directory: {e}")))?;
        let db = open_checked(&path).map_err(fail)?;
        let moved = leases::migrate(&db)
            .map_err(|e| fail(format!("cannot move leases to the current layout: {e}")))?;
        if moved > 0 {
            tracing::info!(leases = moved, "leases moved to the current store layout");
        }
        let opened = Opened { db: Some(db), epoch_on_disk: None, events_on_disk: None, keys: None };
        Ok(Store { open: parking_lot::Mutex::new(opened), path })
    }

    /// A table that may not exist yet: tables appear with the first commit, so a fresh store has
    /// none. Any other failure to open one (a corrupt or foreign file) is an error: never start
    /// as if the store were empty.
    fn existing<T>(&self, opened: Result<T, TableError>) -> Result<Option<T>, StoreError> {
        match opened {
            Ok(table) => Ok(Some(table)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// Everything stored.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut open = self.open.lock();
        let db = open.db.as_ref().ok_or_else(|| self.error("not open"))?;
        let txn = db.begin_read().map_err(|e| self.error(e))?;
        let mut snapshot = Snapshot::default();
        if let Some(meta) = self.existing(txn.open_table(META))? {
            snapshot.epoch = meta.get(EPOCH).map_err(|e| self.error(e))?.map(|v| v.value());
            snapshot.events = meta.get(EVENTS).map_err(|e| self.error(e))?.map_or(0, |v| v.value());
        }
        if let Some(pools) = self.existing(txn.open_table(POOLS))? {
            for entry in pools.iter().map_err(|e| self.error(e))? {
                let (name, value) = entry.map_err(|e| self.error(e))?;
                let record = PoolRecord::decode(value.value()).map_err(|e| self.error(e))?;
                snapshot.pools.push(record.into_stored(name.value()));
            }
        }
        if let Some(replays) = self.existing(txn.open_table(REPLAYS))? {
            for entry in replays.iter().map_err(|e| self.error(e))? {
                let (key, value) = entry.map_err(|e| self.error(e))?;
                let record = ReplayRecord::decode(value.value()).map_err(|e| self.error(e))?;
                snapshot.replays.push(record.into_stored(key.value()));
            }
        }
        if let Some(events) = self.existing(txn.open_table(EVENT_TAIL))? {
            for entry in events.iter().map_err(|e| self.error(e))? {
                let (sequence, value) = entry.map_err(|e| self.error(e))?;
                let record = EventRecord::decode(value.value()).map_err(|e| self.error(e))?;
                // An event of a kind a later version added is skipped, not an error.
                snapshot.event_tail.extend(record.into_event(sequence.value()));
            }
        }
        drop(txn);
        let (keys, leases) = LeaseKeys::read(db).map_err(|e| self.error(e))?;
        snapshot.leases = leases;
        open.keys = Some(keys);
        open.epoch_on_disk = snapshot.epoch;
        open.events_on_disk = Some(snapshot.events);
        Ok(snapshot)
    }

    /// Writes `batch` in one transaction and waits for it to be on disk (fsync).
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut open = self.open.lock();
        let db = match open.db.take() {
            Some(db) => db,
            None => open_checked(&self.path).map_err(|e| self.error(e))?,
        };
        let with_epoch = open.epoch_on_disk != Some(batch.epoch);
        let with_events = open.events_on_disk != Some(batch.events);
        let keys = match open.keys.take() {
            Some(keys) => Ok(keys),
            None => LeaseKeys::read_keys(&db),
        };
        let result = keys
            .and_then(|mut keys| Self::write(&db, batch, with_epoch, with_events, &mut keys).map(|()| keys))
            .map_err(|e| self.error(e));
        // After a failure the database is dropped (closed) here, and reopened (and repaired if
        // need be) by the next commit, which writes the epoch again and reads the lease keys
        // back from what is on disk (this batch's new keys may not be).
        match result {
            Ok(keys) => {
                *open = Opened {
                    db: Some(db),
                    epoch_on_disk: Some(batch.epoch),
                    events_on_disk: Some(batch.events),
                    keys: Some(keys),
                };
                Ok(())
            }
            Err(e) => {
                *open = Opened { db: None, epoch_on_disk: None, events_on_disk: None, keys: None };
                Err(e)
            }
        }
    }

    fn write(
        db: &Database,
        batch: &Batch,
        with_epoch: bool,
        with_events: bool,
        keys: &mut LeaseKeys,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let txn = db.begin_write()?;
        {
            if with_epoch || with_events {
                let mut meta = txn.open_table(META)?;
                if with_epoch {
                    meta.insert(EPOCH, batch.epoch)?;
                }
                if with_events {
                    meta.insert(EVENTS, batch.events)?;
                }
            }
            // Only the tables with changes are opened: an untouched table costs nothing.
            if !batch.pools.is_empty() {
                let mut pools = txn.open_table(POOLS)?;
                for pool in &batch.pools {
                    let record = PoolRecord::from_stored(pool).encode_to_vec();
                    pools.insert(&*pool.name, record.as_slice())?;
                }
            }
            if !batch.leases.is_empty() || !batch.gone.is_empty() {
                keys.write(&mut txn.open_table(LEASES)?, &batch.leases, &batch.gone)?;
            }
            if !batch.event_records.is_empty() {
                let mut events = txn.open_table(EVENT_TAIL)?;
                for event in &batch.event_records {
                    let record = EventRecord::from_event(event).encode_to_vec();
                    events.insert(event.sequence, record.as_slice())?;
                    // Keep the latest `events_kept`: each new one retires the one that many
                    // before it, so the table never grows past the ring it backs.
                    if let Some(old) = event.sequence.checked_sub(batch.events_kept.max(1)) {
                        events.remove(old)?;
                    }
                }
            }
            if !batch.replays.is_empty() {
                let mut replays = txn.open_table(REPLAYS)?;
                for (key, replay) in &batch.replays {
                    match replay {
                        Some(replay) => {
                            let record = ReplayRecord::from_stored(replay).encode_to_vec();
                            replays.insert(&**key, record.as_slice())?;
                        }
                        None => {
                            replays.remove(&**key)?;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
            let first =
                Batch { seq: 2, pools: vec![pool.clone()], ..batch(vec![lease(1), lease(2)], vec![]) };
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
        Store::open(&dir)
            .unwrap()
            .commit(&batch(vec![renewed.clone()], vec![LeaseId::from_raw(20)]))
            .unwrap();
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
}
