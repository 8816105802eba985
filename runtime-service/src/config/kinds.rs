//! Plain choices the configuration names: how the device schedules its stages and how KV memory
//! is taken. Defined here, with the rest of the configuration, so that the configuration depends
//! on nothing of the engine that reads it.

/// How the CPU and GPU stages of the device are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerMode {
    /// CPU work of step N+1 overlaps GPU work of step N.
    Overlapped,
    /// CPU then GPU, step after step.
    Sequential,
}

impl SchedulerMode {
    /// Name in flags and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerMode::Overlapped => "overlapped",
            SchedulerMode::Sequential => "sequential",
        }
    }
}

impl std::str::FromStr for SchedulerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "overlapped" => Ok(SchedulerMode::Overlapped),
            "sequential" => Ok(SchedulerMode::Sequential),
            _ => Err(format!("scheduler {s:?} must be \"overlapped\" or \"sequential\"")),
        }
    }
}

/// How KV memory is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvReserve {
    /// Blocks as the sequence grows (paged attention).
    Paged,
    /// Blocks for prompt + max_tokens at admission (the scheme paged attention replaced); kept
    /// for the comparison benchmark.
    Upfront,
}

impl std::str::FromStr for KvReserve {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paged" => Ok(KvReserve::Paged),
            "upfront" => Ok(KvReserve::Upfront),
            _ => Err(format!("KV reserve {s:?} must be \"paged\" or \"upfront\"")),
        }
    }
}

/// How much faster than real time the simulated device runs: N simulated seconds per wall
/// second. Step times and the front end's cost are divided by it before they are slept, and
/// every duration the runtime reports (summaries, `vllm:*` and `runtime_*` histograms, device
/// seconds) is multiplied back, so reports read in simulated time at any scale. Protocol timers
/// (lease TTLs, memory waits, stream timeouts) stay wall-clock: they are promises to peers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeScale(f64);

impl TimeScale {
    /// Real time.
    pub const REAL: TimeScale = TimeScale(1.0);
    /// The largest scale accepted: past it a step of a small model is shorter than the
    /// host's timer granularity and the host, not the simulation, sets the pace.
    pub const MAX: f64 = 1000.0;

    /// `factor` simulated seconds per wall second, 1 to [`TimeScale::MAX`].
    pub fn new(factor: f64) -> Result<Self, String> {
        if factor.is_finite() && (1.0..=Self::MAX).contains(&factor) {
            Ok(TimeScale(factor))
        } else {
            Err(format!("time scale {factor} must be between 1 and {}", Self::MAX))
        }
    }

    /// Simulated seconds per wall second.
    pub fn factor(self) -> f64 {
        self.0
    }

    /// The wall time a simulated duration takes.
    pub fn to_wall(self, simulated: std::time::Duration) -> std::time::Duration {
        simulated.div_f64(self.0)
    }

    /// The simulated duration a wall duration stands for.
    pub fn to_simulated(self, wall: std::time::Duration) -> std::time::Duration {
        wall.mul_f64(self.0)
    }

    /// [`TimeScale::to_simulated`], in seconds.
    pub fn simulated_secs(self, wall: std::time::Duration) -> f64 {
        wall.as_secs_f64() * self.0
    }
}

impl Default for TimeScale {
    fn default() -> Self {
        TimeScale::REAL
    }
}

impl std::str::FromStr for TimeScale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let factor: f64 = s.trim().parse().map_err(|_| format!("time scale {s:?} is not a number"))?;
        TimeScale::new(factor)
    }
}

impl<'de> serde::Deserialize<'de> for TimeScale {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        TimeScale::new(f64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}
