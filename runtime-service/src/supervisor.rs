//! Readiness: health turns SERVING once memory-service answers, the device's activations are
//! leased and the preload models are loaded, and back to NOT_SERVING while any is lost
//! (memory-service down or restarted).

use std::{sync::Arc, time::Duration};

use serving::grpc::Health as HealthReporter;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{error::Error, state::Shared};

/// Runs until shutdown. If the device loop ends before shutdown (it failed), nothing can be
/// served any more: health stays NOT_SERVING so Kubernetes restarts the pod.
pub(crate) async fn run(shared: Arc<Shared>, health: HealthReporter) {
    tokio::select! {
        () = supervise(&shared, &health) => {}
        () = shared.device.stopped().cancelled() => {
            if !shared.shutdown.is_cancelled() {
                error!("the device loop stopped unexpectedly; runtime-service can no longer serve");
                serving::grpc::set_health(&health, false).await;
            }
        }
    }
}

async fn supervise(shared: &Shared, health: &HealthReporter) {
    loop {
        if !become_ready(shared).await {
            return;
        }
        serving::grpc::set_health(health, true).await;
        info!("ready: memory-service reachable, activations leased, preload models loaded");
        if !stay_ready(shared).await {
            return;
        }
        serving::grpc::set_health(health, false).await;
        warn!("not ready: memory-service unreachable or model memory lost; recovering");
    }
}

/// Retries until ready; false on shutdown.
async fn become_ready(shared: &Shared) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            // A new epoch means memory-service restarted and forgot every lease: whatever this
            // runtime held is gone and must be taken again before it may say it is ready.
            let (_, limits) = shared.renewer.learn_epoch(shared.memory.ping(), |&(epoch, _)| epoch).await?;
            check_limits(&shared.config, limits.as_ref())?;
            let loader = shared.loader();
            shared.activations.ensure(&loader).await?;
            for model in shared.models.iter().filter(|m| m.spec.preload) {
                model.ensure_loaded(&loader).await?;
            }
            // Learned now rather than by the first Generate: a request then reaches the device
            // with no memory-service round trip on its way (a burst's requests arrive together).
            shared.kv_capacity().await?;
            // Unary calls working is not enough: leases that cannot be renewed expire and their
            // memory goes to others. Ready only while the keep-alive rounds succeed.
            if !shared.renewer.is_healthy() {
                return Err(Error::MemoryUnavailable(
                    "lease renewals over the keep-alive stream are failing".into(),
                ));
            }
            Ok::<(), Error>(())
        };
        let result = tokio::select! {
            () = shared.shutdown.cancelled() => return false,
            result = attempt => result,
        };
        match result {
            Ok(()) => return true,
            Err(err @ (Error::MemoryExhausted { .. } | Error::Unservable(_))) => {
                // Retrying will not help unless someone frees memory: say what to change.
                let preload: u64 =
                    shared.models.iter().filter(|m| m.spec.preload).map(|m| m.spec.arch.weight_bytes()).sum();
                warn!(
                    cause = %err,
                    preload_weight_bytes = preload,
                    activation_bytes = shared.activations.bytes(),
                    retry_in = ?backoff,
                    "not ready yet: memory-service has no room for the preloaded models' weights or the device's \
                     activations; size its pools for this device (memory-service --device / --pool) or preload \
                     fewer models (preload = false in --config)"
                );
            }
            Err(err) => warn!(cause = %err, retry_in = ?backoff, "not ready yet"),
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return false,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Waits for the renewer to fail or a preload model's memory to be lost (true: recover), or for
/// shutdown (false).
async fn stay_ready(shared: &Shared) -> bool {
    let degraded = CancellationToken::new();
    let preloaded = shared.models.iter().filter(|m| m.spec.preload).filter_map(|m| m.lost_signal());
    for lost in preloaded.chain(shared.activations.lost_signal()) {
        let degraded = degraded.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = lost.cancelled() => degraded.cancel(),
                () = degraded.cancelled() => {}
            }
        });
    }
    let mut healthy = shared.renewer.healthy();
    // Failing already (a round failed since readiness was checked): recover at once.
    if !*healthy.borrow_and_update() {
        degraded.cancel();
        return true;
    }
    let renewals_failing = async {
        while healthy.changed().await.is_ok() {
            if !*healthy.borrow_and_update() {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    let recover = tokio::select! {
        () = shared.shutdown.cancelled() => false,
        () = degraded.cancelled() => true,
        () = renewals_failing => true,
    };
    degraded.cancel(); // also ends the watcher tasks
    recover
}

/// Refuses readiness while this runtime's lease TTL or memory wait is above what memory-service
/// accepts: every Allocate would be refused, so serving would only fail each request.
fn check_limits(
    config: &crate::Config,
    limits: Option<&proto::memory::v1::ServerLimits>,
) -> Result<(), Error> {
    let Some(limits) = limits else { return Ok(()) };
    let as_std = |d: Option<&prost_types::Duration>| d.and_then(|d| Duration::try_from(*d).ok());
    let mut problems = Vec::new();
    if let Some(max) = as_std(limits.max_ttl.as_ref())
        && config.lease_ttl > max
    {
        problems.push(format!(
            "lease TTL {:?} is above its maximum {max:?}: lower --lease-ttl-ms",
            config.lease_ttl
        ));
    }
    if let Some(max) = as_std(limits.max_wait.as_ref())
        && config.memory_wait > max
    {
        problems.push(format!(
            "memory wait {:?} is above its maximum {max:?}: lower --memory-wait-ms",
            config.memory_wait
        ));
    }
    if problems.is_empty() { Ok(()) } else { Err(Error::MemoryRefused(problems.join("; "))) }
}
