//! Where leases sit in the store: keyed by the order they were stored, not by their id.
//!
//! Lease ids are 128 random bits, so a B-tree keyed by them puts each new lease on a random
//! leaf, and a commit of six grants and six frees rewrote about 26 pages (26 `pwrite`s and their
//! writeback before the fsync; 150 µs of CPU user and 160 µs system per commit measured here).
//! Keyed by a counter, every grant lands on the rightmost leaf and a lease freed soon after its
//! grant is still there, so the same commit rewrites about 9 pages (70 µs user, 48 µs system):
//! the reason databases prefer sequential primary keys. The store keeps the id in the record and
//! an in-memory map from id to key, rebuilt whenever the database is opened.
//!
//! The table keeps its name, `leases`, with a new key type. A store of the earlier layout is
//! moved over when opened, in one transaction; an earlier binary opening a moved store then
//! fails to open the table (a type mismatch) and refuses every grant, rather than serving as
//! if no lease were held. There is no way back to the earlier layout.

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

use super::records::LeaseRecord;
use crate::ledger::{LeaseId, LeaseMap, StoredLease};

/// Leases by the order they were stored.
pub(super) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
/// The same table in the earlier layout, keyed by lease id: moved to `LEASES` at open.
const LEASES_BY_ID: TableDefinition<u128, &[u8]> = TableDefinition::new("leases");

/// Removals from which one pass over the table may be cheaper (see `LeaseKeys::write`).
pub(super) const BULK_REMOVAL: usize = 4096;

type Failure = Box<dyn std::error::Error>;

/// The key of every stored lease, and the next key to give: above every key on disk, so a new
/// lease never lands on a stored one. (A key freed at the top of the table may be given again
/// after a reopen: its record is gone.)
#[derive(Debug)]
pub(super) struct LeaseKeys {
    by_id: LeaseMap<u64>,
    next: u64,
}

impl LeaseKeys {
    /// Reads every stored lease: the keys, and each lease decoded.
    pub(super) fn read(db: &Database) -> Result<(Self, Vec<StoredLease>), Failure> {
        let mut leases = Vec::new();
        let keys = Self::scan(db, |record| {
            leases.push(record.into_stored().ok_or("a lease record without a 16-byte id")?);
            Ok(())
        })?;
        Ok((keys, leases))
    }

    /// Reads the keys of every stored lease only (a reopen after a failed commit).
    pub(super) fn read_keys(db: &Database) -> Result<Self, Failure> {
        Self::scan(db, |_| Ok(()))
    }

    fn scan(
        db: &Database,
        mut each: impl FnMut(LeaseRecord) -> Result<(), Failure>,
    ) -> Result<Self, Failure> {
        let mut keys = LeaseKeys { by_id: LeaseMap::default(), next: 1 };
        let txn = db.begin_read()?;
        let table = match txn.open_table(LEASES) {
            Ok(table) => table,
            // Tables appear with the first commit; a fresh store has none.
            Err(TableError::TableDoesNotExist(_)) => return Ok(keys),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let record = LeaseRecord::decode(value.value())?;
            let id = record.id().ok_or("a lease record without a 16-byte id")?;
            // Twice the same lease would be restored once and counted twice, for ever.
            if let Some(first) = keys.by_id.insert(id, key) {
                return Err(format!("lease {id} is stored twice, under keys {first} and {key}").into());
            }
            keys.next = keys.next.max(key.checked_add(1).ok_or("a lease key at the end of the key space")?);
            each(record)?;
        }
        Ok(keys)
    }

