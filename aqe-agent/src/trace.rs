//! Trace context across processes: the W3C `traceparent` of the work a task does now, carried
//! by every envelope an agent sends from it, and taken up by the receiving side's handler.
//!
//! Work starts a trace with [`traced`] (or inherits one: a handler of a traced message runs
//! in a new span of its trace). Spans of the `tracing` crate for the handling and for the
//! requester's side carry `trace_id` and `span_id`, so logs of both processes can be joined
//! by the trace id.

use std::future::Future;

use aqe_core::{AgentId, Envelope, MessageId, TraceParent};

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// The trace context of the work this task does now, if it is traced.
pub fn current_trace() -> Option<TraceParent> {
    CURRENT.try_with(|t| *t).ok()
}

/// Runs `work` as the span `trace`: what agents send meanwhile carries it (the receivers'
/// handlers become its children).
pub async fn traced<F: Future>(trace: TraceParent, work: F) -> F::Output {
    CURRENT.scope(trace, work).await
}

/// What the handling of a traced envelope needs to know of it (nothing when untraced: the
/// common case costs no clone).
pub(crate) fn of(envelope: &Envelope) -> Option<(TraceParent, AgentId, MessageId)> {
    envelope
        .trace
        .as_deref()
        .map(|t| (*t, envelope.from.clone(), envelope.id))
}

/// Runs `work`, the handling of a message, in a new span of its trace (when it has one).
pub(crate) async fn handling<F: Future>(
    traced_by: Option<(TraceParent, AgentId, MessageId)>,
    work: F,
) -> F::Output {
    match traced_by {
        Some((parent, from, id)) => {
            let span = tracing::info_span!(
                "handle",
                trace_id = %parent.trace_id_hex(),
                span_id = tracing::field::Empty,
                parent_id = %parent.parent_id_hex(),
                %from,
                %id
            );
            // With an OpenTelemetry layer, the span is the sender's span's child there, and
            // its id is the one onward messages name.
            #[cfg(feature = "otel")]
            let me = crate::otel::adopt(&span, &parent).unwrap_or_else(|| parent.child());
            #[cfg(not(feature = "otel"))]
            let me = parent.child();
            span.record("span_id", tracing::field::display(me.parent_id_hex()));
            tracing::Instrument::instrument(traced(me, work), span).await
        }
        None => work.await,
    }
}
