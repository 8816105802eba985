//! Caller input as error messages quote it.

/// Most characters of caller input an error message repeats.
pub const MAX_ECHO: usize = 64;

/// `value` cut to its first [`MAX_ECHO`] characters, with `…` where it was cut. A status message
/// (and its details) travels in HTTP/2 trailers: echoing a megabyte-long name in full would push
/// them past the client's header-list limit, and the caller would see RESOURCE_EXHAUSTED from
/// its own transport instead of the real code.
pub fn echo(value: &str) -> String {
    match value.char_indices().nth(MAX_ECHO) {
        None => value.to_owned(),
        Some((end, _)) => format!("{}…", &value[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_kept_and_long_input_is_cut_on_a_character_boundary() {
        assert_eq!(echo("llama"), "llama");
        let long = "é".repeat(1000);
        let cut = echo(&long);
        assert_eq!(cut.chars().count(), MAX_ECHO + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(echo(&"x".repeat(MAX_ECHO)), "x".repeat(MAX_ECHO));
    }
}