    /// The key `id` is stored under, or the next one if it is new.
    fn key_for(&mut self, id: LeaseId) -> u64 {
        let next = &mut self.next;
        *self.by_id.entry(id).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    /// Writes `leases` (granted or renewed) and removes `gone`.
    pub(super) fn write(
        &mut self,
        table: &mut redb::Table<'_, u64, &[u8]>,
        leases: &[StoredLease],
        gone: &[LeaseId],
    ) -> Result<(), redb::StorageError> {
        for lease in leases {
            let key = self.key_for(lease.id);
            table.insert(key, LeaseRecord::from_stored(lease).encode_to_vec().as_slice())?;
        }
        // A lease granted and gone between two commits was never stored: no key, nothing to do.
        let gone: Vec<u64> = gone.iter().filter_map(|id| self.by_id.remove(id)).collect();
        if one_pass(gone.len(), table.len()?) {
            // A mass expiry removes a large share of the table at once: one pass that rebuilds
            // each page once (redb's `retain`) beats as many root-to-leaf descents as there are
            // keys, each copying its page (100,000 single removals took 90 ms here). Keys are
            // numbers in storing order: the pass spans only their range, and a sorted list
            // answers whether a key goes.
            let mut gone = gone;
            gone.sort_unstable();
            let (first, last) = (gone[0], gone[gone.len() - 1]);
            return table.retain_in(first..=last, |key, _| gone.binary_search(&key).is_err());
        }
        for key in gone {
            table.remove(key)?;
        }
        Ok(())
    }
}

/// Whether `removals` from a table of `stored` leases take one `retain_in` pass: many of them,
/// and at least a quarter of the table (a pass visits every lease between the first and the
/// last removed, so a few thousand removals spread over a million leases are cheaper one by one).
pub(super) fn one_pass(removals: usize, stored: u64) -> bool {
    removals >= BULK_REMOVAL && removals as u64 * 4 >= stored
}

/// Moves leases stored by id (the earlier layout) to `LEASES`, in the order they were granted,
/// in one transaction (a crash leaves the earlier layout whole). Returns how many moved.
pub(super) fn migrate(db: &Database) -> Result<usize, Failure> {
    let mut records = Vec::new();
    {
        let txn = db.begin_read()?;
        let table = match txn.open_table(LEASES_BY_ID) {
            Ok(table) => table,
            // A fresh store, or one already in the current layout.
            Err(TableError::TableDoesNotExist(_) | TableError::TableTypeMismatch { .. }) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (id, value) = entry?;
            let mut record = LeaseRecord::decode(value.value())?;
            record.id = id.value().to_be_bytes().to_vec();
            records.push(record);
        }
    }
    records.sort_by(|a, b| (a.granted_unix_ms, &a.id).cmp(&(b.granted_unix_ms, &b.id)));
    let txn = db.begin_write()?;
    txn.delete_table(LEASES_BY_ID)?;
    {
        let mut table = txn.open_table(LEASES)?;
        for (key, record) in (1..).zip(&records) {
            table.insert(key, record.encode_to_vec().as_slice())?;
        }
    }
    txn.commit()?;
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::{
        ledger::{Batch, StoredLease},
        store::{FILE, Store},
    };

    fn scratch(name: &str) -> std::path::PathBuf {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        std::env::temp_dir().join(format!("{name}-{}-{nanos}", std::process::id()))
    }

    fn record(granted_unix_ms: u64) -> LeaseRecord {
        LeaseRecord {
            pool: "kv-cache".into(),
            size: 64,
            ttl_ms: 30_000,
            deadline_unix_ms: 4_000_000_000_000,
            granted_unix_ms,
            ..Default::default()
        }
    }

    #[test]
    fn one_pass_only_for_many_removals_and_a_large_share_of_the_table() {
        assert!(one_pass(100_000, 100_000));
        assert!(one_pass(BULK_REMOVAL, 4 * BULK_REMOVAL as u64));
        assert!(!one_pass(BULK_REMOVAL - 1, BULK_REMOVAL as u64), "too few to be worth a pass");
        assert!(!one_pass(10_000, 1_000_000), "a small share of a large table");
    }

    #[test]
    fn a_store_of_the_earlier_layout_is_moved_over_when_opened_and_an_earlier_binary_cannot_read_it() {
        let dir = scratch("store-migrate");
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The earlier layout: keyed by id, no id in the record. Granted in the order
            // 0x700, 0x900, 0x300.
            let db = Database::create(dir.join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(LEASES_BY_ID).unwrap();
                for (id, granted) in [(0x300u128, 3_000), (0x700, 1_000), (0x900, 2_000)] {
                    table.insert(id, record(granted).encode_to_vec().as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        {
            let store = Store::open(&dir).unwrap();
            let ids: Vec<u128> = store.load().unwrap().leases.iter().map(|l| l.id.raw()).collect();
            assert_eq!(ids, [0x700, 0x900, 0x300], "in the order they were granted");
            // A renewal finds its lease; a new one goes after the moved ones.
            let mut renewed = store.load().unwrap().leases.remove(2);
            renewed.size = 128;
            let new = StoredLease { id: LeaseId::from_raw(0x100), ..renewed.clone() };
            let batch = Batch { seq: 1, epoch: 7, leases: vec![renewed, new], ..Batch::default() };
            store.commit(&batch).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let leases = store.load().unwrap().leases;
        let ids: Vec<(u128, u64)> = leases.iter().map(|l| (l.id.raw(), l.size)).collect();
        assert_eq!(ids, [(0x700, 64), (0x900, 64), (0x300, 128), (0x100, 128)]);
        drop(store);
        // What an earlier binary would open: the table is there with another key type.
        let db = Database::create(dir.join(FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(matches!(txn.open_table(LEASES_BY_ID), Err(TableError::TableTypeMismatch { .. })));
        drop((txn, db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lease_stored_twice_is_refused_rather_than_counted_twice() {
        let path = scratch("store-twice");
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(LEASES).unwrap();
            let record = LeaseRecord { id: 0x42u128.to_be_bytes().to_vec(), ..record(1_000) };
            table.insert(1, record.encode_to_vec().as_slice()).unwrap();
            table.insert(2, record.encode_to_vec().as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let error = LeaseKeys::read(&db).unwrap_err().to_string();
        assert!(error.contains("stored twice, under keys 1 and 2"), "{error}");
        drop(db);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn keys_follow_the_order_leases_are_stored_in_and_no_two_leases_share_one() {
        let mut keys = LeaseKeys { by_id: LeaseMap::default(), next: 7 };
        let mut give = |id: u128| keys.key_for(LeaseId::from_raw(id));
        assert_eq!([give(900), give(333), give(900), give(41)], [7, 8, 7, 9]);
    }
}
