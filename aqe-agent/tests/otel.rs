//! The `otel` feature: a traced request's handling exported over OTLP/HTTP as a span of the
//! requester's trace, to a collector listening on loopback (which decodes the protobuf the
//! exporter sends).
#![cfg(feature = "otel")]

use std::sync::Arc;
use std::time::Duration;

use aqe_agent::{Agent, HandlerError, OtelExporter, current_trace, traced};
use aqe_core::{RequestOptions, TraceParent};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing_subscriber::layer::SubscriberExt;

/// A collector: answers every POST with 200 and hands its body on.
async fn collector() -> (String, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/traces",
        listener.local_addr().expect("local addr")
    );
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                loop {
                    let mut request = String::new();
                    if conn.read_line(&mut request).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if conn.read_line(&mut header).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length.min(16 << 20)];
                    if conn.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send((request.trim_end().to_owned(), body)).await;
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_requests_handling_is_exported_as_a_span_of_the_requesters_trace() {
    let (url, mut bodies) = collector().await;
    let exporter = Arc::new(OtelExporter::otlp_http(&url, "aqe-otel-test").expect("exporter"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(exporter.layer()))
        .expect("the test's subscriber");

    let bus = Arc::new(aqe_agent::EventBus::new());
    let server = Agent::builder()
        .id("server")
        .agent_type("t")
        .transport(bus.clone())
        .on_request(|_, _| async move {
            // What the handler would send on names its own span.
            current_trace()
                .map(|t| t.to_string())
                .ok_or_else(|| HandlerError::new("untraced"))
        })
        .start()
        .await
        .expect("server");
    let client = Agent::builder()
        .id("client")
        .agent_type("t")
        .transport(bus)
        .start()
        .await
        .expect("client");
    let root = TraceParent::root();
    let inside: String = traced(
        root,
        client.request_from_agent(server.id(), &"hi", RequestOptions::default()),
    )
    .await
    .expect("answered");
    let inside: TraceParent = inside.parse().expect("a traceparent");
    assert_eq!(
        inside.trace_id, root.trace_id,
        "the handler works in the trace"
    );

    let flusher = exporter.clone();
    tokio::task::spawn_blocking(move || flusher.flush())
        .await
        .expect("flush task")
        .expect("exported");
    let (request, body) = tokio::time::timeout(Duration::from_secs(10), bodies.recv())
        .await
        .expect("the collector heard")
        .expect("a body");
    assert_eq!(request, "POST /v1/traces HTTP/1.1");
    let export = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
    let service = export.resource_spans[0]
        .resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{:?}", v.value));
    assert!(service.is_some_and(|s| s.contains("aqe-otel-test")));
    let spans: Vec<_> = export
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    let handle = spans
        .iter()
        .find(|s| s.name == "handle")
        .unwrap_or_else(|| {
            panic!(
                "a handle span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(handle.trace_id, root.trace_id, "the requester's trace");
    assert_eq!(
        handle.parent_span_id, root.parent_id,
        "the requester's span is its parent"
    );
    assert_eq!(
        handle.span_id, inside.parent_id,
        "onward messages name this span"
    );

    server.shutdown().await;
    client.shutdown().await;
    if let Ok(exporter) = Arc::try_unwrap(exporter) {
        tokio::task::spawn_blocking(move || exporter.shutdown())
            .await
            .expect("shutdown");
    }
}
