//! Granting: feasibility, admission (grant, queue or refuse), the grant itself, and replays of
//! idempotent retries.

use super::*;

impl Ledger {
    /// Whether `items` would be granted now. Unknown pools and malformed sizes are errors; a
    /// request larger than a pool is not (it is reported as `fits_capacity == false`).
    pub fn can_allocate(&mut self, items: &[(String, u64)], now: Instant) -> Result<Feasibility, Error> {
        self.reap(now);
        let (_, demand) = self.resolve_items(items)?;
        let fits_capacity = demand.iter().all(|&(p, bytes)| bytes <= self.pools[p].capacity());
        let pools = demand
            .iter()
            .map(|&(p, requested)| {
                let pool = &self.pools[p];
                PoolFit {
                    pool: pool.name().clone(),
                    requested,
                    available: pool.available(),
                    capacity: pool.capacity(),
                    waiters: pool.waiters(),
                    reclaimable: pool.reclaimable(),
                }
            })
            .collect();
        Ok(Feasibility { now: self.fits_now(&demand), fits_capacity, pools })
    }

    /// Grants `request` now, queues it (if `may_wait`), or refuses it.
    pub fn allocate(
        &mut self,
        request: AllocRequest,
        now: Instant,
        may_wait: bool,
    ) -> Result<AllocateOutcome, Error> {
        self.reap(now);
        let (items, demand) = self.resolve_items(&request.items)?;
        let key =
            request.request_id.as_ref().map(|id| Arc::<str>::from(format!("{}\u{0}{}", request.holder, id)));
        let resolved =
            Resolved { items, demand, holder: request.holder, scope: request.scope, ttl: request.ttl, key };

        if let Some(key) = &resolved.key {
            if let Some(grant) = self.replay(key, &resolved)? {
                return Ok(AllocateOutcome::Granted(grant));
            }
            if self.waiters.has_key(key) {
                let id = request.request_id.as_deref().unwrap_or_default();
                return Err(Error::RequestInProgress(id.to_owned()));
            }
        }

        if let Some(&(p, requested)) =
            resolved.demand.iter().find(|&&(p, bytes)| bytes > self.pools[p].capacity())
        {
            let pool = &mut self.pools[p];
            pool.count_rejected();
            let err = Error::ExceedsCapacity {
                pool: pool.name().to_string(),
                requested,
                capacity: pool.capacity(),
            };
            self.publish_refusal(EventKind::Rejected, p, requested, &resolved);
            return Err(err);
        }

        self.check_lease_limits(&resolved)?;
        if self.fits_now(&resolved.demand) {
            return Ok(AllocateOutcome::Granted(self.grant(&resolved, now)));
        }
        if !may_wait {
            let blocking = self.blocking(&resolved, None);
            for &(p, requested) in &blocking {
                self.pools[p].count_rejected();
                self.publish_refusal(EventKind::Rejected, p, requested, &resolved);
            }
            return Err(self.no_room(&resolved, &blocking, Duration::ZERO, false));
        }

        self.check_waiter_limits(&resolved)?;
        for &(p, bytes) in &resolved.demand {
            self.pools[p].add_waiter(bytes);
        }
        self.holder_waiters.add(&resolved.holder, 1);
        let (reply, grant) = oneshot::channel();
        let ticket = self.waiters.push(resolved, reply);
        self.ask_reclaims(now);
        Ok(AllocateOutcome::Queued { ticket, grant })
    }

    /// Resolves pool names and sums the demand per pool, refusing unknown pools, zero sizes and
    /// sums that overflow.
    pub(super) fn resolve_items(&self, items: &[(String, u64)]) -> Result<(PoolBytes, PoolBytes), Error> {
        if items.is_empty() {
            return Err(Error::invalid("items", "at least one item is required"));
        }
        let mut resolved = Vec::with_capacity(items.len());
        let mut demand: Vec<(PoolId, u64)> = Vec::with_capacity(items.len());
        for (i, (name, size)) in items.iter().enumerate() {
            let p = self.pool_id(name)?;
            if *size == 0 {
                return Err(Error::invalid(format!("items[{i}].size_bytes"), "must be greater than zero"));
            }
            resolved.push((p, *size));
            match demand.iter_mut().find(|(q, _)| *q == p) {
                Some((_, sum)) => {
                    *sum = sum.checked_add(*size).ok_or_else(|| {
                        Error::invalid("items", format!("sizes asked of pool {name:?} overflow 64 bits"))
                    })?;
                }
                None => demand.push((p, *size)),
            }
        }
        Ok((resolved, demand))
    }

    /// True if `demand` fits now and leaves every pool room for what its waiters ask: a
    /// newcomer may pass waiters only where it cannot delay them (see `serve_waiters`).
    pub(super) fn fits_now(&self, demand: &[(PoolId, u64)]) -> bool {
        demand.iter().all(|&(p, bytes)| {
            let pool = &self.pools[p];
            pool.fits_behind(pool.reserved(), bytes)
        })
    }

    /// Returns the leases already granted under `key`, or `None` if there are none. A key reused
    /// with different parameters is refused rather than silently answered with other leases.
    pub(super) fn replay(&self, key: &str, request: &Resolved) -> Result<Option<Grant>, Error> {
        let Some(replay) = self.replays.get(key) else { return Ok(None) };
        if replay.items != request.items || replay.scope != request.scope || replay.ttl != request.ttl {
            return Err(Error::invalid(
                "request_id",
                "already used by an earlier Allocate with different items, scope or ttl; use a new request_id",
            ));
        }
        let leases = replay.leases.iter().filter_map(|id| self.leases.get(id).cloned()).collect();
        Ok(Some(Grant { leases, replayed: true }))
    }

    pub(super) fn grant(&mut self, request: &Resolved, now: Instant) -> Grant {
        let expires_at = now + request.ttl;
        let mut leases = Vec::with_capacity(request.items.len());
        for &(p, size) in &request.items {
            // One probe: a vacant entry both proves the random id unused and is where it goes.
            let (id, slot) = loop {
                let id = self.ids.next_id();
                if let std::collections::hash_map::Entry::Vacant(slot) = self.leases.entry(id) {
                    break (id, slot);
                }
            };
            let pool = &mut self.pools[p];
            pool.take(size);
            let lease = slot
                .insert(Lease {
                    id,
                    pool: p,
                    size,
                    holder: request.holder.clone(),
                    scope: request.scope.clone(),
                    ttl: request.ttl,
                    expires_at,
                    request_key: request.key.clone(),
                    granted_at: now,
                })
                .clone();
            self.events.publish(Change::of_lease(EventKind::Allocated, pool, &lease));
            if self.expiry.insert(expires_at, id) {
                self.reaper.notify_one();
            }
            if let Some(scope) = &request.scope {
                let key = self.scope_key(&request.holder, scope);
                match self.scopes.get_mut(&*key) {
                    Some(members) => members.insert(id),
                    None => self.scopes.entry(Arc::from(key)).or_default().insert(id),
                };
            }
            self.touch_lease(id);
            self.touch_pool(p);
            leases.push(lease);
        }
        self.holder_leases.add(&request.holder, leases.len());
        if let Some(key) = &request.key {
            self.touch_replay(key);
            self.replays.insert(
                key.clone(),
                Replay {
                    items: request.items.clone(),
                    scope: request.scope.clone(),
                    ttl: request.ttl,
                    leases: leases.iter().map(|l| l.id).collect(),
                },
            );
        }
        Grant { leases, replayed: false }
    }
}
