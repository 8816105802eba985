//! Group commit: every acknowledged change is durable before its reply, and changes made while a
//! commit is in flight share the next one.
//!
//! A mutating call changes the ledger (which notes the changed keys and bumps a sequence number),
//! releases the lock, wakes the committer and waits until a commit covering its sequence number
//! is on disk. The committer takes every change noted so far as one batch, writes it in one
//! transaction (one fsync) off the async threads, and announces the sequence number it covered.
//! So durability costs each call the latency of one commit, and throughput is as many calls as
//! arrive during one commit: the log of etcd and ZooKeeper, here over an embedded store.
//!
//! If a commit fails (a full disk, a read-only state directory), its keys are marked changed
//! again, the calls waiting for it are answered UNAVAILABLE (never a grant that is not durable),
//! and new changes are refused until a retry succeeds (every second), which writes the ledger's
//! state as it is then.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{error, info};

use super::Shared;
use crate::{ledger::Error, store::Store};

/// How often a failed store is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// How far commits have got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every change up to this sequence number is on disk.
    durable: u64,
    /// The last commit failed, with this message, and none has succeeded since.
    failure: Option<Arc<str>>,
}

/// The durability of one server: `None` store runs in memory, where every change is "durable"
/// at once.
#[derive(Debug)]
pub struct Durability {
    store: Option<Arc<Store>>,
    wake: Notify,
    progress: watch::Sender<Progress>,
}

impl Durability {
    /// Over `store`, or in memory.
    pub fn new(store: Option<Store>) -> Self {
        Durability {
            store: store.map(Arc::new),
            wake: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
        }
    }

    /// Whether changes go to disk.
    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    /// Refuses a change up front while the store is failing.
    pub fn check(&self) -> Result<(), Error> {
        match &self.progress.borrow().failure {
            Some(failure) => Err(Error::NotDurable(failure.to_string())),
            None => Ok(()),
        }
    }

    /// Returns once every change up to `seq` is on disk, or the error to answer if the commit
    /// carrying it failed.
    pub async fn wait(&self, seq: u64) -> Result<(), Error> {
        if self.store.is_none() {
            return Ok(());
        }
        let mut progress = self.progress.subscribe();
        self.wake.notify_one();
        loop {
            {
                let now = progress.borrow_and_update();
                if now.durable >= seq {
                    return Ok(());
                }
                if let Some(failure) = &now.failure {
                    return Err(Error::NotDurable(failure.to_string()));
                }
            }
            if progress.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }

    /// Wakes the committer for changes nobody waits on (expiries).
    pub fn nudge(&self) {
        if self.store.is_some() {
            self.wake.notify_one();
        }
    }
}

/// Commits until shutdown, then once more, so what the drain changed is on disk before exit.
pub(crate) async fn run(shared: Arc<Shared>) {
    let durability = shared.durability();
    let Some(store) = durability.store.clone() else { return };
    loop {
        let failing = durability.progress.borrow().failure.is_some();
        tokio::select! {
            () = durability.wake.notified() => {}
            () = tokio::time::sleep(RETRY), if failing => {}
            () = shared.shutdown().cancelled() => break,
        }
        commit(&shared, &store).await;
    }
    // Whatever the drain changed (waiters answered, leases freed by the last calls).
    commit(&shared, &store).await;
}

/// One group commit of everything changed so far.
async fn commit(shared: &Arc<Shared>, store: &Arc<Store>) {
    let durability = shared.durability();
    let failing = durability.progress.borrow().failure.is_some();
    let batch = shared.ledger().take_batch(Instant::now(), SystemTime::now());
    if batch.is_empty() && !failing && batch.seq <= durability.progress.borrow().durable {
        return;
    }
    let writer = store.clone();
    let written = tokio::task::spawn_blocking(move || {
        let result = writer.commit(&batch);
        (result, batch)
    })
    .await;
    match written {
        Ok((Ok(()), batch)) => {
            if failing {
                info!("the state store accepts writes again; changes are allowed");
            }
            durability.progress.send_modify(|p| {
                p.durable = p.durable.max(batch.seq);
                p.failure = None;
            });
        }
        Ok((Err(err), batch)) => {
            if !failing {
                error!(error = %err, "cannot write the state store: changes are refused (UNAVAILABLE) until it accepts writes again");
            }
            shared.ledger().retake(&batch);
            durability.progress.send_modify(|p| p.failure = Some(Arc::from(err.to_string())));
        }
        Err(join) => {
            error!(error = %join, "the commit task failed");
            durability.progress.send_modify(|p| p.failure = Some(Arc::from("the commit task failed")));
        }
    }
}
