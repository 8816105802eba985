//! The CPU/GPU pipeline: the CPU stage prepares token N+1 while the GPU stage computes token N.
//!
//! The stages are joined by a bounded channel whose capacity is the pipeline depth, so the CPU
//! can run at most `depth` tokens ahead and throughput tends to `1 / max(cpu, gpu)` instead of
//! `1 / (cpu + gpu)`. `Mode::Sequential` runs the same work without overlap, for comparison.
//!
//! Pull-based: the caller asks [`Pipeline::next`] for each token, so the caller's own
//! backpressure (a slow client) stops the GPU stage, and dropping the pipeline stops both stages.
//!
//! Both stages run concurrently inside the caller's task (the GPU stage drives the CPU stage's
//! future whenever it waits), not as two tasks: handing every token across worker threads cost
//! more than the rest of the serving path together (futex wake-ups dominated the profile).

use std::{future::Future, pin::Pin, time::Duration};

use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until},
};

use crate::engine::{Decoder, LatencyProfile, SplitMix64, TokenOut};

/// How far behind its own schedule a stage may find itself before it concludes that its consumer
/// (not the timer) held it up and restarts its schedule from now. Above tokio's 1 ms timer
/// granularity, so timer lateness never accumulates into the measured throughput.
const SLACK: Duration = Duration::from_millis(2);

/// Scheduling of the two stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// CPU and GPU stages overlap.
    Pipelined,
    /// CPU then GPU, one token at a time.
    Sequential,
}

/// What one generation runs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Time costs.
    pub latency: LatencyProfile,
    /// Scheduling.
    pub mode: Mode,
    /// Tokens the CPU may prepare ahead of the GPU (at least 1).
    pub depth: usize,
    /// Tokens in the prompt (prefill cost).
    pub prompt_tokens: u32,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Seed of the timing jitter.
    pub jitter_seed: u64,
}

/// One token out of the GPU stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Position in the completion.
    pub index: u32,
    /// The token.
    pub token: TokenOut,
    /// GPU time spent on it.
    pub gpu_time: Duration,
}

/// Time accounting of a generation so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU stage busy time.
    pub cpu_busy: Duration,
    /// GPU stage busy time, prefill included.
    pub gpu_busy: Duration,
    /// GPU idle time waiting for the CPU stage.
    pub gpu_idle: Duration,
    /// CPU stage time blocked on a full channel, waiting for the GPU stage.
    pub cpu_stalled: Duration,
    /// Tokens emitted.
    pub tokens: u32,
    /// True once the model produced its end-of-sequence token.
    pub stopped: bool,
}

/// A token prepared by the CPU stage, or the end of the sequence.
#[derive(Debug)]
struct Prepared {
    token: Option<TokenOut>,
    cpu_time: Duration,
    /// Time the CPU stage waited for room before it could hand this token over.
    stalled: Duration,
}

/// A running generation. Dropping it drops the CPU stage with it.
#[derive(Debug)]
pub struct Pipeline {
    spec: Spec,
    decoder: Option<Decoder>,
    jitter: SplitMix64,
    stats: Stats,
    /// When the GPU finished its last piece of work, on its own drift-free schedule.
    gpu_free_at: Option<Instant>,
    cpu: Option<CpuStage>,
    done: bool,
}

/// The CPU stage: its work, and the receiving end of the channel it fills.
struct CpuStage {
    prepared: mpsc::Receiver<Prepared>,
    /// `None` once every token is prepared.
    work: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for CpuStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuStage").field("prepared", &self.prepared.len()).finish_non_exhaustive()
    }
}

/// Runs `f` to completion while also driving the CPU stage's `work`, so the two stages overlap
/// within one task.
async fn driving<T>(
    work: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    f: impl Future<Output = T>,
) -> T {
    tokio::pin!(f);
    loop {
        let Some(cpu) = work.as_mut() else { return f.await };
        tokio::select! {
            biased;
            out = &mut f => return out,
            () = cpu.as_mut() => *work = None,
        }
    }
}

fn jittered(base: Duration, jitter: f64, rng: &mut SplitMix64) -> Duration {
    if base.is_zero() || jitter <= 0.0 {
        return base;
    }
    base.mul_f64((1.0 + jitter.min(1.0) * rng.next_signed()).max(0.0))
}

/// Sleeps until `at`, skipping the timer entirely for steps already due.
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        sleep_until(at).await;
    }
}

/// Where a stage's next step starts: its own schedule, unless it fell behind by more than timer
/// lateness, which means it was held up by someone else and must restart from now.
fn schedule_base(scheduled: Instant) -> Instant {
    let now = Instant::now();
    if now > scheduled + SLACK { now } else { scheduled }
}

