//! The one mapping from ledger errors to gRPC statuses, with machine-readable details
//! (google.rpc BadRequest, ResourceInfo, PreconditionFailure, QuotaFailure, RetryInfo).

use std::{collections::HashMap, time::Duration};

use serving::details;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ledger::Error;

/// Domain of ErrorInfo details: per AIP-193, the service's name in DNS form (like
/// `pubsub.googleapis.com`), not a proto package; `reason` values are unique within it.
pub const DOMAIN: &str = "memory-service.inference-sim.dev";

/// Maps `err` to its status. `retry_hint` goes into RetryInfo for RESOURCE_EXHAUSTED.
pub fn to_status(err: Error, retry_hint: Duration) -> Status {
    let message = err.to_string();
    let (code, details) = match err {
        Error::InvalidArgument { violations } => (Code::InvalidArgument, details::bad_request(violations)),
        Error::PoolNotFound(pool) => {
            (Code::NotFound, details::resource("memory.v1.Pool", pool, "no such pool"))
        }
        Error::PoolExists(pool) => {
            (Code::AlreadyExists, details::resource("memory.v1.Pool", pool, "pool exists"))
        }
        Error::LeaseNotFound(id) => {
            (Code::NotFound, details::resource("memory.v1.Lease", id, "no such live lease"))
        }
        Error::LeaseExpired { id, .. } => {
            (Code::NotFound, details::resource("memory.v1.Lease", id, "lease expired"))
        }
        Error::ExceedsCapacity { pool, requested, capacity } => (
            Code::FailedPrecondition,
            details::precondition(
                "CAPACITY",
                pool,
                format!("requested {requested} bytes, capacity {capacity} bytes"),
            ),
        ),
        Error::NoRoom { pool, requested, available, capacity, waiters, timed_out, .. } => {
            let mut details = ErrorDetails::with_quota_failure_violation(
                pool.clone(),
                format!("requested {requested} bytes, {available} of {capacity} available"),
            );
            details.set_retry_info(Some(retry_hint));
            let metadata: HashMap<String, String> = [
                ("pool", pool),
                ("requested_bytes", requested.to_string()),
                ("available_bytes", available.to_string()),
                ("capacity_bytes", capacity.to_string()),
                ("waiters", waiters.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let reason = if timed_out { "WAIT_TIMED_OUT" } else { "NO_ROOM" };
            details.set_error_info(reason, DOMAIN, metadata);
            (Code::ResourceExhausted, details)
        }
        Error::RequestInProgress(_) => (Code::Aborted, details::retry_after(retry_hint)),
        Error::ShuttingDown => (Code::Unavailable, ErrorDetails::new()),
        Error::NotDurable(_) => (Code::Unavailable, details::retry_after(retry_hint)),
        Error::LimitReached { what, limit, .. } => {
            let mut details =
                ErrorDetails::with_quota_failure_violation(what, format!("at most {limit} allowed"));
            let metadata = [("limit".to_owned(), what.to_owned()), ("max".to_owned(), limit.to_string())];
            details.set_error_info("LIMIT_REACHED", DOMAIN, metadata.into_iter().collect::<HashMap<_, _>>());
            (Code::ResourceExhausted, details)
        }
        Error::PermissionDenied(_) => (Code::PermissionDenied, ErrorDetails::new()),
        Error::CannotResume(_) => (
            Code::FailedPrecondition,
            details::precondition("EPOCH", "resume_epoch", "not the server's epoch"),
        ),
        Error::ResumeOutOfRange(_) => {
            (Code::OutOfRange, details::bad_request([("resume_after_sequence", "not a retained event")]))
        }
    };
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_gets_its_code_and_details() {
        let hint = Duration::from_millis(200);
        let cases = [
            (Error::invalid("holder", "is required"), Code::InvalidArgument),
            (Error::PoolNotFound("x".into()), Code::NotFound),
            (Error::PoolExists("x".into()), Code::AlreadyExists),
            (Error::LeaseNotFound("ab".into()), Code::NotFound),
            (Error::LeaseExpired { id: "ab".into(), ago: Duration::ZERO }, Code::NotFound),
            (
                Error::ExceedsCapacity { pool: "x".into(), requested: 2, capacity: 1 },
                Code::FailedPrecondition,
            ),
            (Error::RequestInProgress("r".into()), Code::Aborted),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::NotDurable("disk full".into()), Code::Unavailable),
            (Error::LimitReached { what: "pools", limit: 1, hint: "h" }, Code::ResourceExhausted),
            (Error::PermissionDenied("not yours".into()), Code::PermissionDenied),
            (Error::CannotResume("lost".into()), Code::FailedPrecondition),
            (Error::ResumeOutOfRange("gone".into()), Code::OutOfRange),
        ];
        for (err, code) in cases {
            assert_eq!(to_status(err, hint).code(), code);
        }
        let no_room = Error::NoRoom {
            pool: "kv-cache".into(),
            requested: 10,
            available: 3,
            capacity: 8,
            waiters: 1,
            waited: Duration::from_millis(500),
            timed_out: true,
        };
        let status = to_status(no_room, hint);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("3 of 8"), "{}", status.message());
        let details = status.get_error_details();
        assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(hint));
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("WAIT_TIMED_OUT"));
        assert_eq!(details.error_info().map(|i| i.domain.as_str()), Some(DOMAIN));
    }
}
