//! Continuing the producer's trace: the handler's span becomes a child of
//! the message's W3C `traceparent` (and `tracestate`), when the service
//! runs `tracing-opentelemetry`. Without the `trace-context` feature, or a
//! valid header, the span starts a trace of its own.

use crate::envelope::Meta;

/// Makes `span` a child of the remote span in `meta`'s `traceparent`.
#[cfg(feature = "trace-context")]
pub(crate) fn set_parent(span: &tracing::Span, meta: &Meta) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let Some(remote) = meta
        .header_str("traceparent")
        .and_then(|tp| parse_traceparent(tp, meta.header_str("tracestate").unwrap_or("")))
    else {
        return;
    };
    let context = opentelemetry::Context::new().with_remote_span_context(remote);
    let _ = span.set_parent(context);
}

/// Without the `trace-context` feature nothing is linked.
#[cfg(not(feature = "trace-context"))]
pub(crate) fn set_parent(_span: &tracing::Span, _meta: &Meta) {}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, as W3C defines it.
#[cfg(feature = "trace-context")]
fn parse_traceparent(header: &str, tracestate: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    let mut parts = header.trim().split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate.parse::<TraceState>().unwrap_or_default();
    let context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    context.is_valid().then_some(context)
}

#[cfg(all(test, feature = "trace-context"))]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_read_and_a_bad_one_is_not() {
        let c = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        )
        .unwrap();
        assert_eq!(c.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id().to_string(), "00f067aa0ba902b7");
        assert!(c.is_sampled() && c.is_remote());
        assert!(
            parse_traceparent("00-0000000000000000000000000000000-00f067aa0ba902b7-01", "")
                .is_none()
        );
        assert!(
            parse_traceparent(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ""
            )
            .is_none(),
            "all-zero id"
        );
        assert!(parse_traceparent("garbage", "").is_none());
    }
}
