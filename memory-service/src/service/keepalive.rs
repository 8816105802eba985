//! KeepAlive: a bidirectional stream on which a long-lived holder renews leases and scopes, and
//! may offer leases as reclaimable, hearing on the same stream when they are asked back.

use std::sync::Arc;

use proto::memory::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{Access, Shared, convert, convert::Clock, reclaim, reclaim::OfferGuard, scope};
use crate::ledger::{Error, LeaseId, LeaseSet, MAX_OFFERED};

/// Most lease ids in one KeepAlive message.
pub const MAX_LEASES: usize = 1024;
/// Most scope ids in one KeepAlive message.
pub const MAX_SCOPES: usize = 64;

/// The response half of a KeepAlive call.
pub type KeepAliveStream = ReceiverStream<Result<pb::KeepAliveResponse, Status>>;

/// Spawns the task that answers `inbound`. It ends when the client closes its half, when the
/// client goes away (a failed send), on a malformed or undecodable message (INVALID_ARGUMENT), or at shutdown
/// (UNAVAILABLE, so clients reconnect elsewhere). Between answers it sends the ReclaimRequests
/// of the stream's offer, if it made one.
pub(super) fn spawn(
    shared: Arc<Shared>,
    access: Access,
    mut inbound: Streaming<pb::KeepAliveRequest>,
    permit: OwnedSemaphorePermit,
) -> KeepAliveStream {
    // Small buffer: one answer per request, so a client that stops reading also stops renewing.
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // Held until the stream ends: the bound on open keep-alive streams.
        let _permit = permit;
        // Registered once for the stream's life, not once per message: every registration
        // takes the shutdown token's lock, which all streams share.
        let shutdown = shared.shutdown().clone();
        let shutdown = shutdown.cancelled();
        tokio::pin!(shutdown);
        // Opened by the first message that sets a reclaimable set; closed when this task ends,
        // however it ends, so no lease stays offered on a stream nobody reads.
        let mut offer: Option<OfferGuard> = None;
        loop {
            let message = tokio::select! {
                message = inbound.message() => message,
                () = reclaim::asked(&offer) => {
                    let notices = offer.as_ref().map(|o| reclaim::notices(&shared, o)).unwrap_or_default();
                    if !reclaim::send_all(&tx, notices, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
                () = &mut shutdown => {
                    // Best effort: a client that stopped reading must not hold up the drain.
                    let _ = tx.try_send(Err(shared.status(Error::ShuttingDown)));
                    return;
                }
            };
            let reply = match message {
                Ok(Some(req)) => renew(&shared, &access, req, &mut offer).await.map_err(|e| shared.status(e)),
                // The client closed its half: nothing left to answer.
                Ok(None) => return,
                // A message that cannot be decoded (tonic reports it as INTERNAL): the stream
                // cannot go on, and the client must hear why rather than see a silent OK. A
                // broken connection also lands here; then this send fails, harmlessly.
                Err(status) if status.code() == tonic::Code::Internal => {
                    let reason = format!("a KeepAlive message could not be decoded: {}", status.message());
                    let _ = tx.try_send(Err(Status::invalid_argument(reason)));
                    return;
                }
                // Over the message size limit: gRPC's status table says RESOURCE_EXHAUSTED.
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    let _ = tx.try_send(Err(Status::resource_exhausted(status.message().to_owned())));
                    return;
                }
                Err(_) => return,
            };
            let fatal = reply.is_err();
            let sent = tokio::select! {
                sent = tx.send(reply) => sent.is_ok(),
                () = &mut shutdown => false,
            };
            if !sent || fatal {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn renew(
    shared: &Arc<Shared>,
    access: &Access,
    req: pb::KeepAliveRequest,
    offer: &mut Option<OfferGuard>,
) -> Result<pb::KeepAliveResponse, Error> {
    // Every field is checked, so one refusal lists every violation.
    let mut bad = crate::ledger::Violations::default();
    if req.lease_ids.is_empty() && req.scope_ids.is_empty() && req.reclaimable.is_none() {
        bad.add("lease_ids", "name at least one lease or scope to renew, or set reclaimable");
    }
    if req.lease_ids.len() > MAX_LEASES {
        bad.add("lease_ids", format!("at most {MAX_LEASES} per message"));
    }
    if req.scope_ids.len() > MAX_SCOPES {
        bad.add("scope_ids", format!("at most {MAX_SCOPES} per message"));
    }
    let ids: Vec<_> = req.lease_ids.iter().filter_map(|id| bad.keep(convert::lease_id(id))).collect();
    for scope in &req.scope_ids {
        bad.keep(convert::scope_id(scope));
    }
    let offered = req.reclaimable.map(|set| reclaimable_ids(set, &mut bad));
    bad.check()?;
    shared.durability().check()?;
    if offered.is_some() && offer.is_none() {
        *offer = Some(OfferGuard::open(shared));
    }

    let clock = Clock::now();
    let now = clock.instant();
    let mut renewed = Vec::with_capacity(ids.len());
    let mut not_found = Vec::new();
    // Each lease is renewed once per message, however often it is named (directly, twice, or
    // also through its scope).
    let mut done = LeaseSet::with_capacity_and_hasher(ids.len(), Default::default());
    {
        let mut ledger = shared.ledger();
        // Another holder's lease refuses the whole message before anything is renewed or offered.
        for &id in ids.iter().chain(offered.iter().flatten()) {
            access.check_owner(&ledger, id)?;
        }
        // Offered in the same lock hold as the renewals: a lease both named and offered cannot
        // be revoked in between.
        let mut gone = LeaseSet::default();
        if let (Some(offered), Some(offer)) = (&offered, offer.as_ref()) {
            for id in ledger.set_reclaimable(offer.id(), offered, now)?.not_found {
                gone.insert(id);
                not_found.push(id.to_string());
            }
        }
        for (id, text) in ids.into_iter().zip(req.lease_ids) {
            if done.contains(&id) || gone.contains(&id) {
                continue;
            }
            match ledger.renew(id, now) {
                Ok(lease) => {
                    done.insert(id);
                    renewed.push(convert::lease_named(&lease, text, ledger.pool_name(lease.pool), &clock));
                }
                Err(_) => not_found.push(text),
            }
        }
    }
    let mut renewed_count = done.len() as u64;
    let mut scopes = Vec::with_capacity(req.scope_ids.len());
    for scope_id in req.scope_ids {
        // A caller's scope names only its own leases (scopes are per holder with
        // authentication on), so no ownership check is needed here.
        let (leases, renewed_now, latest) =
            scope::renew(shared, access.namespace(), &scope_id, &mut done).await;
        if leases == 0 {
            not_found.push(scope_id);
            continue;
        }
        renewed_count += renewed_now;
        scopes.push(pb::ScopeRenewal { scope_id, leases, expire_time: latest.map(|at| clock.wall(at)) });
    }
    let reclaimable_leases = offer.as_ref().map_or(0, |o| shared.ledger().offered(o.id()) as u64);
    // Renewed deadlines are durable before they are announced (and so are the asks an offer
    // made: their events and counters).
    shared.durable().await?;
    Ok(pb::KeepAliveResponse {
        renewed,
        not_found,
        server_epoch: shared.epoch,
        renewed_count,
        scopes,
        reclaim: None,
        reclaimable_leases,
    })
}

/// Parses a reclaimable set, noting every malformed id and an oversized set in `bad`.
fn reclaimable_ids(set: pb::ReclaimableSet, bad: &mut crate::ledger::Violations) -> Vec<LeaseId> {
    if set.lease_ids.len() > MAX_OFFERED {
        bad.add(
            "reclaimable.lease_ids",
            format!("at most {MAX_OFFERED} per stream, got {}", set.lease_ids.len()),
        );
    }
    let mut ids = Vec::with_capacity(set.lease_ids.len().min(MAX_OFFERED));
    for (i, text) in set.lease_ids.iter().enumerate() {
        match convert::lease_id(text) {
            Ok(id) => ids.push(id),
            Err(Error::InvalidArgument { violations }) => {
                for (_, reason) in violations {
                    bad.add(format!("reclaimable.lease_ids[{i}]"), reason);
                }
            }
            Err(other) => bad.add(format!("reclaimable.lease_ids[{i}]"), other.to_string()),
        }
    }
    ids
}
