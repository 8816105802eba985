//! Step times on the paused clock: the roofline, the timeline (overlapped or sequential), one
//! shared step per batch, chunked prefill and mixed steps.

use super::*;

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
    let limits = StepLimits { token_budget: 256, ..LIMITS };
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
    let rig = rig(SchedulerMode::Overlapped, 1.0, StepLimits { token_budget: 4096, ..LIMITS });
    rig.generous();
    let mut first = rig.submit("a", "a short prompt", 12);
    let (third, at_third) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut third = Some(third);
        while let Some(emitted) = first.tokens.recv().await {
            seen.push(Instant::now());
            first.room.took(&first.tokens);
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

/// Overlapped, step N+1 is formed while step N runs, so a sequence that arrives during step N
/// waits for step N+2 (a step more than sequential), as SGLang's and vLLM's overlap schedulers
/// charge it; an idle device takes an arrival at once in both modes.
#[tokio::test(start_paused = true)]
async fn overlap_charges_an_arrival_during_a_step_one_more_step() {
    let mut waited = Vec::new();
    for mode in [SchedulerMode::Sequential, SchedulerMode::Overlapped] {
        let rig = rig(mode, 1.0, LIMITS);
        rig.slabs.give(64).await;
        let mut a = rig.submit("a", "one", 20);
        let mut a_at = Vec::new();
        // Three of A's tokens, then B arrives: the device is in the middle of A's next step.
        for _ in 0..3 {
            let emitted = a.tokens.recv().await.expect("a token");
            a_at.push((emitted.index, Instant::now()));
        }
        let mut b = rig.submit("b", "two", 2);
        let ((a_rest, _), (b_at, outcome)) = tokio::join!(drain(&mut a), drain(&mut b));
        a_at.extend(a_rest);
        outcome.expect("b finished");
        // B shares its steps with A: its first token comes with one of A's.
        let first = b_at[0].1;
        let with =
            a_at.iter().position(|&(_, at)| at == first).expect("B's first token comes with one of A's");
        waited.push(with - 2); // steps after the one that produced A's third token
        rig.stop().await;
    }
    assert_eq!(waited, [2, 3], "sequential: the step after the one running; overlapped: one more");

    // Idle: no step to overlap with, so the first arrival runs at once in either mode.
    let rig = rig(SchedulerMode::Overlapped, 1.0, LIMITS);
    rig.slabs.give(64).await;
    let start = Instant::now();
    let mut a = rig.submit("a", "four words of prompt", 1);
    let (seen, _) = drain(&mut a).await;
    let want = expected(&rig, SchedulerMode::Overlapped, Duration::from_millis(1), 4, 1, start);
    assert!(within_a_tick(seen[0].1, want[0]), "{:?} vs {:?}", seen[0].1 - start, want[0] - start);
    rig.stop().await;
}

/// Overlapped, a sequence a stop token ends keeps its batch slot through the step already formed
/// (the scheduler had not seen the stop), so with room for one sequence the next one waits a
/// step more than sequential; its caller gets the outcome at once either way.
#[tokio::test(start_paused = true)]
async fn overlap_sees_a_stop_token_one_step_late() {
    let lm = MockLmKind::Webllm.lm();
    let first = Decoder::new(lm, "one", 7, GREEDY).next_token().expect("a first token").id;
    let stops = crate::mock_lm::Stops { stop_token_ids: vec![first], ..Default::default() };
    let mut gaps = Vec::new();
    for mode in [SchedulerMode::Sequential, SchedulerMode::Overlapped] {
        let rig = rig(mode, 1.0, StepLimits { max_batch: 1, ..LIMITS });
        rig.slabs.give(64).await;
        let mut a = rig.submit_stopping("a", "one", 8, stops.clone());
        let mut b = rig.submit("b", "two", 1);
        let ((a_at, a_outcome), (b_at, _)) = tokio::join!(drain(&mut a), drain(&mut b));
        let report = a_outcome.expect("a finished");
        assert!(report.stopped && report.generated == 1, "{mode:?}: a stops at its first token");
        gaps.push(b_at[0].1 - a_at[0].1);
        rig.stop().await;
    }
    // Sequential: B's step (1 ms of CPU, then its GPU time) right after A's. Overlapped, the CPU
    // is hidden, but the decode step A kept its slot for comes first: two GPU steps.
    let step =
        rig(SchedulerMode::Overlapped, 1.0, LIMITS).roofline.step([Work { tokens: 1, context: 0 }]).gpu;
    let tick = Duration::from_millis(1);
    assert!(gaps[0] >= step && gaps[0] <= step + tick * 2, "sequential {:?}, step {step:?}", gaps[0]);
    assert!(gaps[1] + tick >= step * 2 && gaps[1] <= step * 2 + tick * 2, "overlapped {:?}", gaps[1]);
}

/// At `--time-scale` 10 a step takes a tenth of its simulated time in wall time, and the lease
/// fence (the renewer's local lease timer) is wall time too: a step that ends before the fence in
/// wall time runs, though its simulated duration would reach past it.
#[tokio::test(start_paused = true)]
async fn at_a_time_scale_steps_are_fenced_by_their_wall_duration() {
    // A decode step here is 1 ms of CPU and just over 3 ms of GPU: 0.4 ms of wall time at 10×.
    let fence = Instant::now() + Duration::from_millis(2);
    let extras = Extras {
        time_scale: crate::config::TimeScale::new(10.0).expect("a valid scale"),
        memory: tokio::sync::watch::channel(Some(fence)).1,
        ..Extras::default()
    };
    let rig = rig_with(SchedulerMode::Sequential, 1.0, LIMITS, extras);
    rig.slabs.give(64).await;
    let mut seq = rig.submit("a", "four words of prompt", 100);
    let mut tokens = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), seq.tokens.recv()).await {
        tokens += 1;
        seq.room.took(&seq.tokens);
    }
    // Some steps fit before the fence (each 4 ms simulated, more than the whole 2 ms); then the
    // fence, which no renewal moves here, holds the rest.
    assert!((1..100).contains(&tokens), "{tokens} tokens before the fence");
    rig.stop().await;
}
