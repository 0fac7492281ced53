//! The agent API over real QUIC, and the fallback from QUIC to the event bus.
#![cfg(feature = "quic")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use aqe_agent::{Agent, EventBus, Fallback, FallbackPolicy, Fleet, HandlerError, QuicTransport};
use aqe_core::{BroadcastOptions, Event, RequestOptions, StreamOptions, Transport};
use aqe_quic::QuicConfig;
use support::{WAIT, quic};
use tokio::sync::mpsc;

/// Waits until the QUIC endpoint itself knows `id` (an agent over a fallback also knows every
/// agent of its bus at once).
async fn until_quic_peer(quic: &QuicTransport, id: &str) {
    tokio::time::timeout(WAIT, async {
        while !quic.peers().iter().any(|p| p.id.as_str() == id) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("peer known over QUIC");
}

async fn until_peer(agent: &Agent, id: &str) {
    tokio::time::timeout(WAIT, async {
        while !agent
            .discover_peers(&Default::default())
            .iter()
            .any(|p| p.id.as_str() == id)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("peer discovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_works_across_quic_endpoints() {
    let (qa, qb) = (quic().await, quic().await);
    qa.connect(qb.local_addr()).await.expect("connect");
    let (tx, mut got) = mpsc::unbounded_channel();
    let (stx, mut streamed) = mpsc::unbounded_channel();
    let analyzer = Agent::builder()
        .id("analyzer")
        .agent_type("coverage-analyzer")
        .transport(Arc::new(qb.clone()))
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<String>().expect("string"));
            }
        })
        .on_request(|_a, req| async move {
            let threshold: u32 = req.decode()?;
            Ok::<_, HandlerError>(format!("above {threshold}%: 87%"))
        })
        .on_stream(move |_a, mut s| {
            let stx = stx.clone();
            async move {
                let mut data = Vec::new();
                while let Some(Ok(c)) = s.next().await {
                    data.extend_from_slice(&c.data);
                }
                let _ = stx.send(data);
            }
        })
        .start()
        .await
        .expect("start");
    let executor = Agent::builder()
        .id("executor")
        .agent_type("test-executor")
        .transport(Arc::new(qa.clone()))
        .start()
        .await
        .expect("start");
    until_peer(&executor, "analyzer").await;
    let peer = executor
        .discover_peers(&Default::default())
        .into_iter()
        .find(|p| p.id.as_str() == "analyzer")
        .expect("listed");
    assert_eq!(peer.address, Some(qb.local_addr().into()));

    executor
        .send_to_agent(analyzer.id(), &"hello over QUIC", "coordination")
        .await
        .expect("send");
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("in time")
            .expect("open"),
        "hello over QUIC"
    );
    let answer: String = executor
        .request_from_agent(analyzer.id(), &80u32, RequestOptions::default())
        .await
        .expect("request");
    assert_eq!(answer, "above 80%: 87%");
    let report = executor
        .broadcast_to_fleet(&"fleet-wide", BroadcastOptions::default())
        .await
        .expect("broadcast");
    assert_eq!(report.delivered, vec![analyzer.id().clone()]);
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("in time")
            .expect("open"),
        "fleet-wide"
    );
    let s = executor
        .open_stream(analyzer.id(), StreamOptions::default())
        .await
        .expect("open");
    executor
        .write_stream(s, &b"chunk-1 "[..], false)
        .await
        .expect("write");
    executor
        .write_stream(s, &b"chunk-2"[..], true)
        .await
        .expect("final write");
    assert_eq!(
        tokio::time::timeout(WAIT, streamed.recv())
            .await
            .expect("in time")
            .expect("open"),
        b"chunk-1 chunk-2"
    );

    let stats = executor.stats();
    assert!(stats.rtt.samples > 0, "QUIC measured the RTT");
    assert!(stats.congestion_window.is_some());
    let health = executor.health();
    assert_eq!(
        (health.status, health.connected_peers),
        (aqe_core::HealthStatus::Healthy, 1)
    );
    executor.shutdown().await;
    analyzer.shutdown().await;
    qa.shutdown().await;
    qb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_unreachable_over_quic_is_reached_over_the_bus() {
    let bus = Arc::new(EventBus::new());
    let q = quic().await;
    let both: Arc<dyn Transport> =
        Fallback::new(Arc::new(q.clone()), bus.clone(), FallbackPolicy::default());
    let (tx, mut got) = mpsc::unbounded_channel();
    // This agent is on the bus only: over QUIC nobody knows it.
    let _legacy = Agent::builder()
        .id("legacy")
        .agent_type("t")
        .transport(bus.clone())
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<u32>().expect("u32"));
            }
        })
        .start()
        .await
        .expect("start");
    let modern = Agent::builder()
        .id("modern")
        .agent_type("t")
        .transport(both)
        .start()
        .await
        .expect("start");
    let mut events = modern.events();
    modern
        .send_to_agent(&"legacy".into(), &7u32, "coordination")
        .await
        .expect("delivered over the bus");
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("in time")
            .expect("open"),
        7
    );
    assert_eq!(modern.stats().fallbacks_used, 1);
    loop {
        if let Event::FallbackUsed { operation, .. } = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("event")
            .expect("open")
        {
            assert_eq!(operation, "send");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_quic_definitions_shares_one_endpoint_per_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let quic_def = |id: &str| {
        format!(
            r#"{{"id":"{id}","agentType":"worker","enableQUIC":true,"quicConfig":{{"host":"127.0.0.1","port":0}}}}"#
        )
    };
    std::fs::write(dir.path().join("a.json"), quic_def("a")).expect("write");
    std::fs::write(dir.path().join("b.json"), quic_def("b")).expect("write");
    std::fs::write(
        dir.path().join("c.json"),
        r#"{"id":"c","agentType":"worker"}"#,
    )
    .expect("write");
    let bus = Arc::new(EventBus::new());
    let fleet = Fleet::from_dir(dir.path(), bus.clone(), |_, b| {
        b.on_request(|a, _r| async move { Ok::<_, HandlerError>(a.id().to_string()) })
    })
    .await
    .expect("fleet");
    assert_eq!(
        fleet.endpoints::<QuicTransport>().count(),
        1,
        "a and b share one QUIC endpoint"
    );
    let a = fleet.get(&"a".into()).expect("a");
    let b_says: String = a
        .request_from_agent(&"b".into(), &(), RequestOptions::default())
        .await
        .expect("same endpoint");
    assert_eq!(b_says, "b");
    // c is on the bus only; a reaches it by falling back.
    let c_says: String = a
        .request_from_agent(&"c".into(), &(), RequestOptions::default())
        .await
        .expect("over the bus");
    assert_eq!(c_says, "c");
    assert_eq!(a.stats().fallbacks_used, 1);
    fleet.shutdown().await;
    assert!(bus.peers().is_empty(), "every agent left the bus");
    let (tx, _rx) = aqe_core::plumbing::inbox("after".into(), 4);
    bus.attach(aqe_core::Registration::new("after", "t"), tx)
        .await
        .expect("the caller's bus keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timing_out_over_quic_is_answered_through_the_fallback_by_one_handler_run() {
    let bus = Arc::new(EventBus::new());
    let (qa, qb) = (quic().await, quic().await);
    qa.connect(qb.local_addr()).await.expect("connect");
    let fa = Fallback::new(Arc::new(qa.clone()), bus.clone(), FallbackPolicy::default());
    let fb = Fallback::new(Arc::new(qb.clone()), bus.clone(), FallbackPolicy::default());
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = runs.clone();
    let slow = Agent::builder()
        .id("slow")
        .agent_type("analyzer")
        .transport(fb)
        .on_request(move |_a, req| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let n: u32 = req.decode()?;
                // Longer than the requester's timeout: the request times out over QUIC and
                // is sent again, with the same id, over the bus.
                tokio::time::sleep(Duration::from_millis(450)).await;
                Ok::<_, HandlerError>(n * 2)
            }
        })
        .start()
        .await
        .expect("start");
    let asker = Agent::builder()
        .id("asker")
        .agent_type("executor")
        .transport(fa)
        .start()
        .await
        .expect("start");
    // Known over QUIC itself (the bus knows every local agent at once).
    until_quic_peer(&qa, "slow").await;
    let answer: u32 = asker
        .request_from_agent(
            slow.id(),
            &21u32,
            RequestOptions::default().with_timeout(Duration::from_millis(300)),
        )
        .await
        .expect("answered");
    assert_eq!(answer, 42);
    // Let any second run show itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    asker.shutdown().await;
    slow.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_when_quic_goes_away_arrive_through_the_fallback_once_each() {
    const N: u32 = 400;
    let bus = Arc::new(EventBus::new());
    let (qa, qb) = (quic().await, quic().await);
    qa.connect(qb.local_addr()).await.expect("connect");
    let fa = Fallback::new(Arc::new(qa.clone()), bus.clone(), FallbackPolicy::default());
    let fb = Fallback::new(Arc::new(qb.clone()), bus.clone(), FallbackPolicy::default());
    let (tx, mut got) = mpsc::unbounded_channel();
    let sink = Agent::builder()
        .id("sink")
        .agent_type("analyzer")
        .transport(fb)
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                // A slow receiver: many messages are unacknowledged when QUIC goes.
                tokio::time::sleep(Duration::from_micros(500)).await;
                let _ = tx.send((env.decode::<u32>().expect("u32"), env.redelivered));
            }
        })
        .start()
        .await
        .expect("start");
    let source = Agent::builder()
        .id("source")
        .agent_type("executor")
        .transport(fa)
        .start()
        .await
        .expect("start");
    until_quic_peer(&qa, "sink").await;
    let mut events = source.events();
    for i in 0..N {
        source
            .send_to_agent(sink.id(), &i, "coordination")
            .await
            .expect("accepted");
        if i == N / 4 {
            // The receiver's QUIC endpoint goes away; the bus still reaches it.
            let qb = qb.clone();
            tokio::spawn(async move { qb.shutdown().await });
        }
    }
    let mut seen = Vec::new();
    while seen.len() < N as usize {
        let (n, _) = tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("every message arrives")
            .expect("open");
        seen.push(n);
    }
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each once, in order");
    tokio::time::timeout(WAIT, async {
        while source.stats().messages_unconfirmed > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all confirmed");
    let stats = source.stats();
    assert_eq!(stats.messages_failed, 0);
    assert!(stats.fallbacks_used > 0, "the bus carried some");
    let mut redelivered = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
        if let Event::FallbackUsed { operation, .. } = e {
            redelivered += usize::from(operation == "redeliver");
        }
    }
    eprintln!(
        "{N} sent; {} fell back ({redelivered} redelivered through the bus after QUIC went away)",
        stats.fallbacks_used
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(got.try_recv().is_err(), "nothing arrives twice");
    source.shutdown().await;
    sink.shutdown().await;
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Job {
    task: String,
    n: u32,
}

/// Payloads say how they are encoded: JSON (as a command line sends it) reaches a Rust
/// handler that decodes its own struct, over real QUIC; a handler may answer in JSON, which
/// the requester decodes as a dynamic value; a typed answer is decoded typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_payloads_reach_typed_handlers_over_quic() {
    let (a, b) = (quic().await, quic().await);
    a.connect(b.local_addr()).await.expect("connect");
    let (tx, mut got) = mpsc::channel::<Job>(4);
    let _typed = Agent::builder()
        .id("typed")
        .agent_type("worker")
        .transport(Arc::new(b.clone()))
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<Job>().expect("a Job")).await;
            }
        })
        .on_request(|_a, req| async move {
            let job: Job = req.decode()?;
            Ok::<_, HandlerError>(job.n * 2)
        })
        .start()
        .await
        .expect("typed");
    let _json = Agent::builder()
        .id("json")
        .agent_type("tool")
        .transport(Arc::new(b.clone()))
        .on_request_payload(|_a, req| async move {
            let v: serde_json::Value = req.decode()?;
            Ok(aqe_core::Payload::json(&serde_json::json!({ "echo": v }))?)
        })
        .start()
        .await
        .expect("json");
    let cli = Agent::builder()
        .id("cli")
        .agent_type("cli")
        .transport(Arc::new(a.clone()))
        .start()
        .await
        .expect("cli");
    until_peer(&cli, "typed").await;
    until_peer(&cli, "json").await;

    let text = r#"{"task":"lint","n":21}"#;
    cli.send_payload(
        &"typed".into(),
        aqe_core::Payload::json_text(text).expect("JSON"),
        "coordination",
    )
    .await
    .expect("send");
    let job = tokio::time::timeout(WAIT, got.recv())
        .await
        .expect("in time")
        .expect("a job");
    assert_eq!(
        job,
        Job {
            task: "lint".into(),
            n: 21
        }
    );

    let typed = cli
        .request_payload(
            &"typed".into(),
            aqe_core::Payload::json_text(text).expect("JSON"),
            RequestOptions::default(),
        )
        .await
        .expect("typed answer");
    assert_eq!(typed.encoding, aqe_core::Encoding::Postcard);
    assert_eq!(typed.decode::<u32>().expect("u32"), 42);

    let dynamic = cli
        .request_payload(
            &"json".into(),
            aqe_core::Payload::json_text(text).expect("JSON"),
            RequestOptions::default(),
        )
        .await
        .expect("JSON answer");
    assert_eq!(dynamic.encoding, aqe_core::Encoding::Json);
    let v: serde_json::Value = dynamic.decode().expect("value");
    assert_eq!(v["echo"]["task"], "lint");

    // A typed request the JSON handler cannot read as JSON: a bad request, said so.
    let err = cli
        .request_from_agent::<_, serde_json::Value>(
            &"json".into(),
            &7u32,
            RequestOptions::default(),
        )
        .await
        .expect_err("postcard is not JSON");
    assert!(
        matches!(
            err,
            aqe_core::Error::Remote {
                kind: aqe_core::RemoteErrorKind::BadRequest,
                ..
            }
        ),
        "{err}"
    );
}

