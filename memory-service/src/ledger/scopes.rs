//! Scopes: named groups of leases renewed or freed together, and who may touch a lease.
//!
//! Scope operations come in two forms: whole (`renew_scope`, `free_scope`), and as a snapshot of
//! ids worked through in slices (`scope_ids`, then `renew_ids` / `free_ids` per slice), so the
//! service can release the ledger lock between slices and a 100,000-lease scope never holds it
//! for long. Ids are never reused, so a snapshot that went stale only names leases that are gone.

use std::borrow::Cow;

use super::LeaseSet;

use tokio::time::Instant;

use super::{Error, LeaseId, Ledger, Release};

impl Ledger {
    /// Makes scopes a per-holder namespace: holder A's scope `s` and holder B's scope `s` are
    /// different scopes. On when callers are authenticated, so nobody can renew or free another's
    /// scope by naming it; off for an open server, where holders are self-declared anyway.
    pub fn set_scopes_per_holder(&mut self, per_holder: bool) {
        self.scopes_per_holder = per_holder;
    }

    /// The index key of `holder`'s scope `scope`.
    pub(super) fn scope_key<'a>(&self, holder: &str, scope: &'a str) -> Cow<'a, str> {
        if self.scopes_per_holder {
            Cow::Owned(format!("{holder}\u{0}{scope}"))
        } else {
            Cow::Borrowed(scope)
        }
    }

    /// Refuses `owner` access to lease `id` held by someone else. An unknown id passes: the
    /// operation that follows answers NOT_FOUND for it.
    pub fn check_owner(&self, id: LeaseId, owner: &str) -> Result<(), Error> {
        match self.leases.get(&id) {
            Some(lease) if &*lease.holder != owner => {
                Err(Error::PermissionDenied(format!("lease {id} belongs to another holder")))
            }
            _ => Ok(()),
        }
    }

    /// The live leases of `holder`'s scope `scope`, after reclaiming the expired.
    pub fn scope_ids(&mut self, holder: &str, scope: &str, now: Instant) -> Vec<LeaseId> {
        self.reap(now);
        let key = self.scope_key(holder, scope);
        self.scopes.get(&*key).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Renews each lease of `ids` not in `done` (renewed earlier by the same request, so each is
    /// renewed, and announced, once), adding it to `done`. Returns how many of `ids` are live,
    /// how many this call renewed, and the latest new expiry.
    pub fn renew_ids(
        &mut self,
        ids: &[LeaseId],
        now: Instant,
        done: &mut LeaseSet,
    ) -> (u64, u64, Option<Instant>) {
        let (mut live, mut renewed, mut latest) = (0, 0, None);
        for &id in ids {
            if done.contains(&id) {
                live += 1;
                continue;
            }
            if let Ok(lease) = self.renew(id, now) {
                done.insert(id);
                live += 1;
                renewed += 1;
                latest = latest.max(Some(lease.expires_at));
            }
        }
        (live, renewed, latest)
    }

    /// Frees each live lease of `ids`; returns (leases, bytes) freed. Bytes are 128-bit: a scope
    /// may span pools whose sizes add past 64 bits.
    pub fn free_ids(&mut self, ids: &[LeaseId], now: Instant) -> (u64, u128) {
        let (mut count, mut bytes) = (0u64, 0u128);
        for &id in ids {
            if let Some(lease) = self.remove_lease(id, Release::Freed, now) {
                count += 1;
                bytes += u128::from(lease.size);
            }
        }
        if count > 0 {
            self.serve_waiters(now);
        }
        (count, bytes)
    }

    /// [`Ledger::renew_ids`] over the whole of `holder`'s scope `scope`, in one go. Returns the
    /// scope's live leases, how many this call renewed, and the latest new expiry: counts, not
    /// the leases, since a scope may hold a hundred thousand.
    pub fn renew_scope(
        &mut self,
        holder: &str,
        scope: &str,
        now: Instant,
        done: &mut LeaseSet,
    ) -> (u64, u64, Option<Instant>) {
        let ids = self.scope_ids(holder, scope, now);
        self.renew_ids(&ids, now, done)
    }

    /// Frees the whole of `holder`'s scope `scope` in one go; returns (leases, bytes) freed, bytes
    /// saturating at 64 bits.
    pub fn free_scope(&mut self, holder: &str, scope: &str, now: Instant) -> (u64, u64) {
        let ids = self.scope_ids(holder, scope, now);
        let (count, bytes) = self.free_ids(&ids, now);
        (count, u64::try_from(bytes).unwrap_or(u64::MAX))
    }
}
