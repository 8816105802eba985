//! The engine core: one loop task owns the simulated device and every sequence on it; generation
//! tasks talk to it through a bounded inbox and a bounded event channel per sequence.
//!
//! Each step the loop takes new sequences, drops those whose caller left, lets the [`scheduler`]
//! of the next model in turn form a batch, prices it with the [`roofline`](crate::roofline), places
//! it on the [`timeline`] (overlapped or sequential), waits until the simulated GPU is done, then
//! samples a token for each sequence whose input is computed and streams it. Models loaded on
//! the device take turns step by step, as they would time-share a real GPU.
//!
//! [`scheduler`]: crate::scheduler

mod lane;
mod reclaim;
mod run;
mod setup;
mod signals;
#[cfg(test)]
mod tests;
pub mod timeline;

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::signals::SeqSignals;
pub use self::{
    lane::LaneSpec,
    reclaim::Reclaim,
    setup::{LaneParts, inbox_capacity, lanes},
    signals::{RoomSignal, SeqGuard},
    timeline::{Busy, SchedulerMode},
};
use crate::{
    error::Error,
    executor::Flight,
    kv::Link,
    metrics::Metrics,
    mock_lm::{Decoder, TokenOut},
};

/// Tokens buffered per sequence between the device and its reader (the client's HTTP/2 stream).
/// The device never waits on a reader: a sequence whose buffer is full sits out steps until it
/// drains.
pub const TOKEN_BUFFER: usize = 32;

/// Device-wide settings.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Overlapped or sequential CPU/GPU scheduling.
    pub mode: SchedulerMode,
    /// Relative jitter of GPU step times, 0 to 1.
    pub jitter: f64,
    /// Seed of the jitter, so runs repeat exactly.
    pub jitter_seed: u64,
    /// How long a model's idle slabs are kept after its last sequence leaves.
    pub kv_idle_release: Duration,
    /// Simulated seconds per wall second: step times are slept divided by it.
    pub time_scale: crate::config::TimeScale,
}

/// A sequence handed to the device.
#[derive(Debug)]
pub struct Submission {
    /// Index of the model's lane.
    pub lane: usize,
    /// When its front door received the call: time to first token and end-to-end latency count
    /// from here (vLLM's arrival time), so every front door is measured alike.
    pub received: tokio::time::Instant,
    /// Prompt length, tokens.
    pub prompt_tokens: u32,
    /// The prompt's token ids, if known: the prefix cache looks them up and stores them.
    pub prompt_ids: Arc<[u32]>,
    /// Completion tokens at most.
    pub max_tokens: u32,
    /// Produces its tokens.
    pub decoder: Decoder,
    /// Where its tokens go: straight to its reader, one hop. Its capacity is [`TOKEN_BUFFER`].
    pub tokens: mpsc::Sender<Emitted>,
    /// Where its outcome goes, once, after its last token (the token sender is dropped first).
    pub outcome: oneshot::Sender<Outcome>,
    /// Marked running when first scheduled (Cancel reports whether it was still queued).
    pub flight: Arc<Flight>,
    /// Its generation's span: KV leases it waits for join its trace.
    pub span: tracing::Span,
}

/// A submission as the device takes it, with the state its guard shares.
type Handed = (Submission, Arc<SeqSignals>);

/// A token out of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Position in the completion.
    pub index: u32,
    /// The token.
    pub token: TokenOut,
    /// GPU time of the step that produced it.
    pub gpu_time: Duration,
    /// When the device emitted it (the step's end, or later if the host fell behind).
    pub at: tokio::time::Instant,
}

/// How a sequence went, sent once at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// The model produced its end-of-sequence token (else it reached max_tokens).
    pub stopped: bool,
    /// Tokens generated.
    pub generated: u32,
    /// Times it was preempted.
    pub preemptions: u32,
    /// Most KV blocks it held at once.
    pub peak_blocks: u32,
    /// Steps it took part in.
    pub steps: u64,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    pub cached_tokens: u32,
    /// Sum of those steps' batch sizes.
    pub batch_sum: u64,
    /// From reaching the device to its first step.
    pub queue_time: Duration,
    /// CPU time of the steps it took part in.
    pub cpu_busy: Duration,
    /// GPU time of the steps it took part in.
    pub gpu_busy: Duration,
    /// GPU time lost waiting for the CPU during those steps.
    pub gpu_waiting_for_cpu: Duration,
}

/// How a sequence ended: its report, or why the device could not go on with it.
pub type Outcome = Result<Report, Error>;

/// What stops or pauses the device loop.
#[derive(Debug)]
pub struct Signals {
    /// Cancelled at shutdown: the loop ends.
    pub shutdown: CancellationToken,
    /// Until when memory-service's leases are known to hold (the renewer's local lease timer):
    /// a step runs only if it ends by then; `None` while the memory is in doubt (no step runs).
    pub memory: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    /// Where cache-only slabs are offered to memory-service and its requests for them arrive
    /// (`None`: nothing is offered).
    pub reclaim: Option<Reclaim>,
}

/// The handle the rest of the service holds on the device.
#[derive(Debug, Clone)]
pub struct Device {
    inbox: mpsc::Sender<Handed>,
    wake: Arc<Notify>,
    stopped: CancellationToken,
}

impl Device {
    /// Starts the device loop over `lanes` (one per model, each with its slab link), tracked by
    /// `tracker`; it stops at `shutdown`, failing what is left and dropping its slabs (freed).
    /// `inbox` bounds the sequences handed over but not yet taken by the loop.
    /// `wake` is the notifier the lanes' slab links were made with.
    pub fn spawn(
        settings: DeviceSettings,
        lanes: Vec<(LaneSpec, Link)>,
        inbox: usize,
        wake: Arc<Notify>,
        metrics: Metrics,
        signals: Signals,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(inbox.max(1));
        let device_loop = run::DeviceLoop::new(settings, lanes, rx, wake.clone(), metrics, signals);
        let stopped = CancellationToken::new();
        // Cancelled however the loop ends, a panic included, so health can say so.
        let guard = stopped.clone().drop_guard();
        tracker.spawn(async move {
            let _stopped = guard;
            device_loop.run().await;
        });
        Device { inbox: tx, wake, stopped }
    }

    /// What a reader of its sequences' tokens pokes when it made room (see [`RoomSignal::took`]).
    pub fn room_signal(&self) -> RoomSignal {
        RoomSignal::new(self.wake.clone())
    }

    /// Cancelled once the device loop has ended (at shutdown, or if it failed).
    pub fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    /// Hands `submission` to the device; the sequence lives there until the guard returned is
    /// dropped, its reader hangs up, or it ends. The caller sizes admission so the inbox has room;
    /// a full inbox is answered as overload all the same.
    pub fn submit(&self, submission: Submission) -> Result<SeqGuard, Error> {
        let signals = Arc::new(SeqSignals::default());
        let guard = SeqGuard::new(signals.clone(), self.wake.clone(), submission.received);
        match self.inbox.try_send((submission, signals)) {
            Ok(()) => Ok(guard),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(Error::Overloaded { queued: self.inbox.max_capacity(), limit: self.inbox.max_capacity() })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::ShuttingDown),
        }
    }
}