/// QUIC switched on and off at run time (the guide's `enableQUIC()` / `disableQUIC()`): two
/// agents of one bus move their traffic to QUIC, then one of them takes QUIC away in the
/// middle of an ordered stream of messages; every message arrives once, in order, and both
/// switches are announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_enabled_and_disabled_at_run_time_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let bus = Arc::new(EventBus::new());
    let (tx, mut got) = mpsc::channel::<u32>(4096);
    let b = Agent::builder()
        .id("b")
        .agent_type("worker")
        .transport(bus.clone())
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<u32>().expect("a number")).await;
            }
        })
        .start()
        .await
        .expect("b");
    let a = Agent::builder()
        .id("a")
        .agent_type("boss")
        .transport(bus.clone())
        .start()
        .await
        .expect("a");
    let mut b_events = b.events();
    let config = || QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    };
    a.enable(config()).await.expect("enable on a");
    assert!(a.enable(config()).await.is_err(), "enabled once");
    let a_quic = a.enabled::<QuicTransport>().await.expect("a's endpoint");
    b.enable(QuicConfig {
        bootstrap_peers: vec![a_quic.local_addr().to_string()],
        ..config()
    })
    .await
    .expect("enable on b");
    until_quic_peer(&a_quic, "b").await;

    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..1000u32 {
                a.send_to_agent(&"b".into(), &i, "coordination")
                    .await
                    .expect("accepted");
            }
        })
    };
    let mut received = Vec::new();
    while received.len() < 1000 {
        let n = tokio::time::timeout(WAIT, got.recv())
            .await
            .unwrap_or_else(|_| panic!("messages keep coming after {}", received.len()))
            .expect("open");
        received.push(n);
        if received.len() == 300 {
            // b takes QUIC away in the middle of the flow (its inbox keeps filling meanwhile).
            b.disable(QuicTransport::KIND).await;
            assert!(
                b.enabled::<QuicTransport>().await.is_none(),
                "b's QUIC is gone"
            );
        }
    }
    sender.await.expect("sender");
    assert_eq!(
        received,
        (0..1000).collect::<Vec<_>>(),
        "once each, in order"
    );
    assert!(
        aqe_core::Transport::stats(&a_quic, a.id()).messages_sent > 0,
        "part of it went over QUIC"
    );
    let mut seen = (false, false);
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), b_events.recv()).await
    {
        match e {
            Event::TransportEnabled { .. } => seen.0 = true,
            Event::TransportDisabled { .. } => seen.1 = true,
            _ => {}
        }
    }
    assert_eq!(seen, (true, true), "both switches announced");
    let stats = a.stats();
    assert_eq!(stats.messages_failed, 0, "nothing reported lost");
    a.disable(QuicTransport::KIND).await;
    a.shutdown().await;
    b.shutdown().await;
}
