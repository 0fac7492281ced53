//! Trace context across processes' worth of endpoints: a traced request over QUIC reaches its
//! handler as a span of the requester's trace, and what the handler sends on stays in it.
#![cfg(feature = "quic")]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use aqe_agent::{Agent, HandlerError, current_trace, traced};
use aqe_core::{RequestOptions, TraceParent};
use support::{WAIT, quic, until_peers};
use tokio::sync::mpsc;

/// Everything logged in this test process, for the span check.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_is_handled_in_a_span_of_the_requesters_trace() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .init();
    let (qa, qb) = (quic().await, quic().await);
    qa.connect(qb.local_addr()).await.expect("connect");
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (audit_tx, mut audited) = mpsc::unbounded_channel();
    let _audit = Agent::builder()
        .id("audit")
        .agent_type("auditor")
        .transport(Arc::new(qa.clone()))
        .on_message(move |_a, env| {
            let tx = audit_tx.clone();
            async move {
                let _ = tx.send(env.trace);
            }
        })
        .start()
        .await
        .expect("audit");
    let server = Agent::builder()
        .id("server")
        .agent_type("worker")
        .transport(Arc::new(qb.clone()))
        .on_request(move |agent, req| {
            let tx = seen_tx.clone();
            async move {
                tracing::info!("working on it");
                let _ = tx.send((req.trace.clone(), current_trace()));
                // Sent on from the handler: the same trace, the handler's span as parent.
                agent
                    .send_to_agent(&"audit".into(), &1u32, "coordination")
                    .await
                    .map_err(|e| HandlerError::new(e.to_string()))?;
                Ok::<_, HandlerError>(req.decode::<u32>()? + 1)
            }
        })
        .start()
        .await
        .expect("server");
    let client = Agent::builder()
        .id("client")
        .agent_type("commander")
        .transport(Arc::new(qa.clone()))
        .start()
        .await
        .expect("client");
    until_peers(&client, 2).await;
    until_peers(&server, 2).await;

    let root = TraceParent::root();
    let answer: u32 = traced(
        root,
        client.request_from_agent(server.id(), &41u32, RequestOptions::default()),
    )
    .await
    .expect("answered");
    assert_eq!(answer, 42);
    let (received, handling) = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("handled")
        .expect("open");
    assert_eq!(
        received,
        Some(Box::new(root)),
        "the request carries the requester's span"
    );
    let handling = handling.expect("the handler runs in a span of the trace");
    assert_eq!(handling.trace_id, root.trace_id);
    assert_ne!(handling.parent_id, root.parent_id, "a span of its own");
    let onward = tokio::time::timeout(WAIT, audited.recv())
        .await
        .expect("audited")
        .expect("open")
        .expect("traced");
    assert_eq!(*onward, handling, "sent on from the handler's span");
    // The server's log line is inside a span naming the client's trace.
    let text = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
    let line = text
        .lines()
        .find(|l| l.contains("working on it"))
        .expect("the handler logged");
    assert!(
        line.contains(&format!("trace_id={}", root.trace_id_hex())),
        "{line}"
    );

    // Untraced work stays untraced: nothing is added to the envelope.
    let _: u32 = client
        .request_from_agent(server.id(), &1u32, RequestOptions::default())
        .await
        .expect("answered");
    let (received, handling) = seen.recv().await.expect("open");
    assert_eq!((received, handling), (None, None));
}
