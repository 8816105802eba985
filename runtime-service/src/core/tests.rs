//! The device loop on tokio's paused clock: step times as the roofline and the timeline say, one
//! shared step for a batch, overlap against sequential, preemption without a token sent twice,
//! and blocks back on every exit.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::*;
use crate::{
    device::{Arch, DeviceSpec, Roofline, Work},
    engine::{EngineKind, text::Sampling},
    executor::{Executor, Ticket},
    kv::{self, LeaserEnd},
    scheduler::{KvReserve, Limits},
};

const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0 };

/// 1 MB of weights at 1 GB/s (1 ms) plus a 2 ms launch: a decode step costs just over 3 ms.
fn arch() -> Arch {
    Arch {
        parameters: 1_000_000,
        layers: 1,
        hidden_size: 8,
        attention_heads: 1,
        kv_heads: 1,
        head_dim: 8,
        intermediate_size: 8,
        dtype_bytes: 1,
        context_length: 4096,
    }
}

fn spec(cpu_ms: f64) -> DeviceSpec {
    DeviceSpec {
        name: "test".into(),
        memory_bytes: 1 << 30,
        bandwidth_bytes_per_s: 1e9,
        flops_per_s: 1e12,
        bandwidth_efficiency: 1.0,
        flops_efficiency: 1.0,
        launch_overhead_s: 2e-3,
        cpu_per_step_s: cpu_ms / 1e3,
        cpu_per_seq_s: 0.0,
    }
}

struct Rig {
    device: Device,
    slabs: Arc<LeaserEnd>,
    metrics: Metrics,
    executor: Arc<Executor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    roofline: Roofline,
}

fn rig(mode: SchedulerMode, cpu_ms: f64, limits: Limits) -> Rig {
    let metrics = Metrics::new(&["m"]).expect("metrics");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    let (link, slabs) = kv::link(wake.clone());
    let roofline = Roofline::new(&spec(cpu_ms), &arch());
    let lane = LaneSpec {
        model: "m".into(),
        roofline: roofline.clone(),
        block_tokens: 4,
        limits,
        low_watermark: 0,
        slab_blocks: 1024,
    };
    let settings =
        DeviceSettings { mode, jitter: 0.0, jitter_seed: 1, kv_idle_release: Duration::from_secs(3600) };
    let device = Device::spawn(
        settings,
        vec![(lane, link)],
        64,
        wake,
        metrics.clone(),
        Signals { shutdown: shutdown.clone(), memory: confirmed() },
        &tracker,
    );
    Rig {
        device,
        slabs: Arc::new(slabs),
        metrics,
        executor: Executor::new(64, 64, shutdown.clone()),
        shutdown,
        tracker,
        roofline,
    }
}

const LIMITS: Limits = Limits { max_batch: 16, token_budget: 256, reserve: KvReserve::Paged };

/// A sequence on the device, as its generation task sees it.
struct Seq {
    tokens: mpsc::Receiver<Emitted>,
    outcome: oneshot::Receiver<Outcome>,
    guard: SeqGuard,
    _ticket: Ticket,
}

impl Rig {
    fn submit(&self, name: &str, prompt: &str, max_tokens: u32) -> Seq {
        let ticket = self.executor.register(name.into(), None).expect("unique id");
        let (tokens_tx, tokens) = mpsc::channel(TOKEN_BUFFER);
        let (outcome_tx, outcome) = oneshot::channel();
        let engine = EngineKind::Webllm.engine();
        let guard = self
            .device
            .submit(Submission {
                lane: 0,
                prompt_tokens: engine.count_prompt_tokens(prompt),
                max_tokens,
                decoder: Decoder::new(engine, prompt, 7, GREEDY),
                tokens: tokens_tx,
                outcome: outcome_tx,
                abort: ticket.flight().cancelled().child_token(),
                flight: ticket.flight().clone(),
                span: tracing::Span::none(),
            })
            .expect("room in the inbox");
        Seq { tokens, outcome, guard, _ticket: ticket }
    }

