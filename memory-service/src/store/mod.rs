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
mod tests;
