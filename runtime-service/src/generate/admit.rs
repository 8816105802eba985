//! Getting a generation onto the device: its model's memory loaded (riding out a reconnect to
//! memory-service), a check that it can ever fit, then the hand-over.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, sleep_until},
};
use tracing::Instrument;

use super::{Generation, OnDevice, Stop, Timings};
use crate::{
    core::{Submission, TOKEN_BUFFER},
    error::Error,
    executor::Flight,
    mock_lm::Decoder,
};

/// Attempts at loading a model's memory while memory-service is unreachable, 50 ms apart and
/// doubling: a reconnect is waited out, an outage answered within half a second.
const LOAD_ATTEMPTS: u32 = 4;
const LOAD_BACKOFF: Duration = Duration::from_millis(50);

impl Generation {
    /// Loads the model, checks that the sequence can ever fit, and hands it to the device.
    pub(super) async fn admit(&self, flight: &Arc<Flight>, timings: &mut Timings) -> Result<OnDevice, Stop> {
        let memory_started = Instant::now();
        let loader = self.shared.loader();
        let load = async {
            // A channel that just lost memory-service may fail a first call while it reconnects:
            // a few quick retries, all within the first-token deadline selected on below.
            let mut backoff = LOAD_BACKOFF;
            for attempt in 1.. {
                let once = async {
                    // Just after memory-service came back the leases held may belong to its
                    // previous life: learn its epoch first, so they are taken again, never used.
                    if !self.shared.renewer.is_healthy() {
                        self.shared
                            .renewer
                            .learn_epoch(self.shared.memory.ping(), |&(epoch, _)| epoch)
                            .await?;
                    }
                    self.plan.model.ensure_loaded(&loader).await?;
                    self.shared.activations.ensure(&loader).await?;
                    self.check_fits().await
                };
                match once.await {
                    Err(Error::MemoryUnavailable(_)) if attempt < LOAD_ATTEMPTS => {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    done => return done,
                }
            }
            Ok(())
        };
        let loaded = tokio::select! {
            loaded = load.instrument(tracing::info_span!("model.load")) => loaded,
            () = flight.cancelled().cancelled() => Err(flight.reason()),
            () = sleep_until(self.limits.first_token) => Err(Error::DeadlineExceeded(
                "the model's memory was not granted before the time-to-first-token limit or deadline".into(),
            )),
        };
        timings.memory_wait = Instant::now() - memory_started;
        let model = self.plan.model.spec.key.as_str();
        self.shared
            .metrics
            .memory_wait
            .with_label_values(&[model])
            .observe(timings.memory_wait.as_secs_f64());
        loaded?;
        // The serving front end's own time (vLLM's API server, another process): it delays this
        // request without holding the device.
        let config = &self.shared.config;
        let frontend = config.time_scale.to_wall(Duration::from_secs_f64(config.device.frontend_s));
        if !frontend.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(frontend) => {}
                () = flight.cancelled().cancelled() => return Err(flight.reason().into()),
            }
        }
        let (tokens_tx, tokens) = mpsc::channel(TOKEN_BUFFER);
        let (outcome_tx, outcome) = oneshot::channel();
        let plan = &self.plan;
        let submission = Submission {
            lane: plan.model.lane,
            received: self.started,
            prompt_tokens: plan.prompt_tokens,
            prompt_ids: plan.prompt_ids.clone(),
            max_tokens: plan.max_tokens,
            decoder: Decoder::primed(
                plan.model.lm,
                plan.prompt_hash,
                plan.seed,
                plan.sampling,
                plan.stops.clone(),
            )
            .with_tokenizer(plan.model.bundle.foreign()),
            tokens: tokens_tx,
            outcome: outcome_tx,
            abort: flight.cancelled().child_token(),
            flight: flight.clone(),
            span: tracing::Span::current(),
        };
        let guard = self.shared.device.submit(submission)?;
        Ok(OnDevice { tokens, outcome, guard })
    }

    /// A sequence whose prompt and completion need more KV blocks than memory-service's whole
    /// kv-cache pool holds, or than the device has room for beside its weights and activations,
    /// could never finish: refuse it now rather than preempt it forever.
    async fn check_fits(&self) -> Result<(), Error> {
        let config = &self.shared.config;
        let spec = &self.plan.model.spec;
        let block_bytes = spec.block_bytes(config.kv_block_tokens);
        let tokens = self.plan.prompt_tokens + self.plan.max_tokens;
        let needed = u64::from(tokens).div_ceil(u64::from(config.kv_block_tokens)) * block_bytes;
        let capacity = self.shared.kv_capacity().await?;
        // Whole blocks only: a pool is carved into blocks of this size.
        let usable = capacity / block_bytes * block_bytes;
        if needed > usable {
            return Err(Error::Unservable(format!(
                "{tokens} tokens of {} need {needed} bytes of kv-cache but the pool holds {capacity} bytes; \
                 lower max_tokens or shorten the prompt",
                spec.key
            )));
        }
        let room = self.shared.device_memory.kv_room();
        if needed > room / block_bytes * block_bytes {
            return Err(Error::Unservable(format!(
                "{tokens} tokens of {} need {needed} bytes of kv-cache but the device {} has room for {room} \
                 beside its weights and activations; lower max_tokens or shorten the prompt",
                spec.key, config.device.name
            )));
        }
        Ok(())
    }
}
