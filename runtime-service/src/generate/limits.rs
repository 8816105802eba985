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
    /// while memory-service does not confirm its leases (`memory`, see `core::run`), so a limit
    /// of ours (first token, idle gap) that runs out during, or right after, an outage was
    /// cut short by the memory authority, not by the model or the client: UNAVAILABLE, with
    /// a retry hint. The caller's own deadline, or the lifetime limit, stays DEADLINE_EXCEEDED.
    pub(super) fn no_token(
        &self,
        until: Instant,
        why: &str,
        memory: &watch::Receiver<bool>,
        fenced: bool,
    ) -> Error {
        // Also an outage: renewals still answer but too late, so the local lease timer holds
        // the device's steps (`fenced`) though health has not turned yet.
        let outage = !*memory.borrow() || memory.has_changed().unwrap_or(false) || fenced;
        if until < self.end && outage {
            return Error::MemoryUnavailable(format!(
                "{why}: the device paused its steps because lease renewals with memory-service were failing \
                 (its memory was in doubt); retry once memory-service is back"
            ));
        }
        Error::DeadlineExceeded(why.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_during_a_memory_outage_is_unavailable_and_the_callers_deadline_stays_its_own() {
        let config = crate::config::Config::default();
        let started = Instant::now();
        let limits = TimeLimits::new(&config, started, Some(Duration::from_secs(60)));
        let last = Some(started);
        let (idle, why) = limits.next_token(last);
        assert_eq!(why, "no token within the idle-gap limit");
        let (health, memory) = watch::channel(true);
        assert!(matches!(limits.no_token(idle, why, &memory, false), Error::DeadlineExceeded(_)));
        health.send_replace(false);
        let down = limits.no_token(idle, why, &memory, false);
        assert!(matches!(&down, Error::MemoryUnavailable(m) if m.contains("idle-gap")), "{down:?}");
        // Back by the time the limit ran out: the outage still took the gap.
        health.send_replace(true);
        assert!(matches!(limits.no_token(idle, why, &memory, false), Error::MemoryUnavailable(_)));
        // The caller's deadline is the caller's, outage or not.
        assert!(matches!(limits.no_token(limits.end, END, &memory, true), Error::DeadlineExceeded(_)));
        // Healthy, but the lease timer ran out (renewals answered too late): an outage too.
        let (_, memory) = watch::channel(true);
        assert!(matches!(limits.no_token(idle, why, &memory, true), Error::MemoryUnavailable(_)));
    }
}
