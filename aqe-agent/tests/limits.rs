//! The dispatcher never stalls: a panicking handler is caught and reported, idle streams
//! never keep requests waiting, and work beyond the limits is refused, not queued without end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aqe_agent::{Agent, EventBus, HandlerError};
use aqe_core::{Error, HealthStatus, RemoteErrorKind, RequestOptions};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_caught_answered_and_reported() {
    let bus = Arc::new(EventBus::new());
    let seen = Arc::new(AtomicU32::new(0));
    let counted = seen.clone();
    let fragile = Agent::builder()
        .id("fragile")
        .agent_type("analyzer")
        .transport(bus.clone())
        .on_message(move |_a, env| {
            let counted = counted.clone();
            async move {
                let n: u32 = env.decode().expect("u32");
                if n == 1 {
                    panic!("message {n} is poison");
                }
                counted.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_request(|_a, req| async move {
            let n: u32 = req.decode()?;
            if n == 0 {
                panic!("request {n} is poison");
            }
            Ok::<_, HandlerError>(n + 1)
        })
        .start()
        .await
        .expect("start");
    let asker = Agent::builder()
        .agent_type("executor")
        .transport(bus)
        .start()
        .await
        .expect("start");
    let err = asker
        .request_from_agent::<u32, u32>(fragile.id(), &0, RequestOptions::default())
        .await
        .expect_err("the handler panicked");
    assert!(
        matches!(&err, Error::Remote { kind: RemoteErrorKind::HandlerFailed, message, .. } if message.contains("panicked")),
        "{err}"
    );
    // The agent goes on: the next request is answered, messages after a poison one handled.
    let ok: u32 = asker
        .request_from_agent(fragile.id(), &41u32, RequestOptions::default())
        .await
        .expect("answered after the panic");
    assert_eq!(ok, 42);
    for n in 0..3u32 {
        asker
            .send_confirmed(fragile.id(), &n, "coordination")
            .await
            .expect("taken, even the poison one");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let health = fragile.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    assert!(health.message.contains("panicked"), "{}", health.message);
    assert!(
        health
            .recent_errors
            .iter()
            .any(|e| e.message.contains("poison"))
    );
    fragile.shutdown().await;
    asker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_limit_and_its_backlog_are_answered_busy() {
    use futures::StreamExt;
    let bus = Arc::new(EventBus::new());
    // Handlers hold until the test opens the gate: nothing finishes while requests arrive.
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = Agent::builder()
        .id("slow")
        .agent_type("analyzer")
        .transport(bus.clone())
        .max_concurrent_handlers(2)
        .on_request(move |_a, _req| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .expect("start");
    let asker = Agent::builder()
        .agent_type("executor")
        .transport(bus)
        .start()
        .await
        .expect("start");
    // 2 run, 8 wait, the rest are told at once.
    let mut calls: futures::stream::FuturesUnordered<_> = (0..14u32)
        .map(|n| {
            let asker = asker.clone();
            let to = slow.id().clone();
            async move {
                asker
                    .request_from_agent::<u32, ()>(&to, &n, RequestOptions::default())
                    .await
            }
        })
        .collect();
    let mut busy = 0;
    while busy < 4 {
        match tokio::time::timeout(WAIT, calls.next())
            .await
            .expect("in time")
        {
            Some(Err(Error::Busy { .. })) => busy += 1,
            other => panic!("only busy answers before the gate opens: {other:?}"),
        }
    }
    open.send(true).expect("gate");
    let mut answered = 0;
    while let Some(outcome) = tokio::time::timeout(WAIT, calls.next())
        .await
        .expect("in time")
    {
        outcome.expect("answered once running");
        answered += 1;
    }
    assert_eq!((answered, busy), (10, 4));
    slow.shutdown().await;
    asker.shutdown().await;
}

#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_idle_streams_never_keep_a_request_waiting() {
    use aqe_agent::QuicTransport;
    use aqe_core::{StreamOptions, Transport};
    let quic = || {
        QuicTransport::bind(aqe_quic::QuicConfig {
            host: "127.0.0.1".into(),
            max_concurrent_streams: 1000,
            ..aqe_quic::QuicConfig::default()
        })
    };
    let (qa, qb) = (quic().await.expect("bind"), quic().await.expect("bind"));
    qa.connect(qb.local_addr()).await.expect("connect");
    let sink = Agent::builder()
        .id("sink")
        .agent_type("analyzer")
        .transport(Arc::new(qb.clone()))
        .on_stream(|_a, mut s| async move {
            // Holds the stream open, reading nothing until it ends.
            while let Some(Ok(c)) = s.next().await {
                if c.fin {
                    break;
                }
            }
        })
        .on_request(|_a, req| async move {
            let n: u32 = req.decode()?;
            Ok::<_, HandlerError>(n * 2)
        })
        .start()
        .await
        .expect("start");
    let source = Agent::builder()
        .id("source")
        .agent_type("executor")
        .transport(Arc::new(qa.clone()))
        .start()
        .await
        .expect("start");
    tokio::time::timeout(WAIT, async {
        while !qa.peers().iter().any(|p| p.id.as_str() == "sink") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("sink known");
    let mut streams = Vec::new();
    for i in 0..300 {
        streams.push(
            source
                .open_stream(sink.id(), StreamOptions::default())
                .await
                .unwrap_or_else(|e| panic!("open stream {i}: {e}")),
        );
    }
    let started = std::time::Instant::now();
    let answer: u32 = source
        .request_from_agent(
            sink.id(),
            &21u32,
            RequestOptions::default().with_timeout(Duration::from_secs(2)),
        )
        .await
        .expect("answered with 300 idle streams open");
    assert_eq!(answer, 42);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    for s in streams {
        let _ = source.close_stream(s).await;
    }
    source.shutdown().await;
    sink.shutdown().await;
}
