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
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, info};

use super::Shared;
use crate::{ledger::Error, store::Store};

/// How often a failed store is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// How far commits have got, and who waits for what.
#[derive(Debug, Default)]
struct Progress {
    /// Every change up to this sequence number is on disk.
    durable: u64,
    /// The last commit failed, with this message, and none has succeeded since.
    failure: Option<Arc<str>>,
    /// The committer has made its last commit.
    stopped: bool,
    /// Calls waiting for the commit of their change's sequence number. Each is answered exactly
    /// once: by the first commit that covers it, or with the error of a failed commit or of the
    /// stop, which answer every waiter.
    waiters: Vec<Waiter>,
}

impl Progress {
    /// Takes every waiter whose change is now on disk, to be answered once the lock is released
    /// (see [`answer`]).
    fn take_covered(&mut self) -> Vec<Waiter> {
        let durable = self.durable;
        self.waiters.extract_if(.., |(seq, _)| *seq <= durable).collect()
    }
}

/// A call waiting for the commit of its change's sequence number.
type Waiter = (u64, oneshot::Sender<Result<(), Error>>);

/// Answers `waiters` with `reply()`. Called with no lock held: each answer wakes a task, which
/// may take a syscall, and a call that checks or joins the commit queue meanwhile should not
/// wait behind those wake-ups.
fn answer(waiters: Vec<Waiter>, reply: impl Fn() -> Result<(), Error>) {
    for (_, waiter) in waiters {
        let _ = waiter.send(reply());
    }
}

/// What the committer thread is asked to do.
#[derive(Debug, Default)]
struct Wake {
    /// Changes are waiting for a commit.
    pending: bool,
    /// Commit what is left, then stop.
    stop: bool,
}

/// The durability of one server: `None` store runs in memory, where every change is "durable"
/// at once.
#[derive(Debug)]
pub struct Durability {
    store: Option<Arc<Store>>,
    /// The ledger's latest change (see `Ledger::track_changes`).
    latest: Arc<AtomicU64>,
    wake: Mutex<Wake>,
    wakeup: Condvar,
    progress: Mutex<Progress>,
    /// Whether `progress.failure` is set: read by every change up front without the lock.
    failing: AtomicBool,
}

