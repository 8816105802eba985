//! Domain errors of runtime-service and their one mapping to gRPC statuses.

use std::time::Duration;

use serving::details;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a call failed. Every variant maps to exactly one gRPC code in [`Error::to_status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Request fields are malformed or out of range.
    #[error("invalid request: {}", serving::details::violations_text(.0))]
    InvalidArgument(
        /// Every violation: the field, as named in the proto, and what is wrong and accepted.
        Vec<(&'static str, String)>,
    ),
    /// No model has this key.
    #[error("model {0:?} not found; ListModels shows the configured models")]
    ModelNotFound(String),
    /// A generation with this request id is already in flight.
    #[error("a generation with request_id {0:?} is already in flight; use a new request_id")]
    DuplicateRequest(String),
    /// Cancel named no generation of the caller's in flight (another identity's is not named:
    /// request ids are per identity).
    #[error("no generation with request_id {0:?} is in flight")]
    RequestNotFound(String),
    /// The admission queue is full: load is shed.
    #[error(
        "runtime-service is overloaded: {queued} generations already queued (limit {limit}); retry later"
    )]
    Overloaded {
        /// Generations waiting.
        queued: usize,
        /// The queue's capacity.
        limit: usize,
    },
    /// The generation can never be served by memory-service as configured: it needs more than a
    /// pool's whole capacity, or a pool it needs does not exist.
    #[error("the generation cannot be served: {0}")]
    Unservable(String),
    /// Memory stayed short through every retry.
    #[error("memory is exhausted after {attempts} attempt(s) over {waited:?}: {detail}")]
    MemoryExhausted {
        /// What memory-service said last.
        detail: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent waiting and retrying.
        waited: Duration,
    },
    /// memory-service could not be reached.
    #[error("memory-service is unavailable: {0}")]
    MemoryUnavailable(String),
    /// memory-service lost this generation's leases (it restarted, or they expired).
    #[error("the generation's memory leases were lost (memory-service restarted?); retry the request")]
    MemoryLost,
    /// memory-service answered in a way this version does not expect.
    #[error("unexpected answer from memory-service: {0}")]
    MemoryProtocol(String),
    /// memory-service refused this runtime's own settings (a TTL or wait above what it accepts):
    /// the pair is misconfigured, not the caller's request.
    #[error("memory-service refused this runtime's settings: {0}")]
    MemoryRefused(String),
    /// Cancelled by a Cancel call.
    #[error("generation cancelled by request")]
    Cancelled,
    /// A time limit ran out.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The server is shutting down.
    #[error("runtime-service is shutting down; retry on another instance")]
    ShuttingDown,
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![(field, reason.into())])
    }

    /// The status to answer, with google.rpc details. `retry_hint` goes into RetryInfo.
    pub fn to_status(&self, retry_hint: Duration) -> Status {
        let retry = || details::retry_after(retry_hint);
        let (code, details) = match self {
            Error::InvalidArgument(list) => {
                (Code::InvalidArgument, details::bad_request(list.iter().map(|(f, r)| (*f, r.clone()))))
            }
            Error::ModelNotFound(key) => {
                (Code::NotFound, details::resource("runtime.v1.Model", key, "no such model"))
            }
            Error::DuplicateRequest(id) => {
                (Code::AlreadyExists, details::resource("runtime.v1.Generation", id, "request id in use"))
            }
            Error::RequestNotFound(id) => {
                (Code::NotFound, details::resource("runtime.v1.Generation", id, "no such generation"))
            }
            Error::Overloaded { .. } | Error::MemoryExhausted { .. } => (Code::ResourceExhausted, retry()),
            Error::Unservable(detail) => {
                (Code::FailedPrecondition, details::precondition("MEMORY", "memory-service", detail.clone()))
            }
            Error::MemoryUnavailable(_) | Error::MemoryLost | Error::ShuttingDown => {
                (Code::Unavailable, retry())
            }
            Error::MemoryProtocol(_) => (Code::Internal, ErrorDetails::new()),
            Error::MemoryRefused(detail) => {
                (Code::FailedPrecondition, details::precondition("CONFIG", "runtime-service", detail.clone()))
            }
            Error::Cancelled => (Code::Cancelled, ErrorDetails::new()),
            Error::DeadlineExceeded(_) => (Code::DeadlineExceeded, ErrorDetails::new()),
        };
        Status::with_error_details(code, self.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let hint = Duration::from_millis(100);
        let cases = [
            (Error::invalid("prompt", "is empty"), Code::InvalidArgument),
            (Error::ModelNotFound("x".into()), Code::NotFound),
            (Error::DuplicateRequest("r".into()), Code::AlreadyExists),
            (Error::RequestNotFound("r".into()), Code::NotFound),
            (Error::Overloaded { queued: 1, limit: 1 }, Code::ResourceExhausted),
            (Error::Unservable("too large".into()), Code::FailedPrecondition),
            (Error::MemoryUnavailable("down".into()), Code::Unavailable),
            (Error::MemoryLost, Code::Unavailable),
            (Error::Cancelled, Code::Cancelled),
            (Error::MemoryRefused("ttl".into()), Code::FailedPrecondition),
            (Error::DeadlineExceeded("ttft".into()), Code::DeadlineExceeded),
            (Error::ShuttingDown, Code::Unavailable),
        ];
        for (err, code) in cases {
            assert_eq!(err.to_status(hint).code(), code, "{err:?}");
        }
        let shed = Error::Overloaded { queued: 3, limit: 3 }.to_status(hint);
        assert_eq!(shed.get_error_details().retry_info().and_then(|r| r.retry_delay), Some(hint));
    }
}