impl Pipeline {
    /// A pipeline over `decoder`. Nothing runs until the first [`Pipeline::next`].
    pub fn new(spec: Spec, decoder: Decoder) -> Self {
        let jitter = SplitMix64::new(spec.jitter_seed);
        Pipeline {
            spec,
            decoder: Some(decoder),
            jitter,
            stats: Stats::default(),
            gpu_free_at: None,
            cpu: None,
            done: false,
        }
    }

    /// Accounting so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The next token, or `None` when the generation is over (see [`Stats::stopped`]).
    pub async fn next(&mut self) -> Option<Emitted> {
        if self.done {
            return None;
        }
        let free_at = match self.gpu_free_at {
            Some(at) => schedule_base(at),
            None => self.prefill().await,
        };
        let emitted = match self.spec.mode {
            Mode::Pipelined => self.next_pipelined(free_at).await,
            Mode::Sequential => self.next_sequential(free_at).await,
        };
        if emitted.is_none() {
            self.done = true;
        }
        emitted
    }

    async fn prefill(&mut self) -> Instant {
        let per_token = self.spec.latency.prefill_per_token * self.spec.prompt_tokens;
        let cost = jittered(per_token, self.spec.latency.jitter, &mut self.jitter);
        let done = Instant::now() + cost;
        wait_until(done).await;
        self.stats.gpu_busy += cost;
        self.gpu_free_at = Some(done);
        if self.spec.mode == Mode::Pipelined {
            self.start_cpu_stage(done);
        }
        done
    }

