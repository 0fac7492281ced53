//! A hostile peer, driven by hand over real QUIC on loopback. It cannot steer an endpoint
//! (its word about other endpoints is not taken, nor spread, unless it is authenticated; its
//! claimed key is checked against its certificate; claiming a live peer's address evicts
//! nobody), it cannot send as agents it did not announce, it cannot make an endpoint hold
//! more than its windows say or grow without bound, and not acknowledging does not keep its
//! senders waiting past their deadline. Every test is bounded in count and time.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aqe_core::{
    AgentId, Channel, DeliveryFailure, Envelope, Error, Event, MessageKind, Recipient,
    Registration, RequestOptions, SecurityFailure, Transport,
};
use aqe_quic::QuicConfig;
use aqe_quic::testing::{self, FrameCodec, FrameReader, Preamble, close};
use aqe_session::{EndpointId, Frame, Hello, Lane, Refusal, SESSION_VERSION, Transmit};
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

fn raw_hello(key: u64, listen: &str) -> Hello {
    Hello {
        version: SESSION_VERSION,
        endpoint: EndpointId::new(key, 1),
        nonce: 7,
        listen: Some(listen.parse().expect("addr")),
        token: None,
        window: 64,
        session_bytes: 1 << 20,
        heartbeat_ms: 500,
        liveness_ms: 30_000,
    }
}

/// Frames the session frame `f` as a QUIC stream carries it.
fn frame(f: Frame, buf: &mut BytesMut) {
    testing::frame_transmit(&Transmit::Frame(Lane::Control, f), buf).expect("frame");
}

/// A connection driven by hand, past its hello exchange.
struct Raw {
    _client: s2n_quic::Client,
    connection: s2n_quic::Connection,
    control: FrameReader,
    send: s2n_quic::stream::SendStream,
}

impl Raw {
    /// The next session frame on the control stream that `pick` accepts (others skipped).
    async fn expect<T>(&mut self, mut pick: impl FnMut(Frame) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let f: Frame = self
                    .control
                    .next()
                    .await
                    .expect("a frame")
                    .expect("the stream lives");
                if let Some(v) = pick(f) {
                    return v;
                }
            }
        })
        .await
        .expect("the frame in time")
    }

    /// Session frames on a new unidirectional stream of `preamble`.
    async fn open(
        &mut self,
        preamble: &Preamble,
        frames: Vec<Frame>,
    ) -> s2n_quic::stream::SendStream {
        let mut s = self.connection.open_send_stream().await.expect("stream");
        let mut buf = BytesMut::new();
        codec().encode(preamble, &mut buf).expect("preamble");
        for f in frames {
            frame(f, &mut buf);
        }
        s.send(buf.freeze()).await.expect("send");
        s
    }
}

/// Connects to `to`, sends `hello` then `after` on the control stream, reads the answer hello.
async fn raw_join(to: SocketAddr, hello: &Hello, after: Vec<Frame>) -> Raw {
    raw_join_on(raw_client().await, to, hello, after).await
}

/// As [`raw_join`], from `client` (one client may make many connections).
async fn raw_join_on(
    client: s2n_quic::Client,
    to: SocketAddr,
    hello: &Hello,
    after: Vec<Frame>,
) -> Raw {
    let mut connection = raw_connect(&client, to).await;
    let (recv, mut send) = connection
        .open_bidirectional_stream()
        .await
        .expect("control stream")
        .split();
    let mut first = BytesMut::new();
    codec().encode(hello, &mut first).expect("encode");
    for f in after {
        frame(f, &mut first);
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

fn snapshot(generation: u64, agents: Vec<Registration>) -> Frame {
    Frame::Snapshot {
        generation,
        part: 0,
        parts: 1,
        agents,
    }
}

fn direct(from: &str, to: &str) -> Envelope {
    let mut e = Envelope::new(
        from.into(),
        Recipient::Agent(to.into()),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from_static(b"x"),
    );
    e.priority = Channel::coordination().priority;
    e
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
                // No more streams: closed, but not with an application code (s2n-quic
                // answers so at once from then on: looping would never yield).
                Ok(None) => return None,
                Ok(Some(_)) => {}
            }
        }
    })
    .await
    .expect("closed in time")
}

