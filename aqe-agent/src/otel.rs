//! OpenTelemetry export of the spans agents work in (feature `otel`).
//!
//! With an [`OtelExporter`]'s layer in the process's `tracing` subscriber, the `handle` span
//! a traced message's handler runs in is an OpenTelemetry span: its parent is the sender's
//! span named by the envelope's `traceparent`, so both processes' spans are one trace in
//! the collector, and what the handler sends on names this span as its parent.

use aqe_core::{Error, Result, TraceParent};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Spans exported over OTLP/HTTP (binary protobuf) to a collector, in batches, from a thread
/// of their own (never from a runtime thread).
#[derive(Debug)]
pub struct OtelExporter {
    provider: SdkTracerProvider,
}

impl OtelExporter {
    /// Exports to `endpoint`, a collector's traces URL (`http://collector:4318/v1/traces`),
    /// as the service `service`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when the exporter cannot be built (a bad URL).
    pub fn otlp_http(endpoint: &str, service: &str) -> Result<Self> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Error::config("otel.endpoint", e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that makes spans OpenTelemetry spans exported here: add it to the
    /// process's subscriber.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("aqe"))
    }

    /// Sends what ended and waits for the collector's answer.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming why the export failed (the collector unreachable, or
    /// refusing).
    pub fn flush(&self) -> Result<()> {
        self.provider
            .force_flush()
            .map_err(|e| Error::config("otel.endpoint", e.to_string()))
    }

    /// Flushes and stops the exporter's thread.
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// Makes `span` a child of the sender's span `parent`, when an OpenTelemetry layer is
/// installed: the span's own context then, to be carried by what the handler sends.
pub(crate) fn adopt(span: &tracing::Span, parent: &TraceParent) -> Option<TraceParent> {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(remote);
    span.set_parent(cx).ok()?;
    let own = span.context().span().span_context().clone();
    own.is_valid().then(|| TraceParent {
        version: 0,
        trace_id: own.trace_id().to_bytes(),
        parent_id: own.span_id().to_bytes(),
        flags: parent.flags,
    })
}
