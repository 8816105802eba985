//! Domain errors of the ledger, each naming the numbers a caller needs to fix the call.

use std::time::Duration;

/// Most violations one refusal lists. A status travels in HTTP/2 trailers, its message and its
/// BadRequest details both naming every violation: a KeepAlive of 200 malformed lease ids (about
/// 120 bytes each, twice) passed the client's 16 KiB header-list limit, and the caller saw its
/// own transport's error instead of INVALID_ARGUMENT. 16 keep a refusal under 8 KiB.
pub const MAX_LISTED: usize = 16;

/// Gathers the violations of a request, so one refusal lists them all (up to [`MAX_LISTED`],
/// then says how many more there are).
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    /// The value of `result`, or `None` after noting its violations.
    pub fn keep<T>(&mut self, result: Result<T, Error>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(Error::InvalidArgument { violations }) => {
                self.0.extend(violations);
                None
            }
            Err(other) => {
                self.0.push(("request".into(), other.to_string()));
                None
            }
        }
    }

    /// Notes one violation.
    pub fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push((field.into(), reason.into()));
    }

    /// `Ok(())` if nothing was noted, else the refusal listing everything, or the first
    /// [`MAX_LISTED`] and a count of the rest.
    pub fn check(mut self) -> Result<(), Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        if self.0.len() > MAX_LISTED {
            let more = self.0.len() - MAX_LISTED;
            self.0.truncate(MAX_LISTED);
            self.0.push(("request".into(), format!("has {more} more violation(s), not listed")));
        }
        Err(Error::InvalidArgument { violations: self.0 })
    }
}

/// Why a ledger operation was refused. `service::status::to_status` maps each variant to exactly
/// one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Request fields are malformed or out of range: every violation found, not the first.
    #[error("invalid request: {}", serving::details::violations_text(.violations))]
    InvalidArgument {
        /// Each field at fault, as named in the proto, and what is wrong and accepted.
        violations: Vec<(String, String)>,
    },
    /// No pool has this name.
    #[error("pool {0:?} not found")]
    PoolNotFound(String),
    /// A pool with this name already exists.
    #[error("pool {0:?} already exists")]
    PoolExists(String),
    /// No live lease has this id: never granted, freed, or reclaimed after expiry.
    #[error("lease {0} not found: it was never granted, or it was already freed or reclaimed")]
    LeaseNotFound(String),
    /// The lease reached its deadline: it is dead even if its reclamation had not run yet.
    #[error("lease {id} expired {ago:?} ago; allocate a new lease")]
    LeaseExpired {
        /// The lease id.
        id: String,
        /// How long ago the deadline passed.
        ago: Duration,
    },
    /// The request can never fit: it asks more of a pool than its whole capacity.
    #[error("pool {pool:?} cannot ever hold {requested} bytes: its capacity is {capacity} bytes")]
    ExceedsCapacity {
        /// The pool.
        pool: String,
        /// Bytes asked from it by the request (summed over its items).
        requested: u64,
        /// Capacity of the pool.
        capacity: u64,
    },
    /// No room now, and the caller's wait (if any) ran out.
    #[error(
        "pool {pool:?} has {available} of {capacity} bytes available, {requested} requested, \
         {waiters} earlier waiter(s); waited {waited:?}"
    )]
    NoRoom {
        /// The first pool that could not serve the request.
        pool: String,
        /// Bytes asked from it.
        requested: u64,
        /// Bytes available in it.
        available: u64,
        /// Its capacity.
        capacity: u64,
        /// Allocate calls queued for it ahead of this one.
        waiters: u64,
        /// How long this call waited before giving up.
        waited: Duration,
        /// Whether the call waited at all (a timeout) or was refused at once.
        timed_out: bool,
    },
    /// An Allocate with the same request id is still waiting.
    #[error("an Allocate with request_id {0:?} is still waiting; retry after it completes")]
    RequestInProgress(String),
    /// The server is shutting down and takes no new work.
    #[error("memory-service is shutting down")]
    ShuttingDown,
    /// A configured bound on a resource a caller can create was reached.
    #[error("{what} limit reached: {limit} allowed ({hint})")]
    LimitReached {
        /// What is counted, e.g. "leases per holder".
        what: &'static str,
        /// Its configured bound.
        limit: u64,
        /// What the caller can do about it.
        hint: &'static str,
    },
    /// The state store cannot be written: the change is refused (or, for a change already made,
    /// was not acknowledged as durable).
    #[error("the state store cannot be written, so the change was not kept ({0}); retry when it is fixed")]
    NotDurable(String),
    /// The caller is authenticated but may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A watcher cannot resume in this epoch: the state it watched is gone.
    #[error("cannot resume the watch: {0}")]
    CannotResume(String),
    /// A watcher cannot resume after that event: it is not retained, or was never reached.
    #[error("cannot resume the watch: {0}")]
    ResumeOutOfRange(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`] with one violation.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { violations: vec![(field.into(), reason.into())] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_lists_a_bounded_number_of_violations_and_counts_the_rest() {
        let mut bad = Violations::default();
        for i in 0..1000 {
            bad.add(format!("lease_ids[{i}]"), "is not a lease id");
        }
        let Err(Error::InvalidArgument { violations }) = bad.check() else { panic!("a refusal") };
        assert_eq!(violations.len(), MAX_LISTED + 1);
        assert_eq!(
            violations[MAX_LISTED],
            ("request".into(), "has 984 more violation(s), not listed".into())
        );
    }
}