/// Held by the tests that measure this process's memory or latency (or load it heavily),
/// so that no two of them overlap.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
async fn a_strangers_word_is_not_taken_not_spread_and_it_hears_of_nobody() {
    // e and f are token holders (authenticated to each other); the stranger is not.
    let fleet = || with_token(config(), Some("fleet"));
    let e = endpoint(fleet()).await;
    let _ie = attach(&e, "e").await;
    let f = endpoint(fleet()).await;
    let _if = attach(&f, "f").await;
    f.connect(e.local_addr()).await.expect("f to e");
    await_peer(&f, "e").await;
    // A stranger hosts an agent, claims a made-up listen address, and tells of an endpoint
    // somewhere else.
    let bait = Frame::Relay(aqe_session::Relayed::Endpoint {
        endpoint: EndpointId::new(777, 1),
        listen: "10.1.2.3:5555".parse().expect("addr"),
        generation: 1,
        agents: vec![reg("bait")],
    });
    let mut hello = raw_hello(12345, "10.9.8.7:4444");
    hello.token = Some("wrong".into());
    let refused = {
        let client = raw_client().await;
        let mut c = raw_connect(&client, e.local_addr()).await;
        let mut s = c.open_bidirectional_stream().await.expect("stream");
        s.send(codec().encode_to_bytes(&hello).expect("encode"))
            .await
            .expect("send");
        close_code(&mut c).await
    };
    assert_eq!(
        refused,
        Some(u64::from(close::TOKEN_REJECTED)),
        "a wrong token is refused"
    );
    // Without a token the endpoint's token authentication refuses it too: strangers talk to
    // endpoints that do not ask for one.
    let open = endpoint(config()).await;
    let _io = attach(&open, "open").await;
    let g = endpoint(config()).await;
    let _ig = attach(&g, "g").await;
    g.connect(open.local_addr()).await.expect("g to open");
    await_peer(&g, "open").await;
    let mut raw = raw_join(
        open.local_addr(),
        &raw_hello(12345, "10.9.8.7:4444"),
        vec![snapshot(1, vec![reg("stranger")]), bait],
    )
    .await;
    await_peer(&open, "stranger").await;
    let stranger = open
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
    // Nothing the stranger says goes further, and it hears nothing of the others.
    let heard = tokio::time::timeout(Duration::from_millis(600), async {
        loop {
            match raw.control.next::<Frame>().await {
                Ok(Some(Frame::Relay(r))) => return Some(r),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    })
    .await;
    assert!(
        !matches!(heard, Ok(Some(_))),
        "a stranger was told of other endpoints: {heard:?}"
    );
    for t in [&open, &g] {
        assert!(
            t.peers().iter().all(|p| p.id.as_str() != "bait"),
            "the stranger's word about another endpoint was taken"
        );
    }
    assert!(
        g.peers().iter().all(|p| p.id.as_str() != "stranger"),
        "a stranger's agents were relayed"
    );
    assert_eq!(
        (open.connections(), g.connections()),
        (2, 1),
        "nobody dialed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_certificate_does_not_give_is_refused() {
    let (server_tls, _, real_key) = testing::dev_tls().await;
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
        let theirs: Hello = reader.next().await.expect("hello").expect("hello");
        // Claims a key other than the one its certificate gives.
        let mut claim = raw_hello(real_key ^ 0xdead, &addr.to_string());
        claim.nonce = theirs.nonce;
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
async fn claiming_a_live_peers_address_and_agents_evicts_nobody_and_captures_nothing() {
    let s = endpoint(config()).await;
    let _is = attach(&s, "s").await;
    let v = endpoint(config()).await;
    let mut iv = attach(&v, "v").await;
    s.connect(v.local_addr()).await.expect("s to v");
    await_peer(&s, "v").await;
    let mut events = s.subscribe();
    // Another key announces v's listen port from the same IP, and v's agent.
    let mut impostor = raw_join(
        s.local_addr(),
        &raw_hello(0xbad, &v.local_addr().to_string()),
        vec![snapshot(1, vec![reg("v")])],
    )
    .await;
    let claimed_by = await_event(&mut events, |e| match e {
        Event::AgentConflict { agent, claimed_by } if agent.as_str() == "v" => {
            Some(claimed_by.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(claimed_by, v.local_addr().into(), "the claim is reported");
    assert_eq!(
        s.connections(),
        2,
        "v's session lives on beside the impostor's"
    );
    // What is sent to v goes to v, and the impostor receives nothing meant for it.
    let taker = tokio::spawn(async move {
        for _ in 0..20 {
            let got = next_message(&mut iv).await;
            assert_eq!(got.from.as_str(), "s");
        }
    });
    for _ in 0..20 {
        s.send_confirmed(direct("s", "v"))
            .await
            .expect("taken by v");
    }
    taker.await.expect("v took them all");
    let stolen = tokio::time::timeout(Duration::from_millis(500), async {
        let mut data = impostor.connection.accept_receive_stream().await.ok()??;
        data.receive().await.ok()?
    })
    .await;
    assert!(!matches!(stolen, Ok(Some(_))), "the impostor received data");
    let _ = impostor.send.finish();
}

/// A raw peer of the endpoint at `to` (its hello's nonce `nonce`) that announced one agent,
/// `mine`.
async fn announcing_mine(to: SocketAddr, nonce: u64) -> Raw {
    raw_join(
        to,
        &raw_hello(nonce, "127.0.0.1:9"),
        vec![snapshot(1, vec![reg("mine")])],
    )
    .await
}

/// Reliable message `seq` from `from` to the agent `e`, its sender's oldest unsettled being
/// `low`.
fn message_to_e(seq: u64, low: u64, from: &str) -> Frame {
    Frame::Message {
        seq,
        after: 0,
        low,
        generation: 1,
        confirm: false,
        envelope: direct(from, "e"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sends_only_as_agents_it_announced() {
    let e = endpoint(config()).await;
    let mut ie = attach(&e, "e").await;
    let mut raw = announcing_mine(e.local_addr(), 4242).await;
    let message = |seq, from: &str| message_to_e(seq, 1, from);
    let _s = raw
        .open(
            &Preamble::Channel("coordination".into()),
            vec![message(1, "not-mine"), message(2, "mine")],
        )
        .await;
    let refused = raw
        .expect(|f| match f {
            Frame::Refused { seqs, reason } => Some((seqs, reason)),
            _ => None,
        })
        .await;
    assert_eq!(refused, (vec![(1, 1)], Refusal::NotRegistered));
    let got = next_message(&mut ie).await;
    assert_eq!(
        got.from.as_str(),
        "mine",
        "only its own agent's message arrives"
    );
}

/// A receiver remembers the fate of every message numbered above its sender's `low`: a
/// message numbered a span (2^20) or more above its own `low` would let a sender that never
/// raises `low` grow that without bound. It closes the connection (0x5); one just below is
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_numbered_a_span_above_its_low_closes_the_connection() {
    let e = endpoint(config()).await;
    let mut ie = attach(&e, "e").await;
    let mut raw = announcing_mine(e.local_addr(), 4343).await;
    let span = aqe_session::MAX_RANGE_SPAN;
    let message = |seq, low| message_to_e(seq, low, "mine");
    let _s = raw.open(&Preamble::Unordered, vec![message(span, 1)]).await;
    let got = next_message(&mut ie).await;
    assert_eq!(
        got.from.as_str(),
        "mine",
        "one just below the span is taken"
    );
    let _t = raw
        .open(&Preamble::Unordered, vec![message(span + 1, 1)])
        .await;
    assert_eq!(
        close_code(&mut raw.connection).await,
        Some(u64::from(close::PROTOCOL_VIOLATION)),
        "a message a span above its low closes the connection"
    );
}

/// A `Fanout` from a raw peer is taken as one message per copy, each addressed to its
/// agent whatever the envelope says; one of more copies than allowed closes the connection
/// (0x5), as does a copy numbered 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_reaches_each_copys_agent_and_one_too_large_closes_the_connection() {
    let e = endpoint(config()).await;
    let mut ie = attach(&e, "e").await;
    let mut if2 = attach(&e, "f").await;
    let fanout = |copies: Vec<(u64, &str)>| {
        // The envelope names someone else: a receiver reads each copy's agent instead.
        let mut envelope = direct("mine", "nobody");
        envelope.kind = aqe_core::MessageKind::Broadcast;
        Frame::Fanout {
            low: 1,
            generation: 1,
            confirm: false,
            copies: copies
                .into_iter()
                .map(|(seq, to)| aqe_session::FanoutCopy {
                    seq,
                    after: 0,
                    to: to.into(),
                })
                .collect(),
            envelope,
        }
    };
    for (nonce, bad) in [
        (
            4444,
            fanout(
                (1..=aqe_session::MAX_FANOUT as u64 + 1)
                    .map(|seq| (seq, "e"))
                    .collect(),
            ),
        ),
        (4445, fanout(vec![(1, "e"), (0, "f")])),
    ] {
        let mut raw = announcing_mine(e.local_addr(), nonce).await;
        let _s = raw
            .open(
                &Preamble::Unordered,
                vec![fanout(vec![(1, "e"), (2, "f")]), bad],
            )
            .await;
        for (inbox, name) in [(&mut ie, "e"), (&mut if2, "f")] {
            let got = next_message(inbox).await;
            assert_eq!(
                (got.from.as_str(), got.to.clone()),
                ("mine", aqe_core::Recipient::Agent(name.into()))
            );
        }
        assert_eq!(
            close_code(&mut raw.connection).await,
            Some(u64::from(close::PROTOCOL_VIOLATION)),
            "a fanout breaking a rule closes the connection"
        );
    }
}

/// Waits until `e` holds nothing for its peers any more.
async fn all_given_back(e: &aqe_quic::QuicTransport) {
    tokio::time::timeout(WAIT, async {
        while e.held_bytes() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every byte given back");
}

/// Sends a heartbeat with `nonce` on `raw` and waits for its pong: the connection serves.
async fn heartbeat_answered(raw: &mut Raw, nonce: u64, generation: u64) {
    let mut ping = BytesMut::new();
    frame(
        Frame::Ping {
            nonce,
            generation,
            low: 1,
        },
        &mut ping,
    );
    raw.send.send(ping.freeze()).await.expect("ping");
    raw.expect(|f| matches!(f, Frame::Pong { nonce: n } if n == nonce).then_some(()))
        .await;
}

/// Opens `streams` `Large` streams on `raw`, each starting a frame that claims `claim`
/// bytes and sending `part` of them, never the rest: the first is `kind` (a frame variant).
async fn partial_frames(
    raw: &mut Raw,
    streams: usize,
    claim: u32,
    part: usize,
    kind: u8,
) -> Vec<s2n_quic::stream::SendStream> {
    let mut open = Vec::new();
    for _ in 0..streams {
        let Ok(mut s) = raw.connection.open_send_stream().await else {
            break;
        };
        let mut buf = BytesMut::new();
        codec()
            .encode(&Preamble::Large, &mut buf)
            .expect("preamble");
        buf.put_u32(claim);
        buf.put_u8(testing::WIRE_VERSION);
        buf.put_u8(kind);
        buf.put_bytes(0, part - 1);
        if s.send(buf.freeze()).await.is_err() {
            break;
        }
        open.push(s);
    }
    open
}

/// The variant of a `Message` frame, and of a `Request` (PROTOCOL.md's `enum Frame`).
const MESSAGE: u8 = 7;
const REQUEST: u8 = 11;

/// Partial frames are bounded: one connection's lanes hold at most what the session's
/// windows allow (beyond, 0x5), and all of them at most the endpoint's budget (beyond, the
/// connection whose frame did not fit is closed with 0xb). Large requests are not within the
/// windows: only the endpoint's budget bounds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_frames_are_bounded_per_connection_and_per_endpoint() {
    let _heavy = HEAVY.lock().await;
    let claim = 1 << 20;
    // Per connection: sessionBytes 256 KiB allows about 2.3 MiB of partial frames.
    let mut small = config();
    small.limits.session_bytes = 256 << 10;
    let e = endpoint(small).await;
    let mut raw = raw_join(e.local_addr(), &raw_hello(5151, "127.0.0.1:9"), vec![]).await;
    let _held = partial_frames(&mut raw, 8, claim, 512 << 10, MESSAGE).await;
    assert_eq!(
        close_code(&mut raw.connection).await,
        Some(u64::from(close::PROTOCOL_VIOLATION)),
        "4 MiB of partial frames on one connection close it"
    );
    // Within the connection's bound, but past the endpoint's budget of 1 MiB.
    let mut tight = config();
    tight.limits.endpoint_bytes = 1 << 20;
    let e2 = endpoint(tight).await;
    let mut raw = raw_join(e2.local_addr(), &raw_hello(5252, "127.0.0.1:9"), vec![]).await;
    let _held = partial_frames(&mut raw, 4, claim, 512 << 10, MESSAGE).await;
    assert_eq!(
        close_code(&mut raw.connection).await,
        Some(u64::from(close::OVERLOADED)),
        "2 MiB of partial frames past a 1 MiB endpoint budget"
    );
    // Large requests past what the windows allow, within the endpoint's budget: held, and
    // the connection still serves; past the budget, 0xb.
    let mut small = config();
    small.limits.session_bytes = 256 << 10;
    let e3 = endpoint(small).await;
    let mut raw = raw_join(e3.local_addr(), &raw_hello(5454, "127.0.0.1:9"), vec![]).await;
    let _held = partial_frames(&mut raw, 8, claim, 512 << 10, REQUEST).await;
    tokio::time::timeout(WAIT, async {
        while e3.held_bytes() < 8 * u64::from(claim) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("8 MiB of partial requests held");
    heartbeat_answered(&mut raw, 4, 0).await;
    let mut raw = raw_join(e2.local_addr(), &raw_hello(5555, "127.0.0.1:9"), vec![]).await;
    let _held = partial_frames(&mut raw, 4, claim, 512 << 10, REQUEST).await;
    assert_eq!(
        close_code(&mut raw.connection).await,
        Some(u64::from(close::OVERLOADED)),
        "2 MiB of partial requests past a 1 MiB endpoint budget"
    );
    // What the closed connections held was given back: a new peer is served.
    let mut again = raw_join(e2.local_addr(), &raw_hello(5353, "127.0.0.1:9"), vec![]).await;
    heartbeat_answered(&mut again, 5, 0).await;
    all_given_back(&e2).await;
}

/// Fifty connections each pushing 1 MiB of partial frames into an endpoint whose budget is
/// 16 MiB: the endpoint holds no more than its budget, closes the connections whose frames
/// did not fit with 0xb, and its memory grows by less than the README's bound (the budget
/// plus, per connection, its QUIC window and state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_hostile_connections_stay_within_the_stated_memory() {
    let _heavy = HEAVY.lock().await;
    const CONNECTIONS: u64 = 50;
    let mut c = config();
    c.limits.endpoint_bytes = 16 << 20;
    // The raw peers answer no heartbeat: they must not be dropped as silent meanwhile.
    c.liveness_timeout = Duration::from_secs(60);
    let window_mib = u64::from(c.limits.connection_window) >> 20;
    let e = endpoint(c).await;
    let rss_before = status_kib("VmRSS:");
    let client = raw_client().await;
    let attempts = (0..CONNECTIONS).map(|i| {
        let (client, to) = (client.clone(), e.local_addr());
        async move {
            let mut raw =
                raw_join_on(client, to, &raw_hello(6000 + i, "127.0.0.1:9"), vec![]).await;
            let held = partial_frames(&mut raw, 1, 1 << 20, 1000 << 10, MESSAGE).await;
            (raw, held)
        }
    });
    // A few handshakes at a time: a debug build on two cores is slow at TLS.
    let mut raws: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter(attempts),
        8,
    ))
    .await;
    // Until every byte sent was taken or its connection closed: held stops changing.
    let mut last = u64::MAX;
    tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = e.held_bytes();
            if now == last {
                return;
            }
            last = now;
        }
    })
    .await
    .expect("settles");
    let held_mib = e.held_bytes() >> 20;
    let rss_grew = status_kib("VmRSS:").saturating_sub(rss_before) / 1024;
    let mut overloaded = 0;
    for (raw, _) in &mut raws {
        if tokio::time::timeout(Duration::from_millis(10), raw.connection.accept())
            .await
            .is_ok_and(|r| {
                matches!(r, Err(s2n_quic::connection::Error::Application { error, .. })
                    if u64::from(error) == u64::from(close::OVERLOADED))
            })
        {
            overloaded += 1;
        }
    }
    // Both sides run in this process: the hostile client's memory counts too.
    let bound = 16 + CONNECTIONS * (window_mib + 1);
    eprintln!(
        "{CONNECTIONS} hostile connections pushing {CONNECTIONS} MiB of partial frames: the endpoint holds {held_mib} MiB of its 16 MiB budget, {overloaded} closed with 0xb; RSS grew {rss_grew} MiB (bound {bound} MiB)"
    );
    assert!(held_mib <= 16, "held {held_mib} MiB");
    assert!(
        overloaded >= 30,
        "connections past the budget are closed: {overloaded}"
    );
    assert!(rss_grew < bound, "RSS grew {rss_grew} MiB, bound {bound}");
    drop(raws);
    all_given_back(&e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_an_agents_window_refuses_those_messages_not_the_connection() {
    let window = 8;
    let e = endpoint(QuicConfig { window, ..config() }).await;
    // An agent whose inbox nobody reads.
    let (tx, _never_read) = aqe_core::plumbing::inbox(AgentId::from("sink"), 4);
    e.attach(reg("sink"), tx).await.expect("attach");
    let mut raw = raw_join(
        e.local_addr(),
        &raw_hello(4343, "127.0.0.1:9"),
        vec![snapshot(1, vec![reg("flooder")])],
    )
    .await;
    let frames = (1..=20)
        .map(|seq| Frame::Message {
            seq,
            after: 0,
            low: 1,
            generation: 1,
            confirm: false,
            envelope: direct("flooder", "sink"),
        })
        .collect();
    let _s = raw.open(&Preamble::Unordered, frames).await;
    let refused = raw
        .expect(|f| match f {
            Frame::Refused {
                seqs,
                reason: Refusal::Overflow,
            } => Some(seqs),
            _ => None,
        })
        .await;
    assert_eq!(
        refused,
        vec![(u64::from(window) + 1, 20)],
        "the excess is refused"
    );
    // The connection lives: a heartbeat is answered.
    heartbeat_answered(&mut raw, 99, 1).await;
    assert_eq!(e.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_acknowledges_fails_its_senders_at_the_deadline() {
    let deadline = Duration::from_millis(800);
    let e = endpoint(QuicConfig {
        delivery_deadline: deadline,
        ..config()
    })
    .await;
    let _ie = attach(&e, "e").await;
    let mut events = e.subscribe();
    let _raw = raw_join(
        e.local_addr(),
        &raw_hello(4444, "127.0.0.1:9"),
        vec![snapshot(1, vec![reg("silent")])],
    )
    .await;
    await_peer(&e, "silent").await;
    let started = Instant::now();
    let err = e
        .send_confirmed(direct("e", "silent"))
        .await
        .expect_err("never acknowledged");
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            Error::DeliveryFailed {
                reason: DeliveryFailure::Unconfirmed,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        took >= deadline && took < deadline + Duration::from_millis(500),
        "reported after {took:?}, the deadline being {deadline:?}"
    );
    let reported = await_event(&mut events, |e| match e {
        Event::DeliveryFailed { to, reason, .. } if to.as_str() == "silent" => Some(*reason),
        _ => None,
    })
    .await;
    assert_eq!(reported, DeliveryFailure::Unconfirmed);
    assert_eq!(e.connections(), 1, "while its connection lives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_requests_to_a_full_inbox_stay_bounded_and_get_busy() {
    let _heavy = HEAVY.lock().await;
    const N: u64 = 20_000;
    let e = endpoint(config()).await;
    // An agent whose inbox nobody reads.
    let (tx, _never_read) = aqe_core::plumbing::inbox(AgentId::from("sink"), 16);
    e.attach(reg("sink"), tx).await.expect("attach");
    let before = testing::task_count(&e);
    let mut raw = raw_join(
        e.local_addr(),
        &raw_hello(54321, "127.0.0.1:9"),
        vec![snapshot(1, vec![reg("flooder")])],
    )
    .await;
    let requests = (0..N)
        .map(|_| {
            let mut r = direct("flooder", "sink");
            r.kind = MessageKind::Request;
            Frame::Request {
                generation: 1,
                envelope: r,
            }
        })
        .collect();
    let started = Instant::now();
    let _s = raw.open(&Preamble::Requests, requests).await;
    let answers = raw
        .connection
        .accept_receive_stream()
        .await
        .expect("answers")
        .expect("answers");
    let mut reader = FrameReader::new(answers, codec());
    let preamble: Preamble = reader.next().await.expect("preamble").expect("preamble");
    assert_eq!(preamble, Preamble::Answers);
    let mut busy = 0u64;
    let mut peak_tasks = 0;
    // Everything beyond what the responder holds is answered busy at once.
    let expected_busy = N - u64::from(QuicConfig::default().limits.requests_in_hand);
    while busy < expected_busy {
        match tokio::time::timeout(WAIT, reader.next::<Frame>()).await {
            Ok(Ok(Some(Frame::NoAnswer {
                reason: Refusal::Overflow,
                ..
            }))) => busy += 1,
            other => panic!("answers ended after {busy} busy: {other:?}"),
        }
        if busy.is_multiple_of(1000) {
            peak_tasks = peak_tasks.max(testing::task_count(&e));
        }
    }
    let took = started.elapsed();
    assert!(
        peak_tasks < before + 32,
        "tasks grew from {before} to {peak_tasks}"
    );
    eprintln!(
        "{N} requests to an unread inbox: {busy} answered busy in {took:?}; tasks {before} -> at most {peak_tasks}"
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
    let _heavy = HEAVY.lock().await;
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
        prefix.put_u8(testing::WIRE_VERSION);
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
    let raw = raw_join(e.local_addr(), &raw_hello(999, "127.0.0.1:9"), vec![]).await;
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
    let _heavy = HEAVY.lock().await;
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
        let mut r = direct("legit", "echo");
        r.kind = MessageKind::Request;
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
