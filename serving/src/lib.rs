//! Serving glue.