    fn start_cpu_stage(&mut self, start: Instant) {
        let Some(mut decoder) = self.decoder.take() else { return };
        let (tx, rx) = mpsc::channel(self.spec.depth.max(1));
        let (cpu, jitter, max_tokens) =
            (self.spec.latency.cpu_per_token, self.spec.latency.jitter, self.spec.max_tokens);
        // Its own jitter stream, so the two stages' random draws do not depend on interleaving.
        let mut rng = SplitMix64::new(self.jitter.next_u64());
        let work = Box::pin(async move {
            let mut ready_at = start;
            for _ in 0..max_tokens {
                let cost = jittered(cpu, jitter, &mut rng);
                if !cost.is_zero() {
                    ready_at += cost;
                    wait_until(ready_at).await;
                }
                let token = decoder.next_token();
                let end = token.is_none();
                match tx.try_send(Prepared { token, cpu_time: cost, stalled: Duration::ZERO }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(mut prepared)) => {
                        // The GPU is the bottleneck: wait for room, then restart the schedule.
                        let blocked = Instant::now();
                        let Ok(permit) = tx.reserve().await else { return };
                        prepared.stalled = Instant::now() - blocked;
                        permit.send(prepared);
                        ready_at = Instant::now();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
                if end {
                    return;
                }
            }
        });
        self.cpu = Some(CpuStage { prepared: rx, work: Some(work) });
    }

    async fn next_pipelined(&mut self, free_at: Instant) -> Option<Emitted> {
        let cpu = self.cpu.as_mut()?;
        let (prepared, start) = match cpu.prepared.try_recv() {
            Ok(prepared) => (prepared, free_at),
            Err(mpsc::error::TryRecvError::Empty) => {
                let prepared = driving(&mut cpu.work, cpu.prepared.recv()).await?;
                let start = Instant::now().max(free_at);
                self.stats.gpu_idle += start - free_at;
                (prepared, start)
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
        };
        self.stats.cpu_busy += prepared.cpu_time;
        self.stats.cpu_stalled += prepared.stalled;
        self.compute(prepared.token, start).await
    }

    async fn next_sequential(&mut self, free_at: Instant) -> Option<Emitted> {
        if self.stats.tokens >= self.spec.max_tokens {
            return None;
        }
        let cost = jittered(self.spec.latency.cpu_per_token, self.spec.latency.jitter, &mut self.jitter);
        let ready = free_at + cost;
        wait_until(ready).await;
        self.stats.cpu_busy += cost;
        let token = self.decoder.as_mut()?.next_token();
        self.compute(token, ready).await
    }

    /// Runs the GPU step for `token` starting at `start`.
    async fn compute(&mut self, token: Option<TokenOut>, start: Instant) -> Option<Emitted> {
        let Some(token) = token else {
            self.stats.stopped = true;
            return None;
        };
        let cost = jittered(self.spec.latency.gpu_per_token, self.spec.latency.jitter, &mut self.jitter);
        let done = start + cost;
        // While the GPU computes token N, the CPU prepares token N+1. (A zero-cost step has
        // nothing to wait for: no clock read, no select.)
        if !cost.is_zero() {
            match self.cpu.as_mut() {
                Some(cpu) => driving(&mut cpu.work, wait_until(done)).await,
                None => wait_until(done).await,
            }
        }
        self.stats.gpu_busy += cost;
        self.gpu_free_at = Some(done);
        let index = self.stats.tokens;
        self.stats.tokens += 1;
        Some(Emitted { index, token, gpu_time: cost })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineKind, text::Sampling};

    const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0 };

    fn spec(mode: Mode, cpu_ms: u64, gpu_ms: u64) -> Spec {
        Spec {
            latency: LatencyProfile {
                prefill_per_token: Duration::from_millis(1),
                cpu_per_token: Duration::from_millis(cpu_ms),
                gpu_per_token: Duration::from_millis(gpu_ms),
                jitter: 0.0,
            },
            mode,
            depth: 2,
            prompt_tokens: 10,
            max_tokens: 50,
            jitter_seed: 1,
        }
    }

    async fn run(spec: Spec) -> (Duration, Vec<Emitted>, Stats) {
        let decoder = Decoder::new(EngineKind::Webllm.engine(), "a prompt", 1, GREEDY);
        let mut pipeline = Pipeline::new(spec, decoder);
        let started = Instant::now();
        let mut out = Vec::new();
        while let Some(emitted) = pipeline.next().await {
            out.push(emitted);
        }
        (Instant::now() - started, out, pipeline.stats())
    }

    #[tokio::test(start_paused = true)]
    async fn pipelined_takes_prefill_plus_n_max_plus_min() {
        let ms = Duration::from_millis;
        for (cpu, gpu) in [(3, 5), (5, 3), (4, 4)] {
            let (took, tokens, stats) = run(spec(Mode::Pipelined, cpu, gpu)).await;
            assert_eq!(tokens.len(), 50);
            assert_eq!(took, ms(10) + ms(cpu.max(gpu)) * 50 + ms(cpu.min(gpu)), "cpu {cpu} gpu {gpu}");
            assert_eq!(stats.cpu_busy, ms(cpu) * 50);
            assert_eq!(stats.gpu_busy, ms(10) + ms(gpu) * 50);
            // The GPU waits for the CPU only for the first token, or on every token if the CPU is slower.
            let expected_idle = if cpu > gpu { ms(cpu) + ms(cpu - gpu) * 49 } else { ms(cpu) };
            assert_eq!(stats.gpu_idle, expected_idle, "cpu {cpu} gpu {gpu}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sequential_takes_prefill_plus_n_times_the_sum() {
        let (took, tokens, stats) = run(spec(Mode::Sequential, 3, 5)).await;
        assert_eq!(tokens.len(), 50);
        assert_eq!(took, Duration::from_millis(10 + 50 * 8));
        assert_eq!(stats.gpu_idle, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn both_modes_emit_the_same_tokens() {
        let (_, pipelined, _) = run(spec(Mode::Pipelined, 3, 5)).await;
        let (_, sequential, _) = run(spec(Mode::Sequential, 3, 5)).await;
        let text = |v: &[Emitted]| v.iter().map(|e| e.token.text.clone()).collect::<String>();
        assert_eq!(text(&pipelined), text(&sequential));
        assert!(pipelined.iter().enumerate().all(|(i, e)| e.index as usize == i));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_holds_the_gpu_and_the_cpu_stays_within_depth() {
        let decoder = Decoder::new(EngineKind::Webllm.engine(), "a prompt", 1, GREEDY);
        let mut pipeline = Pipeline::new(spec(Mode::Pipelined, 1, 1), decoder);
        pipeline.next().await.expect("first token");
        tokio::time::sleep(Duration::from_secs(1)).await; // the client reads nothing for a second
        let before = Instant::now();
        pipeline.next().await.expect("second token");
        assert_eq!(Instant::now() - before, Duration::from_millis(1), "schedule restarts from now");
        // The CPU ran at most `depth` tokens ahead: the channel between the stages is that deep.
        let cpu = pipeline.cpu.as_ref().expect("cpu stage running");
        assert!(cpu.prepared.len() <= 2 && cpu.prepared.max_capacity() == 2);
        assert!(cpu.work.is_some(), "the CPU stage waits for room rather than finishing");
        let stats = pipeline.stats();
        assert_eq!(stats.tokens, 2);
    }
}
