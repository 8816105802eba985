//! The durable store under `--state-dir`: one redb file holding pools, leases, idempotency
//! records and the epoch. redb gives ACID transactions with an fsync per commit (durability
//! `Immediate`, its default), so a commit that returned is on disk and a crash mid-commit
//! leaves the previous state. Group commit happens one level up (`service::durability`): every
//! change made while a commit is in flight goes into the next one.

mod records;

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use self::records::{LeaseRecord, PoolRecord, ReplayRecord, lease_key};
use crate::ledger::{Batch, Snapshot};

const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const LEASES: TableDefinition<u128, &[u8]> = TableDefinition::new("leases");
const REPLAYS: TableDefinition<&str, &[u8]> = TableDefinition::new("replays");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EPOCH: &str = "epoch";

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
    /// `None` after a failed commit: redb refuses further writes on a database that saw an I/O
    /// error until it is opened again (which checks and repairs it), so the next commit reopens.
    db: parking_lot::Mutex<Option<Database>>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        let fail = |message: String| StoreError { path: path.display().to_string(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create the state directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        Ok(Store { db: parking_lot::Mutex::new(Some(db)), path })
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// Everything stored.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let db = self.db.lock();
        let db = db.as_ref().ok_or_else(|| self.error("not open"))?;
        let txn = db.begin_read().map_err(|e| self.error(e))?;
        let mut snapshot = Snapshot::default();
        // Tables appear with the first commit; a fresh store has none.
        if let Ok(meta) = txn.open_table(META) {
            snapshot.epoch = meta.get(EPOCH).map_err(|e| self.error(e))?.map(|v| v.value());
        }
        if let Ok(pools) = txn.open_table(POOLS) {
            for entry in pools.iter().map_err(|e| self.error(e))? {
                let (name, value) = entry.map_err(|e| self.error(e))?;
                let record = PoolRecord::decode(value.value()).map_err(|e| self.error(e))?;
                snapshot.pools.push(record.into_stored(name.value()));
            }
        }
        if let Ok(leases) = txn.open_table(LEASES) {
            for entry in leases.iter().map_err(|e| self.error(e))? {
                let (id, value) = entry.map_err(|e| self.error(e))?;
                let record = LeaseRecord::decode(value.value()).map_err(|e| self.error(e))?;
                snapshot.leases.push(record.into_stored(id.value()));
            }
        }
        if let Ok(replays) = txn.open_table(REPLAYS) {
            for entry in replays.iter().map_err(|e| self.error(e))? {
                let (key, value) = entry.map_err(|e| self.error(e))?;
                let record = ReplayRecord::decode(value.value()).map_err(|e| self.error(e))?;
                snapshot.replays.push(record.into_stored(key.value()));
            }
        }
        Ok(snapshot)
    }

    /// Writes `batch` in one transaction and waits for it to be on disk (fsync).
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut db = self.db.lock();
        if db.is_none() {
            *db = Some(Database::create(&self.path).map_err(|e| self.error(e))?);
        }
        let result =
            Self::write(db.as_ref().ok_or_else(|| self.error("not open"))?, batch).map_err(|e| self.error(e));
        if result.is_err() {
            // Closed now, reopened (and repaired if need be) by the next commit.
            *db = None;
        }
        result
    }

    fn write(db: &Database, batch: &Batch) -> Result<(), Box<dyn std::error::Error>> {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(EPOCH, batch.epoch)?;
            let mut pools = txn.open_table(POOLS)?;
            for pool in &batch.pools {
                let record = PoolRecord::from_stored(pool).encode_to_vec();
                pools.insert(&*pool.name, record.as_slice())?;
            }
            let mut leases = txn.open_table(LEASES)?;
            for (id, lease) in &batch.leases {
                match lease {
                    Some(lease) => {
                        let record = LeaseRecord::from_stored(lease).encode_to_vec();
                        leases.insert(lease_key(*id), record.as_slice())?;
                    }
                    None => {
                        leases.remove(lease_key(*id))?;
                    }
                }
            }
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
        txn.commit()?;
        Ok(())
    }
}
