//! JSON log lines with the request's trace id at the top level, where log collectors and
//! `jq '.trace_id'` look for it, rather than nested in the span list.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{Format, Json, Writer},
    },
    registry::LookupSpan,
};

/// tracing-subscriber's JSON format, plus a top-level `trace_id` when the event happens inside a
/// span that recorded one (every request's server span does).
#[derive(Debug)]
pub struct TraceJson(pub Format<Json>);

impl<S, N> FormatEvent<S, N> for TraceJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let trace_id = ctx.event_scope().and_then(|scope| {
            scope.from_root().find_map(|span| {
                let extensions = span.extensions();
                let fields = extensions.get::<FormattedFields<N>>()?;
                trace_id_in(fields.fields.as_str()).map(str::to_owned)
            })
        });
        match (trace_id, line.strip_prefix('{')) {
            (Some(id), Some(rest)) => write!(writer, "{{\"trace_id\":\"{id}\",{rest}"),
            _ => writer.write_str(&line),
        }
    }
}

/// The `trace_id` value in a span's JSON-formatted fields (32 hex digits).
fn trace_id_in(fields: &str) -> Option<&str> {
    let start = fields.find("\"trace_id\":\"")? + "\"trace_id\":\"".len();
    let id = fields.get(start..start + 32)?;
    id.bytes().all(|b| b.is_ascii_hexdigit()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::trace_id_in;

    #[test]
    fn finds_the_trace_id_among_span_fields() {
        let fields =
            r#"{"otel.name":"x","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","rpc.method":"Allocate"}"#;
        assert_eq!(trace_id_in(fields), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_in(r#"{"trace_id":"not-hex"}"#), None);
        assert_eq!(trace_id_in("{}"), None);
    }
}
