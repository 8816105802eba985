//! KV blocks on the device: preemption without a token sent twice, waiting for and leasing
//! slabs, blocks back on every exit, and failing fast when memory-service is unreachable.

use super::*;

#[tokio::test(start_paused = true)]
async fn preemption_recomputes_without_sending_a_token_twice() {
    // 6 blocks of 4 tokens for four sequences that each grow to 3 blocks.
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.slabs.give(6).await;
    rig.no_more_memory();
    let mut seqs: Vec<Seq> = (0..4).map(|i| rig.submit(&format!("s{i}"), "two words", 9)).collect();
    let mut preemptions = 0;
    for seq in &mut seqs {
        let (seen, outcome) = drain(seq).await;
        let report = outcome.expect("every sequence completes");
        let indices: Vec<u32> = seen.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, (0..9).collect::<Vec<_>>(), "each index once, in order");
        preemptions += report.preemptions;
        assert!(report.peak_blocks <= 3);
    }
    assert!(preemptions > 0, "the pool was too small for all four at once");
    assert_eq!(rig.metrics.preemptions.get(), u64::from(preemptions));
    assert_eq!(rig.used_blocks(), 0);
    // vLLM's names count the same, each recomputed sequence finishing once.
    assert_eq!(rig.vllm("vllm:num_preemptions_total", ""), f64::from(preemptions));
    assert_eq!(rig.vllm("vllm:request_success_total", r#"finished_reason="length""#), 4.0);
    assert_eq!(rig.vllm("vllm:generation_tokens_total", ""), 36.0, "each token once");
    assert_eq!(rig.vllm("vllm:request_generation_tokens_sum", ""), 36.0);
    assert_eq!(rig.vllm("vllm:num_requests_running", ""), 0.0);
    assert_eq!(rig.vllm("vllm:kv_cache_usage_perc", ""), 0.0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_sequence_in_a_contended_pool_runs_to_completion_once_admitted() {
    // Blocks of 4 tokens; a 2-token prompt and 64 tokens to generate: 17 blocks in all. Asking
    // only for what it holds now would have it preempted (and recomputed from zero) every time it
    // filled a block: 16 times, 600-odd tokens recomputed.
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.contended();
    let mut seq = rig.submit("long", "two words", 64);
    let (seen, outcome) = drain(&mut seq).await;
    let report = outcome.expect("finished");
    assert_eq!(seen.len(), 64);
    assert_eq!(report.preemptions, 0, "never recomputed");
    assert_eq!(report.steps, 64, "one prefill step and 63 decodes, nothing twice");
    assert_eq!(report.peak_blocks, 17, "ceil((2 + 64) / 4)");
    assert_eq!(rig.metrics.preemptions.get(), 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_slab_is_not_returned_while_the_next_steps_want_its_blocks() {
    // Eight sequences grow together, so load only rises until they all end in the same step:
    // every block leased before then is wanted, and no slab should go back. With slabs of at most
    // 2 blocks over no low watermark, a slab return that ignores the demand the next steps
    // publish (a block per sequence for its next 4 tokens) frees one a step and leases it again
    // the step after.
    let rig = rig_with_slabs(SchedulerMode::Overlapped, 1.0, LIMITS, 0, 2);
    let granted = rig.generous_counting();
    // Prompts of 1 to 4 tokens: two sequences cross a block boundary at each step, so slabs of
    // 2 blocks come and the newest is idle while the older ones serve the others.
    let prompts = ["one", "two words", "three words here", "four words right here"];
    let seqs: Vec<Seq> = (0..8).map(|i| rig.submit(&format!("s{i}"), prompts[i % 4], 40)).collect();
    let readers: Vec<_> =
        seqs.into_iter().map(|mut seq| tokio::spawn(async move { drain(&mut seq).await })).collect();
    for reader in readers {
        let (seen, outcome) = reader.await.expect("reader");
        assert_eq!((seen.len(), outcome.expect("finished").preemptions), (40, 0));
    }
    // Wait for the device to publish its gauges after the last step.
    while rig.used_blocks() > 0 {
        tokio::task::yield_now().await;
    }
    let granted = granted.load(std::sync::atomic::Ordering::Relaxed);
    let held = u64::try_from(rig.held_blocks()).expect("a count");
    assert_eq!(granted, held, "{} blocks returned while still wanted", granted - held);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_sequence_waits_for_blocks_and_its_shortfall_is_asked_of_the_leaser() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    let mut seq = rig.submit("a", "a prompt of six words here", 3);
    // No blocks at all: the device publishes its demand and waits (no busy loop, no token).
    while rig.slabs.missing() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(rig.slabs.missing(), 2, "ceil(6 / 4) blocks for the prompt");
    assert!(seq.tokens.try_recv().is_err());
    rig.slabs.give(8).await;
    let (seen, outcome) = drain(&mut seq).await;
    assert_eq!(seen.len(), 3);
    assert!(outcome.is_ok());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_and_hang_up_return_blocks_and_shutdown_fails_the_rest() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.slabs.give(64).await;
    let mut cancelled = rig.submit("c", "cancel me", 500);
    let hung_up = rig.submit("h", "hang up", 500);
    let mut survivor = rig.submit("s", "shut down", 500);
    cancelled.tokens.recv().await.expect("a first token");
    assert!(rig.used_blocks() > 0);
    // Cancel ends its generation task, which drops its guard; the other's reader hangs up.
    rig.executor.cancel("c", None, false).expect("in flight");
    drop(cancelled.guard);
    let Seq { tokens, outcome, guard: _owner_still_there, .. } = hung_up;
    drop((tokens, outcome));
    // Both are swept at the next step; the survivor keeps streaming.
    for _ in 0..3 {
        survivor.tokens.recv().await.expect("still streaming");
    }
    // The cancelled one's channel closes after what was buffered, with no outcome: its task
    // knows why it ended.
    while cancelled.tokens.recv().await.is_some() {}
    assert!((&mut cancelled.outcome).await.is_err());
    assert!(rig.used_blocks() <= 2, "only the survivor's blocks are left");
    let tracker = rig.tracker.clone();
    rig.shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    while survivor.tokens.recv().await.is_some() {}
    assert!(matches!((&mut survivor.outcome).await, Ok(Err(crate::error::Error::ShuttingDown))));
    // Cancelled, hung up and cut by the shutdown: each counted once, as an abort.
    assert_eq!(rig.vllm("vllm:request_success_total", r#"finished_reason="abort""#), 3.0);
    assert_eq!(rig.vllm("vllm:e2e_request_latency_seconds_count", ""), 3.0);
    assert_eq!(rig.vllm("vllm:num_requests_running", ""), 0.0);
}

#[tokio::test(start_paused = true)]
async fn sequences_waiting_for_blocks_fail_fast_once_memory_service_is_unreachable() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    let slabs = rig.slabs.clone();
    tokio::spawn(async move {
        loop {
            slabs.asked().await;
            slabs.report_failure(crate::error::Error::MemoryUnavailable("connection refused".into()));
        }
    });
    let started = Instant::now();
    let mut seq = rig.submit("a", "a prompt", 4);
    let (seen, outcome) = drain(&mut seq).await;
    assert!(seen.is_empty());
    assert!(matches!(outcome, Err(crate::error::Error::MemoryUnavailable(_))), "{outcome:?}");
    assert!(Instant::now() - started < Duration::from_secs(1), "no wait for a deadline");
    rig.stop().await;
}

/// An owner that gives up mid-step (Cancel, a limit) gets no token from that step: the device
/// checks the abort before it samples, and the next sweep takes the sequence off.
#[tokio::test(start_paused = true)]
async fn no_token_follows_an_abort() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.slabs.give(64).await;
    let mut seq = rig.submit("a", "abort me", 500);
    seq.tokens.recv().await.expect("a first token");
    // The device is now in its next step; whatever sits in the buffer was sent before.
    let buffered = seq.tokens.len();
    seq.guard.abort();
    let mut after = 0;
    while seq.tokens.recv().await.is_some() {
        after += 1;
    }
    assert_eq!(after, buffered, "tokens sent after the abort");
    assert!((&mut seq.outcome).await.is_err(), "its owner knows why: no outcome");
    assert_eq!(rig.used_blocks(), 0);
    rig.stop().await;
}
