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
