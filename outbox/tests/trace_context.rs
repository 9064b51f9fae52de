//! The W3C trace context of the enqueueing span travels in the headers.

mod common;

use common::{NewsletterSent, outbox_in_own_schema, rows};
use diesel::Connection;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn enqueue_inside_a_traced_span_carries_its_traceparent() {
    let (schema, outbox) = outbox_in_own_schema("trace");
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));

    let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("place_order");
        let _entered = span.enter();
        schema
            .connect()
            .transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 1 }))
            .unwrap();
        let context = span.context();
        let span_context = context.span().span_context().clone();
        (span_context.trace_id(), span_context.span_id())
    });

    let headers = &rows(&mut schema.connect())[0].headers;
    assert_eq!(
        headers["traceparent"],
        format!("00-{trace_id}-{span_id}-01"),
        "headers: {headers}"
    );
}

#[test]
fn enqueue_without_a_trace_adds_no_trace_headers() {
    let (schema, outbox) = outbox_in_own_schema("notrace");
    schema
        .connect()
        .transaction(|conn| outbox.enqueue(conn, &NewsletterSent { issue: 1 }))
        .unwrap();
    assert_eq!(
        rows(&mut schema.connect())[0].headers,
        serde_json::json!({})
    );
}
