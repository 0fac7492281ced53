//! Every agent API call over the event bus: the happy paths and the typed failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aqe_agent::{Agent, EventBus, HandlerError};
use aqe_core::{
    AgentId, BroadcastOptions, Channel, ChannelKind, DiscoveryOptions, Error, Event, HealthStatus,
    Priority, RemoteErrorKind, RequestOptions, StreamFailure, StreamOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Task {
    n: u32,
    name: String,
}

fn bus() -> Arc<EventBus> {
    Arc::new(EventBus::new())
}

async fn plain(bus: &Arc<EventBus>, id: &str, ty: &str) -> Agent {
    Agent::builder()
        .id(id)
        .agent_type(ty)
        .transport(bus.clone())
        .start()
        .await
        .expect("start")
}

/// An agent that forwards every message payload (decoded as `T`) to the returned receiver.
async fn collector<T>(bus: &Arc<EventBus>, id: &str) -> (Agent, mpsc::UnboundedReceiver<T>)
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let agent = Agent::builder()
        .id(id)
        .agent_type("collector")
        .transport(bus.clone())
        .on_message(move |_agent, env| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(env.decode::<T>().expect("payload type"));
            }
        })
        .start()
        .await
        .expect("start");
    (agent, rx)
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_agent_delivers_typed_payloads_in_order() {
    let bus = bus();
    let (worker, mut got) = collector::<Task>(&bus, "worker").await;
    let commander = plain(&bus, "commander", "commander").await;
    for n in 0..100 {
        let task = Task {
            n,
            name: format!("t{n}"),
        };
        commander
            .send_to_agent(worker.id(), &task, "coordination")
            .await
            .expect("send");
    }
    for n in 0..100 {
        assert_eq!(recv(&mut got).await.n, n);
    }
    let s = commander.stats();
    assert_eq!(s.messages_sent, 100);
    assert!(s.bytes_sent > 0);
    assert_eq!(worker.stats().messages_received, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_errors_are_typed() {
    let bus = bus();
    let a = Agent::builder()
        .id("a")
        .agent_type("t")
        .transport(bus.clone())
        .channel(Channel::coordination())
        .channel(Channel::new("tiny", ChannelKind::Unicast).with_max_message_size(16))
        .start()
        .await
        .expect("start");
    let b = Agent::builder()
        .id("b")
        .agent_type("t")
        .transport(bus.clone())
        .channel(Channel::coordination())
        .start()
        .await
        .expect("start");
    let err = a
        .send_to_agent(&"ghost".into(), &1u8, "coordination")
        .await
        .expect_err("unknown peer");
    assert!(matches!(err, Error::PeerNotFound { .. }), "{err}");
    let err = a
        .send_to_agent(b.id(), &1u8, "results")
        .await
        .expect_err("a lacks results");
    assert!(
        matches!(err, Error::ChannelNotFound { ref agent, .. } if agent == a.id()),
        "{err}"
    );
    let err = a
        .send_to_agent(b.id(), &1u8, "tiny")
        .await
        .expect_err("b lacks tiny");
    assert!(
        matches!(err, Error::ChannelNotFound { ref agent, .. } if agent == b.id()),
        "{err}"
    );
    let err = a
        .send_to_agent(b.id(), &"x".repeat(100), "tiny")
        .await
        .expect_err("too large");
    assert!(
        matches!(err, Error::MessageTooLarge { max: 16, .. }),
        "{err}"
    );
    assert_eq!(
        a.health().recent_errors.len(),
        4,
        "errors are kept for the health report"
    );
}

async fn responder(bus: &Arc<EventBus>, id: &str) -> Agent {
    Agent::builder()
        .id(id)
        .agent_type("analyzer")
        .transport(bus.clone())
        .on_request(|agent, req| async move {
            match req.decode::<Task>()? {
                Task { name, .. } if name == "fail" => {
                    Err(HandlerError::new("coverage database unavailable"))
                }
                Task { n, name } if name == "huge" => Ok(vec![0u8; n as usize]),
                Task { n, .. } => Ok(format!("{} did {}", agent.id(), n * 2).into_bytes()),
            }
        })
        .start()
        .await
        .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_from_agent_returns_the_handlers_value() {
    let bus = bus();
    let analyzer = responder(&bus, "analyzer").await;
    let executor = plain(&bus, "executor", "executor").await;
    let reply: Vec<u8> = executor
        .request_from_agent(
            analyzer.id(),
            &Task {
                n: 21,
                name: "x".into(),
            },
            RequestOptions::default(),
        )
        .await
        .expect("response");
    assert_eq!(reply, b"analyzer did 42");
    assert_eq!(
        executor.stats().rtt.samples,
        1,
        "request round trips are measured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_reach_the_requester_typed() {
    let bus = bus();
    let analyzer = responder(&bus, "analyzer").await;
    let executor = plain(&bus, "executor", "executor").await;
    let opts = RequestOptions::default().with_timeout(WAIT);
    let err = executor
        .request_from_agent::<_, Vec<u8>>(
            analyzer.id(),
            &Task {
                n: 1,
                name: "fail".into(),
            },
            opts.clone(),
        )
        .await
        .expect_err("handler failed");
    assert!(
        matches!(&err, Error::Remote { kind: RemoteErrorKind::HandlerFailed, message, agent } if message.contains("coverage database") && agent == analyzer.id()),
        "{err}"
    );
    let err = executor
        .request_from_agent::<_, Vec<u8>>(analyzer.id(), &7u8, opts.clone())
        .await
        .expect_err("bad request");
    assert!(
        matches!(
            err,
            Error::Remote {
                kind: RemoteErrorKind::BadRequest,
                ..
            }
        ),
        "{err}"
    );
    let err = executor
        .request_from_agent::<_, Vec<u8>>(&"executor".into(), &7u8, opts.clone())
        .await;
    assert!(
        matches!(
            err,
            Err(Error::Remote {
                kind: RemoteErrorKind::NoHandler,
                ..
            })
        ),
        "{err:?}"
    );
    let huge = Task {
        n: 2 * 1024 * 1024,
        name: "huge".into(),
    };
    let err = executor
        .request_from_agent::<_, Vec<u8>>(analyzer.id(), &huge, opts)
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, Error::Remote { kind: RemoteErrorKind::HandlerFailed, message, .. } if message.contains("exceeds")),
        "{err}"
    );
}

/// A responder whose handler never finishes, counting calls and cancellations.
async fn stuck(
    bus: &Arc<EventBus>,
    id: &str,
    answer_from_call: usize,
) -> (Agent, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    struct OnDrop(Arc<AtomicUsize>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (c, d) = (calls.clone(), cancelled.clone());
    let agent = Agent::builder()
        .id(id)
        .agent_type("slow")
        .transport(bus.clone())
        .on_request(move |_agent, _req| {
            let call = c.fetch_add(1, Ordering::SeqCst) + 1;
            let guard = OnDrop(d.clone());
            async move {
                if call < answer_from_call {
                    std::future::pending::<()>().await;
                }
                std::mem::forget(guard);
                Ok::<_, HandlerError>(call as u32)
            }
        })
        .start()
        .await
        .expect("start");
    (agent, calls, cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_retry_then_fail_and_cancel_the_peers_work() {
    let bus = bus();
    let (slow, calls, cancelled) = stuck(&bus, "slow", usize::MAX).await;
    let me = plain(&bus, "me", "t").await;
    let opts = RequestOptions::default()
        .with_timeout(Duration::from_millis(50))
        .with_retries(2)
        .with_retry_delay(Duration::from_millis(10));
    let err = me
        .request_from_agent::<_, u32>(slow.id(), &(), opts)
        .await
        .expect_err("never answered");
    assert!(matches!(err, Error::Timeout { attempts: 3, .. }), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "each retry is a new request"
    );
    tokio::time::timeout(WAIT, async {
        while cancelled.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every abandoned handler is cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_can_succeed() {
    let bus = bus();
    let (slow, calls, _) = stuck(&bus, "slow", 2).await;
    let me = plain(&bus, "me", "t").await;
    let opts = RequestOptions::default()
        .with_timeout(Duration::from_millis(50))
        .with_retries(3);
    let answer: u32 = me
        .request_from_agent(slow.id(), &(), opts)
        .await
        .expect("second attempt answers");
    assert_eq!(answer, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_requests_in_flight_on_both_sides() {
    let bus = bus();
    // The requester shuts down while waiting.
    let (slow, calls, _) = stuck(&bus, "slow", usize::MAX).await;
    let in_handler = |n: usize| {
        let calls = calls.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                while calls.load(Ordering::SeqCst) < n {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the request reached the handler")
        }
    };
    let me = plain(&bus, "me", "t").await;
    let opts = RequestOptions::default().with_timeout(WAIT);
    let call = tokio::spawn({
        let (me, slow) = (me.clone(), slow.id().clone());
        async move { me.request_from_agent::<_, u32>(&slow, &(), opts).await }
    });
    in_handler(1).await;
    me.shutdown().await;
    let err = call.await.expect("join").expect_err("shut down");
    assert!(matches!(err, Error::Shutdown), "{err}");
    assert!(matches!(
        me.send_to_agent(slow.id(), &1u8, "coordination").await,
        Err(Error::Shutdown)
    ));
    // The responder shuts down while its handler runs: the requester learns at once.
    let other = plain(&bus, "other", "t").await;
    let call = tokio::spawn({
        let (other, slow) = (other.clone(), slow.id().clone());
        async move {
            other
                .request_from_agent::<_, u32>(
                    &slow,
                    &(),
                    RequestOptions::default().with_timeout(WAIT),
                )
                .await
        }
    });
    in_handler(2).await;
    slow.shutdown().await;
    let err = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("not a timeout")
        .expect("join")
        .expect_err("dropped");
    assert!(
        matches!(
            err,
            Error::Remote {
                kind: RemoteErrorKind::Dropped,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        slow.health().status,
        HealthStatus::Unhealthy,
        "a shut-down agent is not operational"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_admitted_listeners_and_reports() {
    let bus = bus();
    let (w1, mut g1) = collector::<String>(&bus, "w1").await;
    let (w2, mut g2) = collector::<String>(&bus, "w2").await;
    let (_w3, mut g3) = collector::<String>(&bus, "w3").await;
    let only_results = Agent::builder()
        .id("r")
        .agent_type("t")
        .transport(bus.clone())
        .channel(Channel::results())
        .start()
        .await
        .expect("start");
    let cmd = plain(&bus, "cmd", "commander").await;
    let report = cmd
        .broadcast_to_fleet(&"config v2", BroadcastOptions::default())
        .await
        .expect("broadcast");
    let mut delivered: Vec<_> = report.delivered.iter().map(AgentId::to_string).collect();
    delivered.sort();
    assert_eq!(
        delivered,
        ["w1", "w2", "w3"],
        "the agent without the channel is not targeted"
    );
    for g in [&mut g1, &mut g2, &mut g3] {
        assert_eq!(recv(g).await, "config v2");
    }
    let opts = BroadcastOptions::on("coordination")
        .including([w1.id().clone(), w2.id().clone(), "ghost".into()])
        .excluding([w2.id().clone()]);
    let report = cmd
        .broadcast_to_fleet(&"only w1", opts)
        .await
        .expect("broadcast");
    assert_eq!(report.delivered, vec![w1.id().clone()]);
    assert!(
        matches!(report.failed.as_slice(), [(id, Error::PeerNotFound { .. })] if id.as_str() == "ghost")
    );
    assert_eq!(recv(&mut g1).await, "only w1");
    let err = cmd
        .broadcast_to_fleet(&1u8, BroadcastOptions::on("results"))
        .await
        .expect_err("unicast channel");
    assert!(matches!(err, Error::WrongChannelKind { .. }), "{err}");
    drop((w2, only_results));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_deliver_open_data_and_close_in_order() {
    let bus = bus();
    let (done_tx, done_rx) = oneshot::channel();
    let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
    let monitor_sink = Agent::builder()
        .id("sink")
        .agent_type("collector")
        .transport(bus.clone())
        .on_stream(move |_agent, mut stream| {
            let done_tx = done_tx.clone();
            async move {
                let mut chunks = Vec::new();
                let mut fin = false;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.expect("clean stream");
                    fin |= chunk.fin;
                    chunks.push(chunk.data);
                }
                if let Some(tx) = done_tx.lock().expect("lock").take() {
                    let _ = tx.send((stream.header().from.clone(), chunks, fin));
                }
            }
        })
        .start()
        .await
        .expect("start");
    let mut events = monitor_sink.events();
    let monitor = plain(&bus, "monitor", "performance-monitor").await;
    let s = monitor
        .open_stream(
            monitor_sink.id(),
            StreamOptions::default()
                .with_channel("metrics")
                .with_reliable(true),
        )
        .await
        .expect("open");
    for i in 0..50u8 {
        monitor
            .write_stream(s, vec![i], false)
            .await
            .expect("write");
    }
    monitor.close_stream(s).await.expect("close");
    let (from, chunks, fin) = tokio::time::timeout(WAIT, done_rx)
        .await
        .expect("in time")
        .expect("sent");
    assert_eq!(from, *monitor.id());
    assert!(fin, "the end was seen");
    let data: Vec<u8> = chunks.concat();
    assert_eq!(data, (0..50u8).collect::<Vec<_>>());
    let err = monitor
        .write_stream(s, vec![1], false)
        .await
        .expect_err("closed");
    assert!(
        matches!(
            err,
            Error::Stream {
                reason: StreamFailure::Unknown,
                ..
            }
        ),
        "{err}"
    );
    let (mut opened, mut closed) = (false, false);
    while !(opened && closed) {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("events")
            .expect("open")
        {
            Event::StreamOpened { stream, .. } if stream == s => opened = true,
            Event::StreamClosed { stream, .. } if stream == s => closed = true,
            _ => {}
        }
    }
    assert_eq!(monitor.stats().active_streams, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_an_agent_without_stream_handler_fail() {
    let bus = bus();
    let deaf = plain(&bus, "deaf", "t").await;
    let me = plain(&bus, "me", "t").await;
    // Refused at open: the agent announces no stream capability.
    let err = me
        .open_stream(deaf.id(), StreamOptions::default())
        .await
        .expect_err("refused at open");
    assert!(
        matches!(
            err,
            Error::Stream {
                reason: StreamFailure::NotTaken,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("takes no streams"), "{err}");
    // An agent with a stream handler announces it, and takes the stream.
    let reader = Agent::builder()
        .id("reader")
        .agent_type("t")
        .transport(bus.clone())
        .on_stream(|_a, _s| async {})
        .start()
        .await
        .expect("start");
    assert!(
        reader
            .registration()
            .capabilities
            .iter()
            .any(|c| c.as_str() == aqe_core::STREAM_CAPABILITY)
    );
    me.open_stream(reader.id(), StreamOptions::default())
        .await
        .expect("open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_filters_and_limits() {
    let bus = bus();
    let cmd = plain(&bus, "commander", "commander").await;
    let mut workers = Vec::new();
    for i in 0..5 {
        workers.push(plain(&bus, &format!("worker-{i}"), "worker").await);
    }
    let _mon = Agent::builder()
        .id("monitor")
        .agent_type("monitor")
        .transport(bus.clone())
        .channel(Channel::metrics())
        .start()
        .await
        .expect("start");
    let all = cmd.discover_peers(&DiscoveryOptions::default());
    assert_eq!(all.len(), 6, "everyone but the commander itself");
    let some = cmd.discover_peers(
        &DiscoveryOptions::default()
            .with_filter(|p| p.agent_type.as_str() == "worker")
            .with_max_peers(3),
    );
    let ids: Vec<_> = some.iter().map(|p| p.id.to_string()).collect();
    assert_eq!(ids, ["worker-0", "worker-1", "worker-2"]);
    let on_coord = cmd.discover_peers(&DiscoveryOptions::default().with_channel("coordination"));
    assert!(on_coord.iter().all(|p| p.id.as_str() != "monitor"));
    assert_eq!(on_coord.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_announce_peers_and_messages() {
    let bus = bus();
    let watcher = plain(&bus, "watcher", "monitor").await;
    let mut events = watcher.events();
    let newcomer = plain(&bus, "newcomer", "worker").await;
    newcomer
        .send_to_agent(watcher.id(), &"hello", "coordination")
        .await
        .expect("send");
    newcomer.shutdown().await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("event")
            .expect("open")
        {
            Event::PeerDiscovered(p) if p.id.as_str() == "newcomer" => seen.push("discovered"),
            Event::MessageReceived { from, .. } if from.as_str() == "newcomer" => {
                seen.push("message")
            }
            Event::PeerLeft(id) if id.as_str() == "newcomer" => seen.push("left"),
            _ => {}
        }
    }
    // Membership events are ordered among themselves; traffic events come from another task
    // and may interleave with them either way.
    let pos = |what| seen.iter().position(|s| *s == what).expect("seen");
    assert!(pos("discovered") < pos("left"), "{seen:?}");
    assert!(seen.contains(&"message"), "{seen:?}");
    watcher.shutdown().await;
    assert!(
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("ends")
            .is_none(),
        "the stream ends at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflects_peers_and_shutdown() {
    let bus = bus();
    let alone = plain(&bus, "alone", "t").await;
    let h = alone.health();
    assert_eq!(
        (h.status, h.connected_peers, h.active_channels),
        (HealthStatus::Degraded, 0, 3)
    );
    assert!(h.message.contains("no peers"));
    let other = plain(&bus, "other", "t").await;
    let h = alone.health();
    assert_eq!((h.status, h.connected_peers), (HealthStatus::Healthy, 1));
    other.shutdown().await;
    alone.shutdown().await;
    let h = alone.health();
    assert!(!h.operational);
    assert_eq!(h.status, HealthStatus::Unhealthy);
}

fn lane(name: &str, priority: u8) -> Channel {
    Channel::new(name, ChannelKind::Unicast).with_priority(Priority::new(priority).expect("valid"))
}

/// A receiving agent `slow` busy with a first message until `gate` opens (so that what is
/// sent next waits in its inbox), the sender `me`, both on `channels`; `got` has what `slow`
/// took, in order, as strings.
struct Held {
    slow: Agent,
    me: Agent,
    gate: oneshot::Sender<()>,
    got: mpsc::UnboundedReceiver<String>,
}

async fn held_behind_first(bus: &Arc<EventBus>, channels: &[Channel], first_on: &str) -> Held {
    let (gate, gate_rx) = oneshot::channel::<()>();
    let gate_rx = Arc::new(tokio::sync::Mutex::new(Some(gate_rx)));
    let (tx, got) = mpsc::unbounded_channel();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let builder = |id: &str| {
        channels.iter().cloned().fold(
            Agent::builder()
                .id(id)
                .agent_type("t")
                .transport(bus.clone()),
            |b, c| b.channel(c),
        )
    };
    let slow = builder("slow")
        .on_message(move |_a, env| {
            let (gate, tx, started) = (gate_rx.clone(), tx.clone(), started_tx.clone());
            async move {
                // The first message holds the agent until the test opens the gate.
                if let Some(rx) = gate.lock().await.take() {
                    if let Some(s) = started.lock().expect("lock").take() {
                        let _ = s.send(());
                    }
                    let _ = rx.await;
                }
                let _ = tx.send(env.decode::<String>().expect("string"));
            }
        })
        .start()
        .await
        .expect("start");
    let me = builder("me").start().await.expect("start");
    me.send_to_agent(slow.id(), &"first", first_on)
        .await
        .expect("send");
    // Wait until the first message is being handled, so the next ones queue behind it.
    tokio::time::timeout(WAIT, started_rx)
        .await
        .expect("in time")
        .expect("first is being handled");
    Held {
        slow,
        me,
        gate,
        got,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_messages_overtake_waiting_ones() {
    let Held {
        slow,
        me,
        gate,
        mut got,
    } = held_behind_first(&bus(), &[lane("low", 1), lane("high", 9)], "low").await;
    for (msg, ch) in [
        ("low-1", "low"),
        ("high-1", "high"),
        ("low-2", "low"),
        ("high-2", "high"),
    ] {
        me.send_to_agent(slow.id(), &msg, ch).await.expect("send");
    }
    gate.send(()).expect("gate");
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(recv(&mut got).await);
    }
    assert_eq!(order, ["first", "high-1", "high-2", "low-1", "low-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_from_the_channel_or_the_send_drop_what_waits_too_long() {
    let ttl = Duration::from_millis(100);
    let channels = [lane("plain", 5), lane("fresh", 5).with_ttl(ttl)];
    let Held {
        slow,
        me,
        gate,
        mut got,
    } = held_behind_first(&bus(), &channels, "plain").await;
    let mut events = me.events();
    // Behind the first: one expiring by its channel's TTL, one by its own, one without.
    let by_channel = me
        .send_to_agent(slow.id(), &"stale (channel)", "fresh")
        .await
        .expect("send");
    let by_send = me
        .send_with(
            slow.id(),
            &"stale (send)",
            aqe_core::SendOptions::on("plain").ttl(ttl),
        )
        .await
        .expect("send");
    me.send_to_agent(slow.id(), &"kept", "plain")
        .await
        .expect("send");
    tokio::time::sleep(ttl * 3).await;
    gate.send(()).expect("gate");
    assert_eq!(recv(&mut got).await, "first");
    assert_eq!(
        recv(&mut got).await,
        "kept",
        "the stale ones are never handed out"
    );
    let mut expired = Vec::new();
    tokio::time::timeout(WAIT, async {
        while expired.len() < 2 {
            if let Some(Event::DeliveryFailed { ids, reason, .. }) = events.recv().await {
                assert_eq!(reason, aqe_core::DeliveryFailure::Expired);
                expired.extend(ids);
            }
        }
    })
    .await
    .expect("both reported expired");
    expired.sort();
    let mut want = vec![by_channel, by_send];
    want.sort();
    assert_eq!(expired, want);
    assert_eq!(me.stats().messages_failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_refuses_incomplete_or_invalid_agents() {
    let bus = bus();
    let err = Agent::builder()
        .id("x")
        .transport(bus.clone())
        .start()
        .await
        .expect_err("no type");
    assert!(
        matches!(err, Error::Configuration { ref field, .. } if field == "agentType"),
        "{err}"
    );
    let err = Agent::builder()
        .agent_type("t")
        .start()
        .await
        .expect_err("no transport");
    assert!(
        matches!(err, Error::Configuration { ref field, .. } if field == "transport"),
        "{err}"
    );
    let _a = plain(&bus, "dup", "t").await;
    let err = Agent::builder()
        .id("dup")
        .agent_type("t")
        .transport(bus.clone())
        .start()
        .await
        .expect_err("taken");
    assert!(matches!(err, Error::Configuration { .. }), "{err}");
    let err = Agent::builder()
        .agent_type("t")
        .transport(bus)
        .channel(Channel::metrics())
        .channel(Channel::metrics())
        .start()
        .await
        .expect_err("duplicate channel");
    assert!(matches!(err, Error::Configuration { .. }), "{err}");
}
