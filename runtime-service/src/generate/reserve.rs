//! Reserving a generation's memory: one atomic Allocate, retried with backoff and jitter while
//! memory is short or unreachable — before the first token only.

use tokio::time::{Instant, sleep_until};

use super::Plan;
use crate::{
    engine::{SplitMix64, fnv1a},
    error::Error,
    executor::Flight,
    memory::{Ask, Reservation, unique_scope},
    models::{ACTIVATIONS, KV_CACHE},
    state::Shared,
};

/// Reserves kv-cache for prompt + max_tokens and activations for the tokens in flight, in one
/// call, under the generation's scope. Gives up at `until` (the first-token deadline).
pub(super) async fn reserve(
    shared: &Shared,
    plan: &Plan,
    flight: &Flight,
    until: Instant,
) -> Result<Reservation, Error> {
    let config = &shared.config;
    let mut ask = Ask {
        items: vec![
            (KV_CACHE, plan.kv_bytes()),
            (ACTIVATIONS, plan.activation_bytes(config.pipeline_depth as usize)),
        ],
        scope: String::new(),
        ttl: config.lease_ttl,
        max_wait: config.memory_wait,
    };
    let started = Instant::now();
    let mut jitter = SplitMix64::new(fnv1a(plan.request_id.as_bytes()));
    let mut checked = false;
    let mut attempt = 0;
    loop {
        attempt += 1;
        ask.scope = unique_scope(&config.instance, "gen", &plan.request_id);
        // The server-side wait must end before our own deadline, or its answer arrives too late.
        ask.max_wait = config.memory_wait.min(until.saturating_duration_since(Instant::now()) * 9 / 10);
        let once = async {
            if !checked {
                shared.memory.check_fits(&ask).await?;
                checked = true;
            }
            Reservation::acquire(&shared.memory, &shared.renewer, &shared.tracker, &ask).await
        };
        let result = tokio::select! {
            result = once => result,
            () = flight.cancelled().cancelled() => return Err(flight.reason()),
            () = sleep_until(until) => return Err(deadline()),
        };
        let err = match result {
            Ok(reservation) => return Ok(reservation),
            Err(err) if err.is_transient() && attempt < config.retry_attempts => err,
            Err(Error::MemoryExhausted { detail, .. }) => {
                return Err(Error::MemoryExhausted {
                    detail,
                    attempts: attempt,
                    waited: Instant::now() - started,
                });
            }
            Err(err) => return Err(err),
        };
        // Exponential backoff with jitter in [½, 1) of the step, so that generations refused
        // together do not come back together.
        let step =
            config.retry_backoff.saturating_mul(1 << (attempt - 1).min(16)).min(config.retry_backoff_max);
        let backoff = step.mul_f64(0.5 + jitter.next_f64() / 2.0);
        tracing::debug!(request_id = %plan.request_id, attempt, ?backoff, cause = %err, "memory not granted; retrying");
        if Instant::now() + backoff >= until {
            return Err(match err {
                Error::MemoryExhausted { detail, .. } => {
                    Error::MemoryExhausted { detail, attempts: attempt, waited: Instant::now() - started }
                }
                other => other,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = flight.cancelled().cancelled() => return Err(flight.reason()),
        }
    }
}

fn deadline() -> Error {
    Error::DeadlineExceeded("memory was not granted before the time-to-first-token limit or deadline".into())
}
