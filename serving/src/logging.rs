//! Process-wide structured logging to stderr.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. The filter comes from `RUST_LOG`, else `default_filter`.
/// Calling it twice is harmless (the second call does nothing), so tests may call it freely.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                // Colour codes only for people: piped logs stay greppable.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init();
}
