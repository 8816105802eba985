//! What a sequence's owner and the device share besides its token channel: the owner's abort,
//! the device's progress, and the reader's "room again". All of it is a few atomics written
//! where the work happens anyway, so the device streams a token in one hop (no task between it
//! and the reader) and its per-step sweep takes no lock per sequence.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
};

use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

use super::{Emitted, TOKEN_BUFFER};

/// The device's side of one sequence's shared state.
#[derive(Debug, Default)]
pub(super) struct SeqSignals {
    aborted: AtomicBool,
    tokens: AtomicU32,
    /// Nanoseconds from `received` to the first and the last token, plus one (0: none yet).
    first_token: AtomicU64,
    last_token: AtomicU64,
}

impl SeqSignals {
    /// Whether its owner dropped its guard: the device drops the sequence.
    pub(super) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Records a token emitted `since` its receipt. Only the device writes, so the times are
    /// stored before the count is released: an owner that reads the count (or the outcome)
    /// reads times at least as recent.
    pub(super) fn emitted(&self, since: std::time::Duration) {
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        if self.first_token.load(Ordering::Relaxed) == 0 {
            self.first_token.store(nanos, Ordering::Relaxed);
        }
        self.last_token.store(nanos, Ordering::Relaxed);
        self.tokens.fetch_add(1, Ordering::Release);
    }
}

/// Owns a sequence on the device: dropping it drops the sequence (its blocks are freed at the
/// device's next step, woken for it), whichever way its owner ends. It also reads the device's
/// progress, so the owner enforces its time limits without seeing each token.
#[derive(Debug)]
pub struct SeqGuard {
    signals: Arc<SeqSignals>,
    wake: Arc<Notify>,
    received: Instant,
}

impl SeqGuard {
    pub(super) fn new(signals: Arc<SeqSignals>, wake: Arc<Notify>, received: Instant) -> Self {
        SeqGuard { signals, wake, received }
    }

    /// Tokens the device has emitted.
    pub fn tokens(&self) -> u32 {
        self.signals.tokens.load(Ordering::Acquire)
    }

    /// When the device emitted the first token, if it has.
    pub fn first_token(&self) -> Option<Instant> {
        self.at(&self.signals.first_token)
    }

    /// When the device emitted the last token so far, if any.
    pub fn last_token(&self) -> Option<Instant> {
        self.at(&self.signals.last_token)
    }

    fn at(&self, nanos: &AtomicU64) -> Option<Instant> {
        match nanos.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.received + std::time::Duration::from_nanos(n - 1)),
        }
    }

    /// Asks the device to drop the sequence now, as dropping the guard does, keeping the guard
    /// to read the progress made until then.
    pub fn abort(&self) {
        self.signals.aborted.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        self.abort();
    }
}

/// What a reader of sequences' tokens holds to tell the device it made room.
#[derive(Debug, Clone)]
pub struct RoomSignal(Arc<Notify>);

impl RoomSignal {
    /// Pokes `wake`, the device's notifier.
    pub(crate) fn new(wake: Arc<Notify>) -> Self {
        RoomSignal(wake)
    }

    /// To call after each token taken off `tokens`: if the buffer was full, the device had
    /// paused the sequence (and may be idle for it); this tells it there is room again.
    pub fn took(&self, tokens: &mpsc::Receiver<Emitted>) {
        if tokens.len() + 1 == TOKEN_BUFFER {
            self.0.notify_one();
        }
    }
}
