//! The fallback chain QUIC, then NATS, then the local bus: the conformance suite over it,
//! and what happens when QUIC cannot reach a peer that NATS can. Each endpoint here has its
//! own bus, as separate processes would: only QUIC and NATS cross between them.
#![cfg(all(feature = "quic", feature = "nats"))]

use std::sync::Arc;
use std::time::Duration;

use aqe_agent::{Agent, EventBus, Fallback, FallbackPolicy, NatsTransport, QuicTransport};
use aqe_core::conformance::Harness;
use aqe_core::{BroadcastOptions, Event, RequestOptions, Transport, TransportKind};
use aqe_nats::NatsConfig;
use aqe_nats::testing::NatsServer;
use aqe_quic::QuicConfig;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

/// One "host": a QUIC endpoint, a NATS connection and a bus of its own.
struct Host {
    quic: QuicTransport,
    nats: NatsTransport,
    chain: Arc<Fallback>,
}

async fn host(bootstrap: Option<std::net::SocketAddr>, nats_url: &str, fleet: &str) -> Host {
    let quic = QuicTransport::bind(QuicConfig {
        host: "127.0.0.1".into(),
        bootstrap_peers: bootstrap.map(|a| a.to_string()).into_iter().collect(),
        ..QuicConfig::default()
    })
    .await
    .expect("bind");
    let nats = NatsTransport::connect(NatsConfig {
        servers: vec![nats_url.to_owned()],
        fleet: fleet.to_owned(),
        ..NatsConfig::default()
    })
    .await
    .expect("connect");
    let chain = Fallback::chain(Arc::new(quic.clone()))
        .then(Arc::new(nats.clone()), FallbackPolicy::default())
        .then(Arc::new(EventBus::new()), FallbackPolicy::default())
        .build();
    Host { quic, nats, chain }
}

async fn nats_url() -> String {
    tokio::task::spawn_blocking(|| NatsServer::shared().url())
        .await
        .expect("server")
}

fn fleet() -> String {
    format!("chain-{}", aqe_core::MessageId::next())
}

struct Chain;

#[async_trait::async_trait]
impl Harness for Chain {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        let (url, fleet) = (nats_url().await, fleet());
        let first = host(None, &url, &fleet).await;
        let addr = first.quic.local_addr();
        let mut out: Vec<Arc<dyn Transport>> = vec![first.chain];
        for _ in 1..n {
            out.push(host(Some(addr), &url, &fleet).await.chain);
        }
        out
    }
}

aqe_core::conformance_tests!(Chain);

/// An executor `id` on `transport` that passes the `u32` of every message it takes on.
fn collecting(
    id: &str,
    transport: Arc<dyn Transport>,
) -> (aqe_agent::AgentBuilder, mpsc::UnboundedReceiver<u32>) {
    let (tx, got) = mpsc::unbounded_channel();
    let builder = Agent::builder()
        .id(id)
        .agent_type("executor")
        .transport(transport)
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<u32>().expect("u32"));
            }
        });
    (builder, got)
}

async fn until<F: Fn() -> bool>(what: &str, done: F) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