impl Durability {
    /// Over `store`, with the ledger's change counter, or in memory.
    pub fn new(store: Option<(Store, Arc<AtomicU64>)>) -> Self {
        let (store, latest) = match store {
            Some((store, latest)) => (Some(Arc::new(store)), latest),
            None => (None, Arc::default()),
        };
        Durability {
            store,
            latest,
            wake: Mutex::new(Wake::default()),
            wakeup: Condvar::new(),
            progress: Mutex::new(Progress::default()),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether changes go to disk.
    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    /// The sequence number of the ledger's latest change: a call that changed the ledger waits
    /// for it to be durable.
    pub fn latest_change(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// Refuses a change up front while the store is failing.
    pub fn check(&self) -> Result<(), Error> {
        if !self.failing() {
            return Ok(());
        }
        match &self.progress.lock().failure {
            Some(failure) => Err(Error::NotDurable(failure.to_string())),
            None => Ok(()),
        }
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Returns once every change up to `seq` is on disk, or the error to answer if the commit
    /// carrying it failed.
    pub async fn wait(&self, seq: u64) -> Result<(), Error> {
        if self.store.is_none() {
            return Ok(());
        }
        let answer = {
            let mut progress = self.progress.lock();
            if progress.durable >= seq {
                return Ok(());
            }
            if let Some(failure) = &progress.failure {
                return Err(Error::NotDurable(failure.to_string()));
            }
            if progress.stopped {
                return Err(Error::ShuttingDown);
            }
            let (tx, rx) = oneshot::channel();
            progress.waiters.push((seq, tx));
            rx
        };
        self.signal();
        answer.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Wakes the committer for changes nobody waits on (expiries).
    pub fn nudge(&self) {
        if self.store.is_some() {
            self.signal();
        }
    }

    /// Tells the committer there is work. A committer busy with a commit sees it when that commit
    /// ends (nothing is lost between two commits); an idle one wakes at once. No syscall when it
    /// is busy: the common case under load.
    fn signal(&self) {
        self.wake.lock().pending = true;
        self.wakeup.notify_one();
    }
}

/// The committer thread of a durable server; stopping it commits what is left first.
#[derive(Debug)]
pub struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer (nothing to start in memory). A dedicated OS thread rather than a
    /// task: a commit blocks on fsync, and a thread that sleeps on a condition variable wakes the
    /// moment a change arrives, without waiting for a busy async worker to schedule it or for a
    /// blocking-pool hand-off. Both would add to every durable call's latency.
    pub fn start(shared: Arc<Shared>) -> std::io::Result<Self> {
        let thread = match shared.durability().store.clone() {
            Some(store) => {
                let for_thread = shared.clone();
                // The ledger's deadlines are on tokio's clock (paused in tests): read it there.
                let runtime = tokio::runtime::Handle::current();
                // A restore's changes (leases that expired while down, and their events) are
                // committed at once, not with the first call's.
                shared.durability().signal();
                Some(std::thread::Builder::new().name("ledger-commit".into()).spawn(move || {
                    let _clock = runtime.enter();
                    run(&for_thread, &store);
                })?)
            }
            None => None,
        };
        Ok(Committer { shared, thread })
    }

    /// Commits whatever is left (the drain's last changes), then stops. Call once the server
    /// serves no more calls.
    pub async fn finish(mut self) {
        if let Some(thread) = self.thread.take() {
            self.request_stop();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn request_stop(&self) {
        let durability = self.shared.durability();
        durability.wake.lock().stop = true;
        durability.wakeup.notify_one();
    }
}

impl Drop for Committer {
    /// A server that ends on an error still stops its committer (after a last commit).
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
        }
    }
}

/// Commits whenever there are changes, and every [`RETRY`] while the store is failing, until
/// asked to stop; then once more, so nothing acknowledged is left behind.
fn run(shared: &Arc<Shared>, store: &Arc<Store>) {
    let durability = shared.durability();
    loop {
        let stop = {
            let mut wake = durability.wake.lock();
            while !wake.pending && !wake.stop {
                if durability.failing() {
                    // Retry a failing store even when nothing new arrives.
                    durability.wakeup.wait_for(&mut wake, RETRY);
                    break;
                }
                durability.wakeup.wait(&mut wake);
            }
            wake.pending = false;
            wake.stop
        };
        commit(shared, store);
        if stop {
            // Whoever still waits (a change that came after the last batch) hears why.
            let waiters = {
                let mut progress = durability.progress.lock();
                progress.stopped = true;
                std::mem::take(&mut progress.waiters)
            };
            answer(waiters, || Err(Error::ShuttingDown));
            return;
        }
    }
}

/// One group commit of everything changed so far.
fn commit(shared: &Arc<Shared>, store: &Store) {
    let durability = shared.durability();
    let failing = durability.failing();
    let batch = shared.ledger().take_batch(Instant::now(), SystemTime::now());
    if batch.is_empty() && !failing && batch.seq <= durability.progress.lock().durable {
        return;
    }
    let started = Instant::now();
    let written = store.commit(&batch);
    let metrics = shared.metrics();
    metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
    metrics.commit_records.observe(batch.records() as f64);
    match written {
        Ok(()) => {
            if failing {
                info!("the state store accepts writes again; changes are allowed");
            }
            // Watchers hear of what is on disk, and of nothing else.
            shared.ledger().release_events(batch.events);
            let covered = {
                let mut progress = durability.progress.lock();
                progress.durable = progress.durable.max(batch.seq);
                progress.failure = None;
                durability.failing.store(false, Ordering::Release);
                progress.take_covered()
            };
            answer(covered, || Ok(()));
        }
        Err(err) => {
            if !failing {
                error!(error = %err, "cannot write the state store: changes are refused (UNAVAILABLE) until it accepts writes again");
            }
            shared.ledger().retake(&batch);
            let failure: Arc<str> = Arc::from(err.to_string());
            let waiters = {
                let mut progress = durability.progress.lock();
                progress.failure = Some(failure.clone());
                durability.failing.store(true, Ordering::Release);
                std::mem::take(&mut progress.waiters)
            };
            answer(waiters, || Err(Error::NotDurable(failure.to_string())));
        }
    }
}