    /// Plays a leaser that never gets more memory: every ask is answered "no room".
    fn no_more_memory(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                slabs.report_exhausted();
            }
        });
    }

    /// Plays a leaser with all the memory in the world: every ask is granted at once.
    fn generous(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                let missing = slabs.missing();
                if missing > 0 {
                    slabs.give(missing).await;
                }
            }
        });
    }

    /// Plays a leaser on a pool others keep full: a starved lane's whole ask is granted (it
    /// waits in memory-service's first-come first-served queue until others free enough), any
    /// other ask is answered "no room".
    fn contended(&self) {
        let slabs = self.slabs.clone();
        tokio::spawn(async move {
            loop {
                slabs.asked().await;
                let missing = slabs.missing();
                if !slabs.whole() {
                    slabs.report_exhausted();
                } else if missing > 0 {
                    slabs.give(missing).await;
                }
            }
        });
    }

    fn used_blocks(&self) -> i64 {
        self.metrics.kv_blocks.with_label_values(&["m", "used"]).get()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Reads a sequence to its end: the instants its tokens arrived, and its outcome.
async fn drain(seq: &mut Seq) -> (Vec<(u32, Instant)>, Outcome) {
    let mut seen = Vec::new();
    while let Some(emitted) = seq.tokens.recv().await {
        seen.push((emitted.index, Instant::now()));
        seq.guard.drained();
    }
    let outcome = (&mut seq.outcome).await.expect("the device reports an outcome");
    (seen, outcome)
}

/// The instant the timer fires for an exact instant: tokio's timer has 1 ms ticks.
fn within_a_tick(actual: Instant, exact: Instant) -> bool {
    actual >= exact && actual - exact < Duration::from_millis(1)
}

/// Emission instants the timeline predicts for one sequence: a prefill step then decodes.
fn expected(
    rig: &Rig,
    mode: SchedulerMode,
    cpu: Duration,
    prompt: u32,
    n: u32,
    start: Instant,
) -> Vec<Instant> {
    let mut timeline = timeline::Timeline::new(mode);
    let mut at = Vec::new();
    let prefill = rig.roofline.step([Work { tokens: prompt, context: 0 }]).gpu;
    let mut now = timeline.place(start, cpu, prefill).gpu_done;
    at.push(now);
    for i in 1..n {
        let gpu = rig.roofline.step([Work { tokens: 1, context: prompt + i - 1 }]).gpu;
        now = timeline.place(now, cpu, gpu).gpu_done;
        at.push(now);
    }
    at
}

#[tokio::test(start_paused = true)]
async fn tokens_come_at_the_step_times_of_the_roofline_for_cpu_below_equal_and_above_gpu() {
    // The decode step's GPU time is just over 3 ms; CPU costs below, equal-ish and above it.
    for (mode, cpu_ms) in [
        (SchedulerMode::Overlapped, 1.0),
        (SchedulerMode::Overlapped, 3.0),
        (SchedulerMode::Overlapped, 5.0),
        (SchedulerMode::Sequential, 1.0),
        (SchedulerMode::Sequential, 5.0),
    ] {
        let rig = rig(mode, cpu_ms, LIMITS);
        rig.slabs.give(64).await;
        let start = Instant::now();
        let mut seq = rig.submit("a", "four words of prompt", 6);
        let (seen, outcome) = drain(&mut seq).await;
        let report = outcome.expect("finished");
        let cpu = Duration::from_secs_f64(cpu_ms / 1e3);
        let want = expected(&rig, mode, cpu, 4, 6, start);
        assert_eq!(seen.len(), 6, "{mode:?} cpu {cpu_ms}");
        for ((index, at), exact) in seen.iter().zip(&want) {
            assert!(
                within_a_tick(*at, *exact),
                "{mode:?} cpu {cpu_ms} token {index}: {:?} vs {:?}",
                *at - start,
                *exact - start
            );
        }
        assert_eq!((report.generated, report.steps, report.batch_sum), (6, 6, 6));
        rig.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn overlap_takes_max_per_step_where_sequential_takes_the_sum() {
    let mut took = Vec::new();
    for mode in [SchedulerMode::Overlapped, SchedulerMode::Sequential] {
        let rig = rig(mode, 2.0, LIMITS);
        rig.slabs.give(64).await;
        let start = Instant::now();
        let mut seq = rig.submit("a", "one", 50);
        let (seen, _) = drain(&mut seq).await;
        took.push(seen.last().expect("tokens").1 - start);
        rig.stop().await;
    }
    // GPU ~3 ms, CPU 2 ms: overlapped ≈ 50 × 3, sequential ≈ 50 × 5.
    let ratio = took[1].as_secs_f64() / took[0].as_secs_f64();
    assert!((1.6..1.7).contains(&ratio), "sequential / overlapped = {ratio}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_shares_one_step_and_pays_the_weights_once() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.slabs.give(64).await;
    let seqs: Vec<Seq> = (0..4).map(|i| rig.submit(&format!("s{i}"), "a short prompt", 10)).collect();
    let start = Instant::now();
    let readers: Vec<_> =
        seqs.into_iter().map(|mut seq| tokio::spawn(async move { drain(&mut seq).await })).collect();
    let mut ends = Vec::new();
    for reader in readers {
        let (seen, outcome) = reader.await.expect("reader");
        let report = outcome.expect("finished");
        assert_eq!(report.batch_sum, 4 * report.steps, "always in a batch of 4");
        ends.push(seen.last().expect("tokens").1);
    }
    assert!(ends.iter().all(|&e| e == ends[0]), "the same steps for all four: {ends:?}");
    // Four sequences finish in about the time one would: far less than four times as long.
    let alone = expected(&rig, SchedulerMode::Overlapped, Duration::from_millis(1), 3, 10, start);
    let one = *alone.last().expect("times") - start;
    assert!(ends[0] - start < one + one / 10, "{:?} vs {one:?}", ends[0] - start);
    assert_eq!(rig.used_blocks(), 0);
    rig.stop().await;
}

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
    rig.executor.cancel("c", None, false).expect("in flight");
    let Seq { tokens, outcome, guard, _ticket } = hung_up;
    drop((tokens, outcome, guard));
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
}

#[tokio::test(start_paused = true)]
async fn a_batch_of_three_steps_at_the_roofline_price_of_the_three() {
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.generous();
    let start = Instant::now();
    let prompts = ["two words", "three words here", "four words right here"];
    let mut seqs: Vec<Seq> =
        prompts.iter().enumerate().map(|(i, p)| rig.submit(&format!("s{i}"), p, 5)).collect();
    // Step 1 prefills the three prompts together; every later step decodes all three.
    let cpu = Duration::from_millis(1);
    let mut timeline = timeline::Timeline::new(SchedulerMode::Overlapped);
    let first = rig.roofline.step([2, 3, 4].map(|p| Work { tokens: p, context: 0 })).gpu;
    let mut at = vec![timeline.place(start, cpu, first).gpu_done];
    for k in 1..5 {
        let gpu = rig.roofline.step([2, 3, 4].map(|p| Work { tokens: 1, context: p + k - 1 })).gpu;
        at.push(timeline.place(*at.last().expect("a step"), cpu, gpu).gpu_done);
    }
    // Read all three at once: a token's arrival is its emission only if someone is reading.
    let readers: Vec<_> =
        seqs.drain(..).map(|mut seq| tokio::spawn(async move { drain(&mut seq).await })).collect();
    for reader in readers {
        let (seen, outcome) = reader.await.expect("reader");
        assert_eq!(outcome.expect("finished").batch_sum, 15, "five steps of three");
        for ((index, when), exact) in seen.iter().zip(&at) {
            assert!(
                within_a_tick(*when, *exact),
                "token {index}: {:?} vs {:?}",
                *when - start,
                *exact - start
            );
        }
    }
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks() {
    // A budget of 256 tokens per step: a 600-token prompt takes three steps (256, 256, 88).
    let limits = Limits { token_budget: 256, ..LIMITS };
    let rig = rig(SchedulerMode::Sequential, 1.0, limits);
    rig.generous();
    let start = Instant::now();
    let prompt = vec!["word"; 600].join(" ");
    let mut seq = rig.submit("long", &prompt, 2);
    let (seen, outcome) = drain(&mut seq).await;
    let cpu = Duration::from_millis(1);
    let mut timeline = timeline::Timeline::new(SchedulerMode::Sequential);
    let mut now = start;
    for (tokens, context) in [(256, 0), (256, 256), (88, 512)] {
        now = timeline.place(now, cpu, rig.roofline.step([Work { tokens, context }]).gpu).gpu_done;
    }
    assert!(
        within_a_tick(seen[0].1, now),
        "first token after three chunks: {:?} vs {:?}",
        seen[0].1 - start,
        now - start
    );
    let report = outcome.expect("finished");
    assert_eq!((report.steps, report.generated), (4, 2), "three prefill chunks, one decode");
    assert_eq!(report.peak_blocks, 151, "ceil(601 / 4) blocks, leased as the chunks went");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_prompt_arriving_mid_stream_shares_a_mixed_step_priced_as_both() {
    // A budget large enough for a 2000-token prompt in one step: its 4 GFLOP (4 ms at 1 TFLOP/s)
    // make the step compute-bound, so the mixed step is visibly longer than a decode.
    let rig = rig(SchedulerMode::Overlapped, 1.0, Limits { token_budget: 4096, ..LIMITS });
    rig.generous();
    let mut first = rig.submit("a", "a short prompt", 12);
    let (third, at_third) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut third = Some(third);
        while let Some(emitted) = first.tokens.recv().await {
            seen.push(Instant::now());
            first.guard.drained();
            if emitted.index == 2 {
                let _ = third.take().map(|t| t.send(()));
            }
        }
        seen
    });
    at_third.await.expect("three tokens");
    let mut second = rig.submit("b", &vec!["word"; 2000].join(" "), 2);
    let seen = reader.await.expect("reader");
    drain(&mut second).await.1.expect("finished");
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().copied().max().expect("gaps");
    // The first sequence's 4th token (context 3 + 3) rode in the step that prefilled the prompt.
    let mixed = rig.roofline.step([Work { tokens: 1, context: 5 }, Work { tokens: 2000, context: 0 }]);
    let decode = rig.roofline.step([Work { tokens: 1, context: 5 }]);
    assert!(mixed.gpu > decode.gpu * 3 / 2 && !mixed.memory_bound);
    assert!(longest.abs_diff(mixed.gpu) < Duration::from_millis(1), "{longest:?} vs {:?}", mixed.gpu);
    let steps = |phase: &str| rig.metrics.step_seconds.with_label_values(&[phase]).get_sample_count();
    assert_eq!(steps("mixed"), 1, "the prompt rode along with a decode");
    rig.stop().await;
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

/// A memory signal that always confirms (these tests have no memory-service).
fn confirmed() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(true).1
}
