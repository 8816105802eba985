//! WatchEvents: a server stream of ledger events, filtered per watcher.

use std::{collections::HashSet, sync::Arc};

use proto::memory::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Access, Shared, convert};
use crate::{
    ledger::{Error, Event, EventKind, ResumeGap},
    validate,
};

/// The response half of a WatchEvents call.
pub type WatchStream = ReceiverStream<Result<pb::WatchEventsResponse, Status>>;

/// Which events a watcher wants; empty sets pass everything.
#[derive(Debug)]
pub(super) struct Filter {
    pools: HashSet<String>,
    kinds: HashSet<EventKind>,
    /// Who watches: another holder's lease ids, holder names and scopes are only for admins.
    access: Access,
    /// Resume after this sequence: replay the retained events after it first.
    resume_after: Option<u64>,
}

impl Filter {
    /// Validates the request's filters. Pools need not exist yet: a watcher may wait for a pool.
    pub(super) fn new(req: pb::WatchEventsRequest, access: Access, epoch: u64) -> Result<Self, Error> {
        // Every filter is checked, so one refusal lists every violation.
        let mut bad = crate::ledger::Violations::default();
        for (i, pool) in req.pools.iter().enumerate() {
            if let Err(reason) = validate::pool_name(pool) {
                bad.add(format!("pools[{i}]"), format!("{:?}: {reason}", serving::echo::echo(pool)));
            }
        }
        let kinds: Vec<_> =
            req.kinds.into_iter().filter_map(|k| bad.keep(convert::event_kind_filter(k))).collect();
        if req.resume_after_sequence > 0 && req.resume_epoch == 0 {
            bad.add(
                "resume_epoch",
                "required with resume_after_sequence: the server_epoch the sequence was seen in",
            );
        }
        bad.check()?;
        let resume_after = (req.resume_after_sequence > 0).then_some(req.resume_after_sequence);
        if let Some(after) = resume_after
            && req.resume_epoch != epoch
        {
            return Err(Error::CannotResume(format!(
                "event {after} is of epoch {}, but this server's epoch is {epoch}: its state was lost with a restart; list pools again and watch from now",
                req.resume_epoch
            )));
        }
        Ok(Filter {
            pools: req.pools.into_iter().collect(),
            kinds: kinds.into_iter().collect(),
            access,
            resume_after,
        })
    }

    /// `event` as this watcher may see it: in full if it is the watcher's own (or the watcher
    /// sees everything); otherwise only its pool-level figures (kind, pool, size, pool use).
    fn render(&self, event: &Event) -> pb::Event {
        let mut rendered = convert::event(event);
        let own = || match &self.access {
            Access::As(caller) => event.holder.as_deref() == Some(&*caller.identity),
            Access::Open => true,
        };
        if !self.access.sees_everything() && !own() {
            rendered.lease_id.clear();
            rendered.holder.clear();
            rendered.scope_id.clear();
        }
        rendered
    }

    fn passes(&self, event: &Event) -> bool {
        (self.pools.is_empty() || self.pools.contains(&*event.pool))
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
    }
}

/// Spawns the task feeding one watcher. The ledger publishes into a broadcast ring and never
/// waits; this task is the only place a slow client costs anything, and what it costs is its own
/// lag, reported as a `Lagged` item with the number of events missed.
pub(super) fn spawn(
    shared: Arc<Shared>,
    filter: Filter,
    permit: OwnedSemaphorePermit,
) -> Result<WatchStream, Error> {
    let (replay, mut events) = shared.ledger().subscribe(filter.resume_after).map_err(|gap| {
        let after = filter.resume_after.unwrap_or_default();
        Error::ResumeOutOfRange(match gap {
            ResumeGap::Ahead { latest } => {
                format!("resume_after_sequence {after} is ahead of the latest event, {latest}")
            }
            ResumeGap::Gone { oldest, latest } => format!(
                "events after {after} are no longer retained (the oldest kept is {oldest}, the latest {latest}): list pools again and watch from now"
            ),
        })
    })?;
    let (tx, rx) = mpsc::channel(64);
    let epoch = shared.epoch;
    tokio::spawn(async move {
        // Held until the stream ends: the bound on open watchers.
        let _permit = permit;
        // The retained events a resuming watcher missed, then the live ones: subscribed under the
        // same lock, so nothing falls between.
        for event in replay.iter().filter(|e| filter.passes(e)) {
            let item = pb::watch_events_response::Item::Event(filter.render(event));
            let reply = pb::WatchEventsResponse { item: Some(item), server_epoch: epoch };
            tokio::select! {
                sent = tx.send(Ok(reply)) => if sent.is_err() { return },
                () = shared.shutdown().cancelled() => return,
            }
        }
        loop {
            let item = tokio::select! {
                received = events.recv() => match received {
                    Ok(event) if filter.passes(&event) => pb::watch_events_response::Item::Event(filter.render(&event)),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        pb::watch_events_response::Item::Lagged(pb::Lagged { missed_events: missed })
                    }
                    // The ledger is gone: the server is stopping.
                    Err(RecvError::Closed) => break,
                },
                () = shared.shutdown().cancelled() => break,
                // The client went away: stop now rather than at the next matching event.
                () = tx.closed() => return,
            };
            let reply = pb::WatchEventsResponse { item: Some(item), server_epoch: epoch };
            tokio::select! {
                sent = tx.send(Ok(reply)) => if sent.is_err() { return },
                () = shared.shutdown().cancelled() => break,
            }
        }
        // Best effort: a client that stopped reading must not hold up the drain.
        let _ = tx.try_send(Err(shared.status(Error::ShuttingDown)));
    });
    Ok(ReceiverStream::new(rx))
}
