//! The time limits of one Generate call (first token, idle gap, lifetime and the caller's
//! deadline), and what a stream cut by one of them is told.

use std::time::Duration;

use tokio::{sync::watch, time::Instant};

use crate::error::Error;

/// Why a stream cut at its end limit was cut.
pub(super) const END: &str = "the stream reached its deadline or lifetime limit";

/// The time limits of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimeLimits {
    pub(super) first_token: Instant,
    idle: Duration,
    pub(super) end: Instant,
}

impl TimeLimits {
    /// The limits of a call started at `started`, with the caller's gRPC deadline if any.
    pub(super) fn new(
        config: &crate::config::Config,
        started: Instant,
        grpc_timeout: Option<Duration>,
    ) -> Self {
        let lifetime = started + config.max_stream_lifetime;
        let end = grpc_timeout.map_or(lifetime, |d| lifetime.min(started + d));
        TimeLimits { first_token: (started + config.ttft_timeout).min(end), idle: config.idle_timeout, end }
    }

    /// The deadline for the next token, and what to say if it passes.
    pub(super) fn next_token(&self, last: Option<Instant>) -> (Instant, &'static str) {
        match last {
            None => (self.first_token, "no first token within the time-to-first-token limit or deadline"),
            Some(last) if last + self.idle < self.end => {
                (last + self.idle, "no token within the idle-gap limit")
            }
            Some(_) => (self.end, END),
        }
    }

    /// When to look again for progress: the next token's deadline as `last` sets it, or an
    /// idle gap from `now` if sooner (before the first token: a first token may come and bring
    /// the deadline forward to its own idle gap).
    pub(super) fn recheck(&self, last: Option<Instant>, now: Instant) -> Instant {
        self.next_token(last).0.min(now + self.idle)
    }

    /// Why no token came by `until`, `why` being what the limit says. The device runs no step
    /// while memory-service does not confirm its leases (see `core::run`), so a limit of ours
    /// (first token, idle gap) that runs out while an `outage` touched the gap was cut short by
    /// the memory authority, not by the model or the client: UNAVAILABLE, with a retry hint. The
    /// caller's own deadline, or the lifetime limit, stays DEADLINE_EXCEEDED.
    pub(super) fn no_token(&self, until: Instant, why: &str, outage: bool) -> Error {
        if until < self.end && outage {
            return Error::MemoryUnavailable(format!(
                "{why}: the device paused its steps because lease renewals with memory-service were failing \
                 (its memory was in doubt); retry once memory-service is back"
            ));
        }
        Error::DeadlineExceeded(why.into())
    }
}

/// What a stream knows of memory-service's health: whether it confirms the leases now, and when
/// that last changed.
#[derive(Debug)]
pub(super) struct Health {
    healthy: watch::Receiver<bool>,
    /// When a change was last seen; `None` since the stream started.
    changed_at: Option<Instant>,
    /// False once the renewer is gone: nothing more will change.
    open: bool,
}

impl Health {
    pub(super) fn new(mut healthy: watch::Receiver<bool>) -> Self {
        healthy.mark_unchanged();
        Health { healthy, changed_at: None, open: true }
    }

    /// Resolves at the next change of health (never once the renewer is gone), noting when.
    pub(super) async fn changed(&mut self) {
        if !self.open {
            return std::future::pending().await;
        }
        match self.healthy.changed().await {
            Ok(()) => self.changed_at = Some(Instant::now()),
            Err(_) => self.open = false,
        }
    }

    /// Whether an outage touched the gap since `last` (the last token; `None`: since the start):
    /// memory-service is down now, or its health changed since (an outage that began, or ended,
    /// within the gap).
    pub(super) fn touched(&self, last: Option<Instant>) -> bool {
        let changed = match (self.changed_at, last) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(last)) => at >= last,
        };
        !*self.healthy.borrow() || changed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_gap_during_a_memory_outage_is_unavailable_and_the_callers_deadline_stays_its_own() {
        let config = crate::config::Config::default();
        let started = Instant::now();
        let limits = TimeLimits::new(&config, started, Some(Duration::from_secs(60)));
        let (idle, why) = limits.next_token(Some(started));
        assert_eq!(why, "no token within the idle-gap limit");
        assert!(matches!(limits.no_token(idle, why, false), Error::DeadlineExceeded(_)));
        let down = limits.no_token(idle, why, true);
        assert!(matches!(&down, Error::MemoryUnavailable(m) if m.contains("idle-gap")), "{down:?}");
        // The caller's deadline is the caller's, outage or not.
        assert!(matches!(limits.no_token(limits.end, END, true), Error::DeadlineExceeded(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_touches_the_gap_it_falls_in_and_not_an_earlier_one() {
        let (health, healthy) = watch::channel(true);
        let mut memory = Health::new(healthy);
        let start = Instant::now();
        assert!(!memory.touched(None), "healthy throughout");
        tokio::time::advance(Duration::from_millis(10)).await;
        let before_outage = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        health.send_replace(false);
        memory.changed().await;
        assert!(memory.touched(Some(before_outage)), "down now");
        tokio::time::advance(Duration::from_millis(10)).await;
        health.send_replace(true);
        memory.changed().await;
        // Back by the time the limit ran out: the outage still took a gap that began before it,
        assert!(memory.touched(Some(before_outage)));
        assert!(memory.touched(None));
        // but not a gap that began after it ended.
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!memory.touched(Some(Instant::now())));
        assert!(start < before_outage);
        // The renewer gone: nothing changes any more, and waiting for a change never ends.
        drop(health);
        memory.changed().await;
        let never = tokio::time::timeout(Duration::from_secs(1), memory.changed()).await;
        assert!(never.is_err());
    }
}