fn known(t: &impl Transport, id: &str) -> bool {
    t.peers().iter().any(|p| p.id.as_str() == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_quic_cannot_reach_a_peer_nats_carries_everything() {
    let (url, fleet) = (nats_url().await, fleet());
    let a = host(None, &url, &fleet).await;
    let b = host(Some(a.quic.local_addr()), &url, &fleet).await;
    let (worker, mut got) = collecting("worker", b.chain.clone());
    let worker = worker
        .on_request(|_a, req| async move {
            let n: u32 = req.decode()?;
            Ok::<_, aqe_agent::HandlerError>(n * 2)
        })
        .start()
        .await
        .expect("start");
    let commander = Agent::builder()
        .id("commander")
        .agent_type("commander")
        .transport(a.chain.clone())
        .start()
        .await
        .expect("start");
    until("worker known over QUIC and NATS", || {
        known(&a.quic, "worker") && known(&a.nats, "worker")
    })
    .await;
    // Over QUIC while it works: no fallback.
    let answer: u32 = commander
        .request_from_agent(worker.id(), &1u32, RequestOptions::default())
        .await
        .expect("over QUIC");
    assert_eq!(answer, 2);
    assert_eq!(commander.stats().fallbacks_used, 0);
    // B's QUIC endpoint goes: only NATS reaches it now.
    b.quic.shutdown().await;
    until("worker gone from QUIC", || !known(&a.quic, "worker")).await;
    let mut events = commander.events();
    for i in 0..100u32 {
        commander
            .send_to_agent(worker.id(), &i, "coordination")
            .await
            .expect("send over NATS");
    }
    for i in 0..100u32 {
        let n = tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("message")
            .expect("open");
        assert_eq!(n, i, "in order, once each");
    }
    let answer: u32 = commander
        .request_from_agent(worker.id(), &21u32, RequestOptions::default())
        .await
        .expect("request over NATS");
    assert_eq!(answer, 42);
    let report = commander
        .broadcast_to_fleet(&7u32, BroadcastOptions::default())
        .await
        .expect("broadcast");
    assert!(
        report.delivered.iter().any(|p| p.as_str() == "worker"),
        "{report:?}"
    );
    assert_eq!(
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("broadcast")
            .expect("open"),
        7
    );
    let mut via_nats = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
        if let Event::FallbackUsed { via, .. } = e {
            assert_eq!(
                via,
                NatsTransport::KIND,
                "NATS, not the local bus, carried it"
            );
            via_nats += 1;
        }
    }
    assert!(via_nats >= 102, "{via_nats} operations fell back to NATS");
    let s = commander.stats();
    assert_eq!(s.messages_failed, 0);
    assert_ne!(NatsTransport::KIND, TransportKind::new("event bus"));
    commander.shutdown().await;
    worker.shutdown().await;
    a.chain.shutdown().await;
    b.chain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_when_quic_goes_away_arrive_over_nats_once_each_in_order() {
    const N: u32 = 400;
    // Each payload large enough to travel apart from its envelope's fields
    // (`aqe_core::Encoded`), so that what is redelivered over NATS is re-encoded from parts.
    const PAD: usize = 1500;
    let (url, fleet) = (nats_url().await, fleet());
    let a = host(None, &url, &fleet).await;
    let b = host(Some(a.quic.local_addr()), &url, &fleet).await;
    let (tx, mut got) = mpsc::unbounded_channel();
    let sink = Agent::builder()
        .id("sink")
        .agent_type("analyzer")
        .transport(b.chain.clone())
        .on_message(move |_a, env| {
            let tx = tx.clone();
            async move {
                // A slow receiver: many messages are unacknowledged when QUIC goes.
                tokio::time::sleep(Duration::from_micros(500)).await;
                let (i, pad) = env.decode::<(u32, Vec<u8>)>().expect("(u32, pad)");
                assert_eq!(pad, vec![i as u8; PAD], "the payload arrives whole");
                let _ = tx.send(i);
            }
        })
        .start()
        .await
        .expect("start");
    let source = Agent::builder()
        .id("source")
        .agent_type("executor")
        .transport(a.chain.clone())
        .start()
        .await
        .expect("start");
    until("sink known over QUIC and NATS", || {
        known(&a.quic, "sink") && known(&a.nats, "sink")
    })
    .await;
    let mut events = source.events();
    for i in 0..N {
        source
            .send_to_agent(sink.id(), &(i, vec![i as u8; PAD]), "coordination")
            .await
            .expect("accepted");
        if i == N / 4 {
            let q = b.quic.clone();
            tokio::spawn(async move { q.shutdown().await });
        }
    }
    let mut seen = Vec::new();
    while seen.len() < N as usize {
        seen.push(
            tokio::time::timeout(WAIT, got.recv())
                .await
                .expect("every message arrives")
                .expect("open"),
        );
    }
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "each once, in order");
    until("all confirmed", || source.stats().messages_unconfirmed == 0).await;
    let stats = source.stats();
    assert_eq!(stats.messages_failed, 0);
    let mut redelivered = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
        if let Event::FallbackUsed { operation, via, .. } = e {
            assert_eq!(via, NatsTransport::KIND);
            redelivered += usize::from(operation == "redeliver");
        }
    }
    eprintln!(
        "{N} sent; {} fell back to NATS ({redelivered} redelivered after QUIC went away)",
        stats.fallbacks_used
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(got.try_recv().is_err(), "nothing arrives twice");
    source.shutdown().await;
    sink.shutdown().await;
    a.chain.shutdown().await;
    b.chain.shutdown().await;
}

/// `Agent::enable` takes any transport's configuration: two agents on buses of their own
/// (two "processes") reach each other once each enables NATS, and not after one disables it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_nats_at_run_time_joins_the_fleet_and_disabling_leaves_it() {
    let (url, fleet) = (nats_url().await, fleet());
    let config = || NatsConfig {
        servers: vec![url.clone()],
        fleet: fleet.clone(),
        ..NatsConfig::default()
    };
    let (worker, mut got) = collecting("worker", Arc::new(EventBus::new()));
    let worker = worker.start().await.expect("start");
    let commander = Agent::builder()
        .id("commander")
        .agent_type("commander")
        .transport(Arc::new(EventBus::new()))
        .start()
        .await
        .expect("start");
    let mut events = commander.events();
    assert!(
        commander
            .send_to_agent(worker.id(), &0u32, "coordination")
            .await
            .is_err(),
        "separate buses: nothing reaches the worker yet"
    );
    worker.enable(config()).await.expect("enable on the worker");
    commander
        .enable(config())
        .await
        .expect("enable on the commander");
    assert!(
        commander.enable(config()).await.is_err(),
        "one NATS transport at a time"
    );
    assert!(commander.enabled::<NatsTransport>().await.is_some());
    until("the worker known over NATS", || {
        commander
            .transport()
            .peers()
            .iter()
            .any(|p| p.id.as_str() == "worker")
    })
    .await;
    for i in 1..=10u32 {
        commander
            .send_confirmed(worker.id(), &i, "coordination")
            .await
            .expect("over NATS");
    }
    for i in 1..=10u32 {
        assert_eq!(got.recv().await, Some(i));
    }
    let mut enabled = false;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
        enabled |= matches!(e, Event::TransportEnabled { kind } if kind == NatsTransport::KIND);
    }
    assert!(enabled, "TransportEnabled(NATS) was announced");
    commander.disable(NatsTransport::KIND).await;
    assert!(commander.enabled::<NatsTransport>().await.is_none());
    assert!(
        commander
            .send_to_agent(worker.id(), &99u32, "coordination")
            .await
            .is_err(),
        "back on its own bus alone"
    );
    commander.shutdown().await;
    worker.shutdown().await;
}
