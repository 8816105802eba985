//! Where leases sit in the store: keyed by the order they were stored, not by their id.
//!
//! Lease ids are 128 random bits, so a B-tree keyed by them puts each new lease on a random
//! leaf, and a commit of six grants and six frees rewrote about 26 pages (26 `pwrite`s and their
//! writeback before the fsync; 150 µs of CPU user and 160 µs system per commit measured here).
//! Keyed by a counter, every grant lands on the rightmost leaf and a lease freed soon after its
//! grant is still there, so the same commit rewrites about 9 pages (70 µs user, 48 µs system):
//! the reason databases prefer sequential primary keys. The store keeps the id in the record and
//! an in-memory map from id to key, rebuilt whenever the database is opened.

use std::collections::HashSet;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};

use super::records::LeaseRecord;
use crate::ledger::{LeaseId, LeaseMap, StoredLease};

/// Leases by the order they were stored.
pub(super) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases_by_order");
/// Leases by id: the layout before `LEASES`, moved into it when a store is opened.
const LEASES_BY_ID: TableDefinition<u128, &[u8]> = TableDefinition::new("leases");

/// Removals from which one pass over the whole leases table may be cheaper (see `remove`).
pub(super) const BULK_REMOVAL: usize = 4096;

/// The key of every stored lease, and the next key to give.
#[derive(Debug, Default)]
pub(super) struct LeaseKeys {
    by_id: LeaseMap<u64>,
    next: u64,
}

impl LeaseKeys {
    /// Reads the keys of every stored lease, each with its decoded record.
    pub(super) fn read(db: &Database) -> Result<(Self, Vec<StoredLease>), Box<dyn std::error::Error>> {
        let mut keys = LeaseKeys { by_id: LeaseMap::default(), next: 1 };
        let mut leases = Vec::new();
        let txn = db.begin_read()?;
        let table = match txn.open_table(LEASES) {
            Ok(table) => table,
            // Tables appear with the first commit; a fresh store has none.
            Err(TableError::TableDoesNotExist(_)) => return Ok((keys, leases)),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (key, value) = entry?;
            let record = LeaseRecord::decode(value.value())?;
            let id = record.id().ok_or("a lease record without a 16-byte id")?;
            keys.by_id.insert(id, key.value());
            keys.next = keys.next.max(key.value() + 1);
            leases.push(record.into_stored(id));
        }
        Ok((keys, leases))
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
            // keys, each copying its page (100,000 single removals took 90 ms here).
            let gone: HashSet<u64> = gone.into_iter().collect();
            return table.retain(|key, _| !gone.contains(&key));
        }
        for key in gone {
            table.remove(key)?;
        }
        Ok(())
    }
}

/// Whether `removals` from a table of `stored` leases take one `retain` pass: many of them, and
/// at least a quarter of the table (a pass visits every lease, so a few thousand removals from
/// a million leases are cheaper one by one).
pub(super) fn one_pass(removals: usize, stored: u64) -> bool {
    removals >= BULK_REMOVAL && removals as u64 * 4 >= stored
}

/// Moves leases stored by id (the earlier layout) into `LEASES`, in the order they were granted,
/// in one transaction. Returns how many moved.
pub(super) fn migrate(db: &Database) -> Result<usize, Box<dyn std::error::Error>> {
    let mut records = Vec::new();
    {
        let txn = db.begin_read()?;
        let table = match txn.open_table(LEASES_BY_ID) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(0),
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
    {
        let mut table = txn.open_table(LEASES)?;
        let first = table.last()?.map_or(1, |(key, _)| key.value() + 1);
        for (key, record) in (first..).zip(&records) {
            table.insert(key, record.encode_to_vec().as_slice())?;
        }
    }
    txn.delete_table(LEASES_BY_ID)?;
    txn.commit()?;
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_only_for_many_removals_and_a_large_share_of_the_table() {
        assert!(one_pass(100_000, 100_000));
        assert!(one_pass(BULK_REMOVAL, 4 * BULK_REMOVAL as u64));
        assert!(!one_pass(BULK_REMOVAL - 1, BULK_REMOVAL as u64), "too few to be worth a pass");
        assert!(!one_pass(10_000, 1_000_000), "a small share of a large table");
    }

    #[test]
    fn leases_stored_by_id_move_to_the_current_layout_in_the_order_they_were_granted() {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("store-migrate-{}-{nanos}.redb", std::process::id()));
        let db = Database::create(&path).unwrap();
        assert_eq!(migrate(&db).unwrap(), 0, "nothing to move in a fresh store");
        // The earlier layout: keyed by id, no id in the record. Granted in the order 7, 9, 3.
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(LEASES_BY_ID).unwrap();
            for (id, granted) in [(3u128, 3_000), (7, 1_000), (9, 2_000)] {
                let record = LeaseRecord {
                    pool: "kv-cache".into(),
                    size: 64,
                    granted_unix_ms: granted,
                    ..Default::default()
                };
                table.insert(id, record.encode_to_vec().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();

        assert_eq!(migrate(&db).unwrap(), 3);
        let (mut keys, leases) = LeaseKeys::read(&db).unwrap();
        let ids: Vec<u128> = leases.iter().map(|l| l.id.raw()).collect();
        assert_eq!(ids, [7, 9, 3]);
        assert!(leases.iter().all(|l| l.size == 64 && &*l.pool == "kv-cache"));
        assert_eq!(keys.key_for(LeaseId::from_raw(3)), 3, "found where it was moved");
        assert_eq!(keys.key_for(LeaseId::from_raw(4)), 4, "a new lease goes after them");
        let txn = db.begin_read().unwrap();
        assert!(
            matches!(txn.open_table(LEASES_BY_ID), Err(TableError::TableDoesNotExist(_))),
            "the old table is gone"
        );
        drop((txn, db));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn keys_follow_the_order_leases_are_stored_in_and_are_never_given_twice() {
        let mut keys = LeaseKeys { by_id: LeaseMap::default(), next: 7 };
        let mut give = |id: u128| keys.key_for(LeaseId::from_raw(id));
        assert_eq!([give(900), give(3), give(900), give(41)], [7, 8, 7, 9]);
    }
}
