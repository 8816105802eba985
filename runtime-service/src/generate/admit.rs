//! Getting a generation onto the device: its model's memory loaded (riding out a reconnect to
//! memory-service), a check that it can ever fit, then the hand-over.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use super::{Generation, OnDevice, Stop, Timings};
use crate::{error::Error, executor::Flight};

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
        let frontend = config.frontend_delay();
        if !frontend.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(frontend) => {}
                () = flight.cancelled().cancelled() => return Err(flight.reason().into()),
            }
        }
        let handover = self.plan.hand_over(self.started, flight, self.tx.clone());
        let guard = self.shared.device.submit(handover.submission)?;
        Ok(OnDevice { outcome: handover.outcome, released: false, guard })
    }

    /// A sequence that could never finish is refused now rather than preempted forever.
    async fn check_fits(&self) -> Result<(), Error> {
        let config = &self.shared.config;
        let pool = self.shared.kv_capacity().await?;
        let room = self.shared.device_memory.kv_room();
        self.plan.check_fits(config.kv_block_tokens, pool, &config.device.name, room)
    }
}
