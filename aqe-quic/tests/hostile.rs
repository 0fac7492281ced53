//! A hostile peer, driven by hand over real QUIC on loopback: it cannot steer an endpoint (its
//! word about addresses and endpoints is not taken unless it is authenticated, its claimed
//! identity is checked against its certificate), and it cannot make an endpoint grow or wait
//! without bound (requests, frame lengths, a control stream it does not read, floods). Every
//! test is bounded in count and time.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aqe_core::plumbing::FrameCodec;
use aqe_core::{
    AgentId, Channel, Envelope, Error, Event, MessageKind, Recipient, Registration, RequestOptions,
    SecurityFailure, Transport,
};
use aqe_quic::QuicConfig;
use aqe_quic::testing::{self, Control, Down, FrameReader, Hello, Preamble, Relayed, Up, close};
use bytes::{BufMut, Bytes, BytesMut};
use s2n_quic::client::Connect;
use support::*;

fn codec() -> FrameCodec {
    FrameCodec::default()
}

async fn raw_client() -> s2n_quic::Client {
    let (_, client_tls, _) = testing::dev_tls().await;
    s2n_quic::Client::builder()
        .with_tls(client_tls)
        .expect("tls")
        .with_io("127.0.0.1:0")
        .expect("io")
        .start()
        .expect("client")
}

async fn raw_connect(client: &s2n_quic::Client, to: SocketAddr) -> s2n_quic::Connection {
    client
        .connect(Connect::new(to).with_server_name("localhost"))
        .await
        .expect("QUIC handshake")
}

fn raw_hello(endpoint: u64, listen: &str) -> Hello {
    Hello {
        version: testing::PROTOCOL_VERSION,
        endpoint,
        nonce: 7,
        listen: listen.parse().expect("addr"),
        token: None,
        window: 64,
    }
}

/// A connection driven by hand, past its hello exchange.
struct Raw {
    _client: s2n_quic::Client,
    connection: s2n_quic::Connection,
    control: FrameReader,
    send: s2n_quic::stream::SendStream,
}

/// Connects to `to`, sends `hello` then `after` on the control stream, reads the answer hello.
async fn raw_join(to: SocketAddr, hello: &Hello, after: &[Control]) -> Raw {
    let client = raw_client().await;
    let mut connection = raw_connect(&client, to).await;
    let (recv, mut send) = connection
        .open_bidirectional_stream()
        .await
        .expect("control stream")
        .split();
    let mut first = BytesMut::new();
    codec().encode(hello, &mut first).expect("encode");
    for c in after {
        codec().encode(c, &mut first).expect("encode");
    }
    send.send(first.freeze()).await.expect("send hello");
    let mut control = FrameReader::new(recv, codec());
    let _theirs: Hello = tokio::time::timeout(WAIT, control.next())
        .await
        .expect("hello back in time")
        .expect("hello")
        .expect("hello");
    Raw {
        _client: client,
        connection,
        control,
        send,
    }
}

fn reg(id: &str) -> Registration {
    Registration::new(id, "test").with_channel(Channel::coordination())
}

