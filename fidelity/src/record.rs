//! What a replay measured for each request, in simulated time from the start of the run.

use std::{fmt, time::Duration};

/// One request's measurements. Times count from the start of the replay and are already
/// multiplied by the time scale, so they read as the simulated device's time.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// The planned request's index (its id is the replay's prefix + this).
    pub index: usize,
    /// Its `[[requests]]` class.
    pub class: usize,
    /// When the plan wanted it sent (zero in a closed loop).
    pub scheduled: Duration,
    /// When Generate was called.
    pub sent: Duration,
    /// Each streamed chunk that carried tokens, in order of arrival.
    pub chunks: Vec<Chunk>,
    /// When GenerateComplete (or the error) arrived.
    pub ended: Duration,
    /// Prompt length sent.
    pub prompt_tokens: u32,
    /// `max_tokens` asked for.
    pub max_tokens: u32,
    /// Tokens streamed back (the sum over `chunks`).
    pub output_tokens: u32,
    /// GenerateComplete's `completion_tokens`, if it came.
    pub completion_tokens: Option<u32>,
    /// GenerateComplete's `cached_tokens` (prompt tokens served from the prefix cache).
    pub cached_tokens: u32,
    /// GenerateComplete's `finish_reason` ("length", "stop", "abort"), if it came.
    pub finish_reason: Option<String>,
    /// Why the request failed; `None` when it completed.
    pub failure: Option<Failure>,
}

/// A streamed chunk: when it arrived and how many tokens it carried (vLLM's multi-step
/// scheduling sends several at once; they count as arriving together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Arrival, from the start of the replay.
    pub at: Duration,
    /// Tokens in the chunk, ≥ 1.
    pub tokens: u32,
}

/// Why a request did not complete.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The server answered with an error status (the code is kept as received).
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// No GenerateComplete within the replay's request timeout; the stream was dropped.
    Timeout,
    /// The stream ended without a GenerateComplete.
    Incomplete,
    /// GenerateComplete said `finish_reason = "abort"`.
    Aborted,
    /// The task driving it ended abnormally (a bug in the replayer, reported rather than lost).
    Lost(String),
}

impl Failure {
    /// A short label to group failures by: the gRPC code's name, or the kind.
    pub fn reason(&self) -> String {
        match self {
            Failure::Status { code, .. } => format!("{code:?}"),
            Failure::Timeout => "timeout".into(),
            Failure::Incomplete => "incomplete".into(),
            Failure::Aborted => "aborted".into(),
            Failure::Lost(_) => "lost".into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { code, message } => write!(f, "{code:?}: {message}"),
            Failure::Timeout => write!(f, "no GenerateComplete within the request timeout"),
            Failure::Incomplete => write!(f, "the stream ended without GenerateComplete"),
            Failure::Aborted => write!(f, "the server aborted the request"),
            Failure::Lost(why) => write!(f, "replay task failed: {why}"),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Status { code: status.code(), message: status.message().to_owned() }
    }
}

impl RequestRecord {
    /// Whether the request completed (a GenerateComplete that was not an abort).
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// Time to first token: the first chunk's arrival − the send.
    pub fn ttft(&self) -> Option<Duration> {
        self.chunks.first().map(|c| c.at.saturating_sub(self.sent))
    }

    /// End-to-end latency: the end − the send.
    pub fn e2e(&self) -> Duration {
        self.ended.saturating_sub(self.sent)
    }

    /// Time per output token after the first, as vLLM's `benchmark_serving.py` defines it:
    /// (E2E − TTFT) / (output_tokens − 1); `None` with fewer than two tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft()?;
        (self.output_tokens > 1).then(|| self.e2e().saturating_sub(ttft) / (self.output_tokens - 1))
    }

    /// Inter-token latencies as vLLM's benchmark counts them: the gaps between successive
    /// chunks (one per chunk after the first, whatever each chunk carries).
    pub fn itls(&self) -> impl Iterator<Item = Duration> + '_ {
        self.chunks.windows(2).map(|w| w[1].at.saturating_sub(w[0].at))
    }
}

impl RequestRecord {
    /// One JSON object on one line: the request's index and lengths, its send time, TTFT, TPOT
    /// and E2E in milliseconds (`null` where undefined), and its failure if any.
    pub fn json_line(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        serde_json::json!({
            "index": self.index,
            "class": self.class,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "sent_ms": ms(self.sent),
            "ttft_ms": self.ttft().map(ms),
            "tpot_ms": self.tpot().map(ms),
            "e2e_ms": ms(self.e2e()),
            "failure": self.failure.as_ref().map(ToString::to_string),
        })
        .to_string()
    }
}
