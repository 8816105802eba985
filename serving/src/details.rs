//! The google.rpc error details both services attach to a failed call (BadRequest, ResourceInfo,
//! PreconditionFailure, RetryInfo), built one way, and the one-line text of a list of violations,
//! so that a client reads the same shapes from either service.

use std::time::Duration;

use tonic_types::{ErrorDetails, FieldViolation};

/// `field reason; field reason`: the status message of an invalid request, every violation listed.
pub fn violations_text<F: AsRef<str>, R: AsRef<str>>(violations: &[(F, R)]) -> String {
    violations
        .iter()
        .map(|(field, reason)| format!("{} {}", field.as_ref(), reason.as_ref()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// BadRequest with one field violation per `(field, reason)`.
pub fn bad_request<F: Into<String>, R: Into<String>>(
    violations: impl IntoIterator<Item = (F, R)>,
) -> ErrorDetails {
    let violations: Vec<FieldViolation> =
        violations.into_iter().map(|(field, reason)| FieldViolation::new(field, reason)).collect();
    ErrorDetails::with_bad_request(violations)
}

/// ResourceInfo naming the resource (`memory.v1.Lease`, its id) and what is wrong with it.
pub fn resource(kind: &str, name: impl Into<String>, description: impl Into<String>) -> ErrorDetails {
    ErrorDetails::with_resource_info(kind, name, "", description)
}

/// PreconditionFailure with one violation: its type (`CAPACITY`), subject and description.
pub fn precondition(kind: &str, subject: impl Into<String>, description: impl Into<String>) -> ErrorDetails {
    ErrorDetails::with_precondition_failure_violation(kind, subject, description)
}

/// RetryInfo: when trying again may succeed.
pub fn retry_after(delay: Duration) -> ErrorDetails {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(delay));
    details
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_builder_fills_its_detail() {
        assert_eq!(
            violations_text(&[("holder", "is required"), ("bytes", "must be > 0")]),
            "holder is required; bytes must be > 0"
        );
        let bad = bad_request([("holder", "is required")]);
        assert_eq!(bad.bad_request().map(|b| b.field_violations.len()), Some(1));
        assert_eq!(
            resource("memory.v1.Pool", "kv", "no such pool")
                .resource_info()
                .map(|r| r.resource_name.as_str()),
            Some("kv")
        );
        assert!(precondition("EPOCH", "resume_epoch", "old").precondition_failure().is_some());
        assert_eq!(
            retry_after(Duration::from_millis(5)).retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(5))
        );
    }
}
