//! W3C trace context of the current `tracing` span, for the message headers.
//!
//! A trace id only exists when the service runs `tracing-opentelemetry`'s
//! layer; without it (or without the `trace-context` feature) no header is
//! added and enqueue works the same.

/// `traceparent` and, when not empty, `tracestate` of the current span.
#[cfg(feature = "trace-context")]
pub(crate) fn current() -> Option<(String, Option<String>)> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let tracestate = span_context.trace_state().header();
    Some((traceparent, (!tracestate.is_empty()).then_some(tracestate)))
}

/// Without the `trace-context` feature there is never a trace context.
#[cfg(not(feature = "trace-context"))]
pub(crate) fn current() -> Option<(String, Option<String>)> {
    None
}
