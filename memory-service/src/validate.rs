//! Input rules shared by the gRPC layer and the config: names, free-text fields, durations.

use std::time::Duration;

use crate::ledger::Error;

/// Shortest TTL accepted: TTLs are whole milliseconds.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// Longest holder, scope id or request id.
pub const MAX_TEXT: usize = 128;

/// A pool name is a DNS label: 1–63 of `a-z`, `0-9`, `-`, not starting or ending with `-`. It
/// travels in URLs, metric labels and Kubernetes config, where anything looser breaks.
pub fn pool_name(name: &str) -> Result<(), String> {
    let label = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if name.is_empty() || name.len() > 63 {
        return Err(format!("must be 1 to 63 characters, got {}", name.len()));
    }
    let bytes = name.as_bytes();
    if !bytes.iter().all(|&b| label(b) || b == b'-') {
        return Err("may contain only lowercase letters, digits and '-'".into());
    }
    if !label(bytes[0]) || !label(bytes[bytes.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit".into());
    }
    Ok(())
}

/// A free-text identifier (holder, scope id, request id): at most 128 characters, none of them
/// control characters. `required` refuses the empty string.
pub fn text(field: &str, value: &str, required: bool) -> Result<(), Error> {
    if required && value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.chars().count() > MAX_TEXT {
        return Err(Error::invalid(field, format!("must be at most {MAX_TEXT} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Converts a protobuf Duration, refusing negative and malformed values.
pub fn duration(field: &str, d: &prost_types::Duration) -> Result<Duration, Error> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(
            field,
            format!("{}s {}ns is not a valid non-negative duration", d.seconds, d.nanos),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A lease TTL: whole milliseconds from 1 ms to `max`. Out of range is refused, not clamped, so a
/// caller never holds a lease shorter or longer than it believes.
pub fn ttl(d: &prost_types::Duration, max: Duration) -> Result<Duration, Error> {
    let ttl = duration("ttl", d)?;
    if ttl.subsec_nanos() % 1_000_000 != 0 {
        return Err(Error::invalid("ttl", format!("{ttl:?} is not a whole number of milliseconds")));
    }
    if ttl < MIN_TTL || ttl > max {
        return Err(Error::invalid("ttl", format!("{ttl:?} is outside 1ms..={max:?}")));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_dns_labels() {
        for good in ["kv-cache", "a", "pool-2", &"x".repeat(63)] {
            assert_eq!(pool_name(good), Ok(()), "{good:?}");
        }
        for bad in ["", "-a", "a-", "KV", "a_b", "a.b", "ü", &"x".repeat(64)] {
            assert!(pool_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ttls_are_whole_milliseconds_within_bounds() {
        let max = Duration::from_secs(60);
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(ttl(&d(1, 500_000_000), max), Ok(Duration::from_millis(1500)));
        assert_eq!(ttl(&d(0, 1_000_000), max), Ok(MIN_TTL));
        for bad in [d(0, 0), d(0, 1), d(-1, 0), d(0, -5), d(61, 0), d(0, 1_000_000_000)] {
            assert!(ttl(&bad, max).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_fields_refuse_control_characters_and_length() {
        assert!(text("holder", "worker-1", true).is_ok());
        assert!(text("scope_id", "", false).is_ok());
        assert!(text("holder", "", true).is_err());
        assert!(text("holder", "a\nb", true).is_err());
        assert!(text("holder", &"x".repeat(129), true).is_err());
    }
}
