//! What every path onto the device shares, the live front doors and the offline simulator
//! alike: the check that a sequence can ever fit, and the submission handed to the device.

use std::sync::Arc;

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::Plan;
use crate::{
    core::{Emitted, Outcome, Submission},
    error::Error,
    executor::Flight,
    mock_lm::Decoder,
};

/// A submission and the generation's end of its outcome.
#[derive(Debug)]
pub struct HandOver {
    /// For [`Device::submit`](crate::core::Device::submit).
    pub submission: Submission,
    /// Its outcome, after its last token.
    pub outcome: oneshot::Receiver<Outcome>,
}

impl Plan {
    /// The device's view of this plan: a submission received at `received` (time to first token
    /// counts from there), marked running in `flight`, in the current span's trace, whose tokens
    /// go to `tokens` (a channel of [`TOKEN_BUFFER`](crate::core::TOKEN_BUFFER) tokens).
    pub fn hand_over(
        &self,
        received: Instant,
        flight: &Arc<Flight>,
        tokens: mpsc::Sender<Emitted>,
    ) -> HandOver {
        let (outcome_tx, outcome) = oneshot::channel();
        let submission = Submission {
            lane: self.model.lane,
            received,
            prompt_tokens: self.prompt_tokens,
            prompt_ids: self.prompt_ids.clone(),
            max_tokens: self.max_tokens,
            decoder: Decoder::primed(
                self.model.lm,
                self.prompt_hash,
                self.seed,
                self.sampling,
                self.stops.clone(),
            )
            .with_tokenizer(self.model.bundle.foreign()),
            tokens,
            outcome: outcome_tx,
            flight: flight.clone(),
            span: tracing::Span::current(),
        };
        HandOver { submission, outcome }
    }

    /// Refuses a sequence whose prompt and completion need more KV blocks of `block_tokens`
    /// than the kv-cache pool's `pool_bytes` hold, or than the device `device` has `room` for
    /// beside its weights and activations: it could never finish, and would be preempted forever.
    pub fn check_fits(
        &self,
        block_tokens: u32,
        pool_bytes: u64,
        device: &str,
        room: u64,
    ) -> Result<(), Error> {
        let spec = &self.model.spec;
        let block_bytes = spec.block_bytes(block_tokens);
        let tokens = self.prompt_tokens + self.max_tokens;
        let needed = u64::from(tokens).div_ceil(u64::from(block_tokens)) * block_bytes;
        // Whole blocks only: a pool is carved into blocks of this size.
        if needed > pool_bytes / block_bytes * block_bytes {
            return Err(Error::Unservable(format!(
                "{tokens} tokens of {} need {needed} bytes of kv-cache but the pool holds {pool_bytes} bytes; \
                 lower max_tokens or shorten the prompt",
                spec.key
            )));
        }
        if needed > room / block_bytes * block_bytes {
            return Err(Error::Unservable(format!(
                "{tokens} tokens of {} need {needed} bytes of kv-cache but the device {device} has room for {room} \
                 beside its weights and activations; lower max_tokens or shorten the prompt",
                spec.key
            )));
        }
        Ok(())
    }
}