/// The application code a connection was closed with, once it is.
async fn close_code(connection: &mut s2n_quic::Connection) -> Option<u64> {
    tokio::time::timeout(WAIT, async {
        loop {
            match connection.accept().await {
                Err(s2n_quic::connection::Error::Application { error, .. }) => {
                    return Some(u64::from(error));
                }
                Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("closed in time")
}

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peers_word_about_addresses_and_endpoints_is_not_taken() {
    let e = endpoint(config()).await;
    let _ie = attach(&e, "e").await;
    let f = endpoint(config()).await;
    let _if = attach(&f, "f").await;
    // f dialed e: it verified e's certificate and takes e's word.
    f.connect(e.local_addr()).await.expect("f to e");
    await_peer(&f, "e").await;
    // A stranger (no token, no client certificate) claims a made-up listen address, hosts
    // an agent, and tells of an endpoint somewhere else.
    let bait = Control::Relay(Relayed::Snapshot {
        endpoint: 777,
        listen: "10.1.2.3:5555".parse().expect("addr"),
        generation: 1,
        agents: vec![reg("bait")],
    });
    let snapshot = Control::Snapshot {
        generation: 1,
        agents: vec![reg("stranger")],
        last: true,
    };
    let _raw = raw_join(
        e.local_addr(),
        &raw_hello(12345, "10.9.8.7:4444"),
        &[snapshot, bait],
    )
    .await;
    await_peer(&e, "stranger").await;
    let stranger = e
        .peers()
        .into_iter()
        .find(|p| p.id.as_str() == "stranger")
        .expect("listed");
    assert_eq!(
        stranger.address,
        Some(
            "127.0.0.1:4444"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into()
        ),
        "its address takes the IP its connection comes from"
    );
    // e relays its direct peer's membership to f, with the observed address.
    await_peer(&f, "stranger").await;
    let seen_by_f = f
        .peers()
        .into_iter()
        .find(|p| p.id.as_str() == "stranger")
        .expect("listed");
    assert_eq!(seen_by_f.address, stranger.address);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in [&e, &f] {
        assert!(
            t.peers().iter().all(|p| p.id.as_str() != "bait"),
            "the stranger's word about another endpoint was taken"
        );
    }
    assert_eq!(
        (e.connections(), f.connections()),
        (2, 1),
        "nobody dialed anything"
    );
    let err = f
        .send(Envelope::new(
            "f".into(),
            Recipient::Agent("bait".into()),
            "coordination".into(),
            MessageKind::Direct,
            Bytes::new(),
        ))
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::PeerNotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_id_the_certificate_does_not_give_is_refused() {
    let (server_tls, _, real_id) = testing::dev_tls().await;
    let mut server = s2n_quic::Server::builder()
        .with_tls(server_tls)
        .expect("tls")
        .with_io("127.0.0.1:0")
        .expect("io")
        .start()
        .expect("server");
    let addr = server.local_addr().expect("addr");
    let e = endpoint(config()).await;
    let impostor = tokio::spawn(async move {
        let mut connection = server.accept().await.expect("dialed");
        let (recv, mut send) = connection
            .accept_bidirectional_stream()
            .await
            .expect("stream")
            .expect("stream")
            .split();
        let mut reader = FrameReader::new(recv, codec());
        let _theirs: Option<Hello> = reader.next().await.expect("hello");
        // Claims an id other than the one its certificate gives.
        let claim = raw_hello(real_id ^ 0xdead, &addr.to_string());
        send.send(codec().encode_to_bytes(&claim).expect("encode"))
            .await
            .expect("send");
        close_code(&mut connection).await
    });
    let err = e.connect(addr).await.expect_err("impostor");
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::IdentityMismatch,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        impostor.await.expect("join"),
        Some(u64::from(close::IDENTITY_MISMATCH))
    );
    assert_eq!(e.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_id_announced_by_a_second_endpoint_is_refused_and_reported() {
    let a = endpoint(config()).await;
    let _ia = attach(&a, "a").await;
    let b = endpoint(config()).await;
    let mut ib = attach(&b, "dup").await;
    let c = endpoint(config()).await;
    let _ic = attach(&c, "dup").await;
    let mut events = a.subscribe();
    a.connect(b.local_addr()).await.expect("a to b");
    await_peer(&a, "dup").await;
    a.connect(c.local_addr()).await.expect("a to c");
    let claimed_by = await_event(&mut events, |e| match e {
        Event::AgentConflict { agent, claimed_by } if agent.as_str() == "dup" => {
            Some(claimed_by.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(
        claimed_by,
        c.local_addr().into(),
        "the second claim is reported"
    );
    let dup = a
        .peers()
        .into_iter()
        .find(|p| p.id.as_str() == "dup")
        .expect("listed");
    assert_eq!(
        dup.address,
        Some(b.local_addr().into()),
        "the first keeps the id"
    );
    let mut msg = Envelope::new(
        "a".into(),
        Recipient::Agent("dup".into()),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from_static(b"to b"),
    );
    msg.priority = Channel::coordination().priority;
    a.send(msg).await.expect("send");
    assert_eq!(&next_message(&mut ib).await.payload[..], b"to b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_lane_requests_to_a_full_inbox_stay_bounded_and_get_busy() {
    const N: usize = 20_000;
    let e = endpoint(config()).await;
    // An agent whose inbox nobody reads.
    let (tx, _never_read) = aqe_core::plumbing::inbox(AgentId::from("sink"), 16);
    e.attach(reg("sink"), tx).await.expect("attach");
    let before = testing::task_count(&e);
    let raw = raw_join(
        e.local_addr(),
        &raw_hello(54321, "127.0.0.1:9"),
        &[Control::Snapshot {
            generation: 1,
            agents: vec![reg("flooder")],
            last: true,
        }],
    )
    .await;
    let mut connection = raw.connection;
    let (recv, mut send) = connection
        .open_bidirectional_stream()
        .await
        .expect("lane")
        .split();
    let mut flood = BytesMut::new();
    codec().encode(&Preamble::Lane, &mut flood).expect("encode");
    for _ in 0..N {
        let mut request = Envelope::new(
            "flooder".into(),
            Recipient::Agent("sink".into()),
            "coordination".into(),
            MessageKind::Request,
            Bytes::from_static(b"work"),
        );
        request.priority = Channel::coordination().priority;
        codec()
            .encode(&Up::Request(request), &mut flood)
            .expect("encode");
    }
    let started = Instant::now();
    send.send(flood.freeze()).await.expect("flood");
    let mut answers = FrameReader::new(recv, codec());
    let mut busy = 0;
    let mut peak_tasks = 0;
    // Everything beyond what the responder holds is answered busy at once.
    let expected_busy = N - QuicConfig::default().limits.requests_in_hand as usize;
    while busy < expected_busy {
        match tokio::time::timeout(WAIT, answers.next::<Down>()).await {
            Ok(Ok(Some(Down::Busy(_)))) => busy += 1,
            Ok(Ok(Some(other))) => panic!("unexpected answer {other:?}"),
            other => panic!("lane ended after {busy} busy answers: {other:?}"),
        }
        if busy % 1000 == 0 {
            peak_tasks = peak_tasks.max(testing::task_count(&e));
        }
    }
    let took = started.elapsed();
    assert!(
        peak_tasks < before + 32,
        "tasks grew from {before} to {peak_tasks}"
    );
    eprintln!(
        "{N} lane requests to an unread inbox: {busy} answered busy in {took:?}; tasks {before} -> at most {peak_tasks}"
    );
    let t = Instant::now();
    e.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_announcing_sixteen_mebibytes_cost_nothing_and_are_refused() {
    let e = endpoint(config()).await;
    let client = raw_client().await;
    let vm_before = status_kib("VmSize:");
    let mut connections = Vec::new();
    for _ in 0..50 {
        let mut connection = raw_connect(&client, e.local_addr()).await;
        let mut s = connection
            .open_bidirectional_stream()
            .await
            .expect("stream");
        // A length prefix claiming 16 MiB (minus a little), then nothing more.
        let mut prefix = BytesMut::new();
        prefix.put_u32(16 * 1024 * 1024 - 16);
        prefix.put_u8(aqe_core::plumbing::WIRE_VERSION);
        s.send(prefix.freeze()).await.expect("send");
        connections.push((connection, s));
    }
    for (connection, _) in &mut connections {
        assert_eq!(
            close_code(connection).await,
            Some(u64::from(close::PROTOCOL_VIOLATION)),
            "a hello above the limit is refused from its header"
        );
    }
    let grew_mib = status_kib("VmSize:").saturating_sub(vm_before) / 1024;
    // Reserving what the headers claim would take 800 MiB.
    assert!(grew_mib < 256, "address space grew by {grew_mib} MiB");
    assert_eq!(e.connections(), 0);
    eprintln!(
        "50 hellos announcing 16 MiB: refused from their headers; address space grew {grew_mib} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_cannot_hold_up_attach_detach_or_shutdown() {
    let e = endpoint(QuicConfig {
        send_timeout: Duration::from_secs(1),
        ..config()
    })
    .await;
    let raw = raw_join(e.local_addr(), &raw_hello(999, "127.0.0.1:9"), &[]).await;
    let mut connection = raw.connection;
    // The peer never reads its control stream again. Agents come and go with large
    // registrations: far more than the stream's flow-control window.
    let started = Instant::now();
    let mut inboxes = Vec::new();
    for i in 0..80 {
        let mut r = reg(&format!("big{i}"));
        r.metadata.insert("blob".into(), "x".repeat(60 * 1024));
        let (tx, rx) = aqe_core::plumbing::inbox(r.id.clone(), 8);
        e.attach(r, tx).await.expect("attach");
        inboxes.push(rx);
    }
    for i in 0..80 {
        e.detach(&format!("big{i}").into()).await.expect("detach");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "80 attaches and detaches took {took:?}"
    );
    // The connection is closed as unresponsive once a write waited for the send timeout.
    assert_eq!(
        close_code(&mut connection).await,
        Some(u64::from(close::UNRESPONSIVE))
    );
    let t = Instant::now();
    e.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    drop(raw.control);
    drop(raw.send);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_garbage_and_handshakes_leave_a_legitimate_client_served() {
    let e = endpoint(QuicConfig {
        connection_timeout: Duration::from_millis(1500),
        ..config()
    })
    .await;
    let echo_inbox = attach(&e, "echo").await;
    let _echo = tokio::spawn(async move {
        let mut inbox = echo_inbox;
        while let Some(item) = inbox.recv().await {
            if let aqe_core::Inbound::Request {
                envelope,
                responder,
            } = item
            {
                let reply = envelope.reply(
                    "echo".into(),
                    MessageKind::Response,
                    envelope.payload.clone(),
                );
                let _ = responder.respond(reply).await;
            }
        }
    });
    let l = endpoint(config()).await;
    let _il = attach(&l, "legit").await;
    l.connect(e.local_addr()).await.expect("legit connects");
    await_peer(&l, "echo").await;
    let request = || {
        let mut r = Envelope::new(
            "legit".into(),
            Recipient::Agent("echo".into()),
            "coordination".into(),
            MessageKind::Request,
            Bytes::from_static(b"ping"),
        );
        r.priority = Channel::coordination().priority;
        r
    };
    let sample = |n: usize| {
        let l = l.clone();
        async move {
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                l.request(request(), RequestOptions::default().timeout)
                    .await
                    .expect("answered");
                times.push(t.elapsed());
            }
            times.sort();
            (times[n / 2], times[n * 99 / 100])
        }
    };
    let (base_p50, base_p99) = sample(200).await;
    let rss_before = status_kib("VmRSS:");
    // Garbage: datagrams of random-looking bytes.
    let garbage = tokio::spawn({
        let to = e.local_addr();
        async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp");
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for i in 0..20_000u32 {
                let mut d = [0u8; 1200];
                for b in d.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                let _ = socket.send_to(&d[..200 + (i as usize % 1000)], to).await;
                if i % 500 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    });
    // Handshakes: 300 connections that never say hello.
    let handshakes = tokio::spawn({
        let to = e.local_addr();
        async move {
            let client = raw_client().await;
            let attempts = (0..300).map(|_| {
                let c = client.clone();
                async move {
                    let connect = c.connect(Connect::new(to).with_server_name("localhost"));
                    tokio::time::timeout(Duration::from_secs(3), connect).await
                }
            });
            let held = futures::future::join_all(attempts).await;
            let completed = held.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(held);
            completed
        }
    });
    let (flood_p50, flood_p99) = sample(200).await;
    garbage.await.expect("garbage");
    let completed = handshakes.await.expect("handshakes");
    let rss_grew = status_kib("VmRSS:").saturating_sub(rss_before) / 1024;
    eprintln!(
        "legit request/response p50/p99: {base_p50:?}/{base_p99:?} before, {flood_p50:?}/{flood_p99:?} under 20,000 garbage datagrams and 300 hello-less handshakes ({completed} completed); RSS grew {rss_grew} MiB"
    );
    assert!(
        flood_p99 < Duration::from_millis(500),
        "p99 {flood_p99:?} under flood"
    );
    assert!(rss_grew < 128, "RSS grew {rss_grew} MiB");
    // The hello-less connections are closed by the hello timeout: only the legit one stays.
    tokio::time::timeout(WAIT, async {
        while e.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("one connection left");
}
