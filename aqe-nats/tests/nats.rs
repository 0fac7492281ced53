//! What the NATS transport does beyond the conformance suite, against real `nats-server`
//! processes: a server restart in the middle of traffic, an endpoint killed with SIGKILL,
//! members of the account that misbehave, the server's payload limit, credentials and TLS.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use aqe_core::plumbing::{Inbox, inbox};
use aqe_core::{
    AgentId, Channel, DeliveryFailure, Envelope, Error, Event, Inbound, MessageKind, Recipient,
    Registration, Token, Transport,
};
use aqe_nats::testing::{NatsServer, forge};
use aqe_nats::{NatsConfig, NatsTls, NatsTransport};
use aqe_session::{EndpointId, Frame, Hello, SESSION_VERSION};
use futures::StreamExt as _;

const WAIT: Duration = Duration::from_secs(20);

fn config(url: &str, fleet: &str) -> NatsConfig {
    NatsConfig {
        servers: vec![url.to_owned()],
        fleet: fleet.to_owned(),
        heartbeat_interval: Duration::from_millis(200),
        liveness_timeout: Duration::from_millis(1000),
        retransmit_after: Duration::from_millis(200),
        ..NatsConfig::default()
    }
}

fn fleet() -> String {
    format!("t{}", aqe_core::MessageId::next())
}

async fn connect(config: NatsConfig) -> NatsTransport {
    NatsTransport::connect(config).await.expect("connect")
}

async fn server() -> NatsServer {
    tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("server")
}

async fn attach(t: &NatsTransport, id: &str) -> Inbox {
    let (tx, rx) = inbox(AgentId::from(id), 8192);
    let reg = Registration::new(id, "test")
        .with_channel(Channel::coordination())
        .with_channel(Channel::results().with_max_message_size(8 * 1024 * 1024))
        .with_channel(Channel::metrics());
    t.attach(reg, tx).await.expect("attach");
    rx
}

async fn await_peer(t: &NatsTransport, id: &str) {
    tokio::time::timeout(WAIT, async {
        while !t.peers().iter().any(|p| p.id.as_str() == id) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} never discovered"));
}

fn direct(from: &str, to: &str, channel: &str, payload: impl Into<Bytes>) -> Envelope {
    let mut e = Envelope::new(
        from.into(),
        Recipient::Agent(to.into()),
        channel.into(),
        MessageKind::Direct,
        payload.into(),
    );
    if let Some(c) = Channel::preset(channel) {
        e.priority = c.priority;
    }
    e
}

fn counter(i: u32) -> Bytes {
    Bytes::copy_from_slice(&i.to_be_bytes())
}

fn read_counter(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_in_the_middle_of_traffic_loses_nothing() {
    let mut server = server().await;
    let (url, fleet) = (server.url(), fleet());
    let a = connect(config(&url, &fleet)).await;
    let b = connect(config(&url, &fleet)).await;
    let _ia = attach(&a, "a").await;
    let mut ib = attach(&b, "b").await;
    await_peer(&a, "b").await;
    await_peer(&b, "a").await;
    let mut events = a.subscribe();
    const N: u32 = 3000;
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let channel = if i % 2 == 0 {
                    "coordination"
                } else {
                    "results"
                };
                a.send(direct("a", "b", channel, counter(i)))
                    .await
                    .unwrap_or_else(|e| panic!("send {i}: {e}"));
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Restart the server once a third has arrived.
    let mut ordered = Vec::new();
    let mut unordered = HashSet::new();
    let mut restarted = false;
    while ordered.len() + unordered.len() < N as usize {
        let item = tokio::time::timeout(WAIT, ib.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled after {} ordered and {} unordered",
                    ordered.len(),
                    unordered.len()
                )
            });
        let Some(Inbound::Message { envelope, .. }) = item else {
            panic!("expected a message");
        };
        let i = read_counter(&envelope.payload);
        if envelope.channel.as_str() == "coordination" {
            ordered.push(i);
        } else {
            assert!(unordered.insert(i), "duplicate {i}");
        }
        if !restarted && ordered.len() + unordered.len() >= N as usize / 3 {
            restarted = true;
            server = tokio::task::spawn_blocking(move || {
                server.restart().expect("restart");
                server
            })
            .await
            .expect("restart");
        }
    }
    sender.await.expect("sender");
    let expected: Vec<u32> = (0..N).filter(|i| i % 2 == 0).collect();
    assert_eq!(
        ordered, expected,
        "ordered channel: every message once, in order"
    );
    assert_eq!(unordered.len(), N as usize / 2);
    // Everything was confirmed; nothing failed.
    tokio::time::timeout(WAIT, async {
        while a.stats(&"a".into()).messages_unconfirmed > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every message confirmed");
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        match e {
            Event::DeliveryFailed { ids, reason, .. } => {
                seen.push(format!("{} failed: {reason:?}", ids.len()))
            }
            Event::PeerDiscovered(_) => {}
            e => seen.push(format!("{e:?}")),
        }
    }
    assert_eq!(a.stats(&"a".into()).messages_failed, 0, "{seen:#?}");
    a.shutdown().await;
    b.shutdown().await;
    drop(server);
}

/// The child side of the SIGKILL test: an endpoint whose agent never reads its inbox.
#[tokio::test]
#[ignore = "run by a_killed_endpoint_is_detected_and_everything_sent_to_it_accounted_for"]
async fn child_endpoint_that_never_reads() {
    let (Ok(url), Ok(fleet)) = (
        std::env::var("AQE_NATS_CHILD_URL"),
        std::env::var("AQE_NATS_CHILD_FLEET"),
    ) else {
        return;
    };
    let t = NatsTransport::connect(config(&url, &fleet))
        .await
        .expect("child connects");
    let _inbox = attach(&t, "victim").await;
    println!("ready");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_detected_and_everything_sent_to_it_accounted_for() {
    let server = server().await;
    let (url, fleet) = (server.url(), fleet());
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_endpoint_that_never_reads",
            "--ignored",
            "--nocapture",
        ])
        .env("AQE_NATS_CHILD_URL", &url)
        .env("AQE_NATS_CHILD_FLEET", &fleet)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("child");
    let quick = NatsConfig {
        delivery_deadline: Duration::from_secs(2),
        ..config(&url, &fleet)
    };
    let a = NatsTransport::connect(quick).await.expect("a");
    let _ia = attach(&a, "a").await;
    await_peer(&a, "victim").await;
    let mut events = a.subscribe();
    let mut sent = Vec::new();
    for i in 0..50 {
        let e = direct("a", "victim", "coordination", counter(i));
        sent.push(e.id);
        a.send(e).await.expect("send");
    }
    // Let them reach the victim's endpoint (received, never taken).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let request = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut r = direct("a", "victim", "coordination", Bytes::new());
            r.kind = MessageKind::Request;
            let started = tokio::time::Instant::now();
            (
                a.request(r, Duration::from_secs(30)).await,
                started.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.start_kill().expect("SIGKILL");
    let killed_at = tokio::time::Instant::now();
    let (outcome, _) = request.await.expect("join");
    let detected = killed_at.elapsed();
    eprintln!("SIGKILLed endpoint detected after {detected:?} (liveness timeout 1 s)");
    assert!(
        matches!(outcome, Err(Error::ConnectionLost { .. })),
        "a request to a dead endpoint fails as unreachable, not after its timeout: {outcome:?}"
    );
    assert!(
        detected < Duration::from_secs(3),
        "detected after {detected:?} with a 1 s liveness timeout"
    );
    let mut failed = Vec::new();
    let mut left = false;
    tokio::time::timeout(WAIT, async {
        while failed.len() < sent.len() || !left {
            match events.recv().await {
                Ok(Event::DeliveryFailed { ids, reason, .. }) => {
                    assert_eq!(
                        reason,
                        DeliveryFailure::Unconfirmed,
                        "received, never taken"
                    );
                    failed.extend(ids);
                }
                Ok(Event::PeerLeft(id)) if id.as_str() == "victim" => left = true,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("the failures are reported (after the delivery deadline)");
    failed.sort();
    sent.sort();
    assert_eq!(
        failed, sent,
        "every message sent to the dead endpoint is reported"
    );
    let s = a.stats(&"a".into());
    assert_eq!((s.messages_failed, s.messages_unconfirmed), (50, 0));
    assert!(matches!(
        a.send(direct("a", "victim", "coordination", Bytes::new()))
            .await,
        Err(Error::PeerNotFound { .. })
    ));
    a.shutdown().await;
}

/// Any member of the NATS account can publish on a fleet's subjects: garbage, heartbeats of
/// endpoints that do not exist, a handshake of its own announcing too many agents and
/// another endpoint's agent id, acknowledgements and answers for sessions it is not part of.
/// None of it breaks, steers or grows the endpoint beyond its limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_the_account_that_misbehave_cannot_break_or_steer_an_endpoint() {
    let server = server().await;
    let (url, fleet) = (server.url(), fleet());
    let mut limited = config(&url, &fleet);
    limited.limits.endpoints = 16;
    limited.limits.agents_per_endpoint = 8;
    let a = NatsTransport::connect(limited).await.expect("a");
    let b = connect(config(&url, &fleet)).await;
    let _ia = attach(&a, "a").await;
    let mut ib = attach(&b, "b").await;
    await_peer(&a, "b").await;
    let subjects = forge::Subjects::new(&fleet);
    let raw = async_nats::connect(&url).await.expect("raw client");
    // Garbage on every subject of the fleet.
    for subject in [subjects.presence(), subjects.endpoint(a.endpoint())] {
        for i in 0..500u32 {
            let junk: Vec<u8> = (0..(i % 64)).map(|j| (i * 31 + j * 7) as u8).collect();
            raw.publish(subject.clone(), junk.into())
                .await
                .expect("publish");
        }
    }
    // Heartbeats of 2000 made-up endpoints: a greets a bounded number of them.
    for k in 0..2000u64 {
        let alive = forge::Packet::Alive {
            from: EndpointId::new(1_000_000 + k, 1),
            generation: 0,
        };
        raw.publish(subjects.presence(), forge::packet(&alive))
            .await
            .expect("publish");
    }
    // A made-up endpoint shakes hands (any member of the account can), then announces more
    // agents than allowed, one of them b's id.
    let fake = EndpointId::new(42, 1);
    let mut replies = raw
        .subscribe(subjects.endpoint(fake))
        .await
        .expect("subscribe");
    let hello = Hello {
        version: SESSION_VERSION,
        endpoint: fake,
        nonce: 7,
        listen: None,
        token: None,
        window: 64,
        session_bytes: 1 << 20,
        heartbeat_ms: 200,
        liveness_ms: 60_000,
    };
    raw.publish(
        subjects.endpoint(a.endpoint()),
        forge::packet(&forge::Packet::Hello {
            to: a.endpoint(),
            reply: false,
            hello,
        }),
    )
    .await
    .expect("publish");
    tokio::time::timeout(WAIT, async {
        while let Some(m) = replies.next().await {
            if let Ok((
                forge::Packet::Hello {
                    reply: true, hello, ..
                },
                _,
            )) = forge::decode(&m.payload)
                && hello.nonce == 7
            {
                return;
            }
        }
    })
    .await
    .expect("a answers the handshake");
    let mut announcements: Vec<Frame> = (1..=50u64)
        .map(|g| Frame::Joined {
            generation: g,
            agent: Registration::new(format!("fake-{g}"), "fake"),
        })
        .collect();
    announcements.insert(
        0,
        Frame::Joined {
            generation: 1,
            agent: Registration::new("b", "impostor"),
        },
    );
    raw.publish(
        subjects.endpoint(a.endpoint()),
        forge::frames(fake, a.endpoint(), 7, &announcements),
    )
    .await
    .expect("publish");
    raw.flush().await.expect("flush");
    // Forged confirmations of a real message: from the made-up endpoint's session, and in
    // b's name for a session that does not exist.
    let e = direct("a", "b", "coordination", Bytes::from_static(b"real"));
    let confirmed = {
        let a = a.clone();
        tokio::spawn(async move { a.send_confirmed(e).await })
    };
    let acks = [Frame::Acks {
        received: vec![(1, 10)],
        taken: vec![(1, 10)],
    }];
    for (from, session) in [(fake, 7), (b.endpoint(), 12345)] {
        raw.publish(
            subjects.endpoint(a.endpoint()),
            forge::frames(from, a.endpoint(), session, &acks),
        )
        .await
        .expect("publish");
    }
    raw.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !confirmed.is_finished(),
        "a confirmation from an endpoint the message did not go to is ignored"
    );
    let Some(Inbound::Message { envelope, receipt }) = tokio::time::timeout(WAIT, ib.recv())
        .await
        .expect("message")
    else {
        panic!("expected the real message")
    };
    assert_eq!(&envelope.payload[..], b"real");
    drop(receipt);
    confirmed
        .await
        .expect("join")
        .expect("confirmed by its real receiver");
    // Bounded, and still serving.
    assert!(a.endpoints() <= 16, "{} endpoints tracked", a.endpoints());
    let fakes = a
        .peers()
        .iter()
        .filter(|p| p.id.as_str().starts_with("fake-"))
        .count();
    assert!(fakes <= 8, "{fakes} agents of one endpoint");
    let owner = a
        .peers()
        .into_iter()
        .find(|p| p.id.as_str() == "b")
        .expect("b");
    assert_eq!(
        owner.agent_type.as_str(),
        "test",
        "the first owner keeps the id"
    );
    let mut r = direct("a", "b", "coordination", Bytes::from_static(b"ping"));
    r.kind = MessageKind::Request;
    let answer = {
        let a = a.clone();
        tokio::spawn(async move { a.request(r, Duration::from_secs(5)).await })
    };
    let Some(Inbound::Request {
        envelope,
        responder,
    }) = tokio::time::timeout(WAIT, ib.recv())
        .await
        .expect("request")
    else {
        panic!("expected the request")
    };
    let forged = envelope.reply(
        "b".into(),
        MessageKind::Response,
        Bytes::from_static(b"forged"),
    );
    for (from, session) in [(fake, 7), (b.endpoint(), 12345)] {
        raw.publish(
            subjects.endpoint(a.endpoint()),
            forge::frames(
                from,
                a.endpoint(),
                session,
                &[Frame::Response {
                    envelope: forged.clone(),
                }],
            ),
        )
        .await
        .expect("publish");
    }
    raw.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    responder
        .respond(envelope.reply(
            "b".into(),
            MessageKind::Response,
            Bytes::from_static(b"pong"),
        ))
        .await
        .expect("respond");
    let got = answer.await.expect("join").expect("answer");
    assert_eq!(&got.payload[..], b"pong", "only the real responder answers");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_servers_payload_limit_is_refused_and_nothing_is_lost() {
    let server = NatsServer::shared();
    let (url, fleet) = (server.url(), fleet());
    let a = connect(config(&url, &fleet)).await;
    let b = connect(config(&url, &fleet)).await;
    let _ia = attach(&a, "a").await;
    let mut ib = attach(&b, "b").await;
    await_peer(&a, "b").await;
    let err = a
        .send(direct("a", "b", "results", vec![0u8; 2 * 1024 * 1024]))
        .await
        .expect_err("above the server's 1 MiB");
    match err {
        Error::MessageTooLarge { size, max } => {
            assert_eq!(size, 2 * 1024 * 1024);
            assert!(max < 1024 * 1024 && max > 1000 * 1024, "max {max}");
        }
        e => panic!("{e}"),
    }
    a.send(direct("a", "b", "results", vec![1u8; 512 * 1024]))
        .await
        .expect("below the limit");
    let Some(Inbound::Message { envelope, .. }) = tokio::time::timeout(WAIT, ib.recv())
        .await
        .expect("message")
    else {
        panic!("expected a message")
    };
    assert_eq!(envelope.payload.len(), 512 * 1024);
    let s = a.stats(&"a".into());
    assert_eq!(s.messages_failed, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_by_the_server() {
    let server = tokio::task::spawn_blocking(|| {
        NatsServer::start_with(&["--user", "fleet", "--pass", "s3cret"]).expect("server")
    })
    .await
    .expect("server");
    let fleet = fleet();
    let mut wrong = config(&server.url(), &fleet);
    wrong.user = Some("fleet".into());
    wrong.password = Some(Token::new("nope"));
    let err = NatsTransport::connect(wrong)
        .await
        .expect_err("wrong password");
    assert!(matches!(err, Error::ConnectionFailed { .. }), "{err}");
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(
        text.contains(&server.url()),
        "the error names the server: {text}"
    );
    let mut right = config(&server.url(), &fleet);
    right.user = Some("fleet".into());
    right.password = Some(Token::new("s3cret"));
    let t = NatsTransport::connect(right).await.expect("right password");
    t.shutdown().await;
    let token_server = tokio::task::spawn_blocking(|| {
        NatsServer::start_with(&["--auth", "t0ken"]).expect("server")
    })
    .await
    .expect("server");
    let mut with_token = config(&token_server.url(), &fleet);
    assert!(NatsTransport::connect(with_token.clone()).await.is_err());
    with_token.token = Some(Token::new("t0ken"));
    let t = NatsTransport::connect(with_token).await.expect("token");
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_server_is_verified_against_the_configured_ca() {
    let tmp = tempfile::tempdir().expect("dir");
    let dir = tmp.path().to_path_buf();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca.pem()).expect("write");
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    let args = [
        "--tls".to_owned(),
        "--tlscert".to_owned(),
        cert_path.display().to_string(),
        "--tlskey".to_owned(),
        key_path.display().to_string(),
    ];
    let server = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NatsServer::start_with(&args).expect("server")
    })
    .await
    .expect("server");
    let url = format!("tls://127.0.0.1:{}", server.port());
    let fleet = fleet();
    let untrusting = NatsConfig {
        tls: NatsTls {
            required: true,
            ..NatsTls::default()
        },
        ..config(&url, &fleet)
    };
    assert!(
        NatsTransport::connect(untrusting).await.is_err(),
        "a server certificate from an unknown CA is refused"
    );
    let trusting = NatsConfig {
        tls: NatsTls {
            required: true,
            ca_path: Some(ca_path),
            ..NatsTls::default()
        },
        ..config(&url, &fleet)
    };
    let a = NatsTransport::connect(trusting.clone())
        .await
        .expect("TLS with the CA");
    let b = NatsTransport::connect(trusting)
        .await
        .expect("TLS with the CA");
    let _ia = attach(&a, "a").await;
    let mut ib = attach(&b, "b").await;
    await_peer(&a, "b").await;
    a.send(direct(
        "a",
        "b",
        "coordination",
        Bytes::from_static(b"over tls"),
    ))
    .await
    .expect("send");
    let Some(Inbound::Message { envelope, .. }) = tokio::time::timeout(WAIT, ib.recv())
        .await
        .expect("message")
    else {
        panic!("expected a message")
    };
    assert_eq!(&envelope.payload[..], b"over tls");
    a.shutdown().await;
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_endpoints_converge_on_one_membership_through_churn() {
    let server = NatsServer::shared();
    let (url, fleet) = (server.url(), fleet());
    let started = tokio::time::Instant::now();
    let mut endpoints = Vec::new();
    let mut inboxes = Vec::new();
    for e in 0..20 {
        let t = Arc::new(connect(config(&url, &fleet)).await);
        for k in 0..5 {
            inboxes.push(attach(&t, &format!("e{e}-a{k}")).await);
        }
        endpoints.push(t);
    }
    // Churn: every endpoint drops one agent and attaches another.
    for (e, t) in endpoints.iter().enumerate() {
        t.detach(&format!("e{e}-a0").into()).await.expect("detach");
        inboxes.push(attach(t, &format!("e{e}-late")).await);
    }
    let expected: HashSet<String> = (0..20)
        .flat_map(|e| {
            (1..5)
                .map(move |k| format!("e{e}-a{k}"))
                .chain(std::iter::once(format!("e{e}-late")))
        })
        .collect();
    for t in &endpoints {
        tokio::time::timeout(WAIT, async {
            loop {
                let seen: HashSet<String> =
                    t.peers().into_iter().map(|p| p.id.to_string()).collect();
                if seen == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every endpoint sees exactly the 100 agents");
    }
    println!(
        "20 endpoints, 100 agents, with churn: one membership after {:?}",
        started.elapsed()
    );
    for t in &endpoints {
        t.shutdown().await;
    }
}

/// The copies of a broadcast share one message id: each receiving agent's confirmation
/// settles its own copy, so more broadcasts than a flow's window go through, and every copy
/// ends confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_copies_are_confirmed_each() {
    let server = server().await;
    let fleet = fleet();
    let sender = NatsTransport::connect(config(&server.url(), &fleet))
        .await
        .expect("connect");
    let _s = attach(&sender, "s").await;
    let (mut endpoints, mut inboxes) = (Vec::new(), Vec::new());
    for e in 0..2 {
        let t = NatsTransport::connect(config(&server.url(), &fleet))
            .await
            .expect("connect");
        for a in 0..2 {
            inboxes.push(attach(&t, &format!("r{e}{a}")).await);
        }
        endpoints.push(t);
    }
    let targets: Vec<AgentId> = ["r00", "r01", "r10", "r11"].map(AgentId::from).to_vec();
    for t in &targets {
        await_peer(&sender, t.as_str()).await;
    }
    // Receivers take what arrives, as agents do.
    let mut readers = Vec::new();
    for mut ib in inboxes {
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 1500 {
                match tokio::time::timeout(WAIT, ib.recv()).await {
                    Ok(Some(Inbound::Message { envelope, receipt })) => {
                        got.push(read_counter(&envelope.payload));
                        drop(receipt);
                    }
                    _ => break,
                }
            }
            got
        }));
    }
    for i in 0..1500u32 {
        let mut e = direct("s", "r00", "coordination", counter(i));
        e.to = Recipient::Fleet;
        e.kind = MessageKind::Broadcast;
        let report = tokio::time::timeout(WAIT, sender.broadcast(e, &targets))
            .await
            .expect("a broadcast never waits out a window of unconfirmed copies");
        assert_eq!(
            report.expect("broadcast").delivered.len(),
            4,
            "broadcast {i}"
        );
    }
    for r in readers {
        let got = r.await.expect("reader");
        assert_eq!(
            got,
            (0..1500).collect::<Vec<_>>(),
            "every copy, once, in order"
        );
    }
    // Every copy is confirmed: nothing is left to report unconfirmed.
    tokio::time::timeout(WAIT, async {
        while sender.stats(&AgentId::from("s")).messages_unconfirmed > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every broadcast copy confirmed");
}

/// A broadcast of the largest payload the server takes, to many agents with long names on
/// one endpoint: the copies joined into one frame must still fit the server's `max_payload`
/// (a fanout's copies are kept within their budget), or the frame is dropped and its copies
/// arrive only when sent again, one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_of_the_largest_payload_to_many_agents_fits_the_servers_limit() {
    let server = NatsServer::shared();
    let (url, fleet) = (server.url(), fleet());
    // Nothing is sent again within the test: a frame the server refused would never arrive.
    let a = connect(NatsConfig {
        retransmit_after: Duration::from_secs(60),
        ..config(&url, &fleet)
    })
    .await;
    let b = connect(config(&url, &fleet)).await;
    let _ia = attach(&a, "a").await;
    // Long names: the 16 copies a session's bytes admit at once take about 5 KiB, more
    // than the room beside a payload this large.
    let names: Vec<String> = (0..20)
        .map(|i| format!("receiver-{i:02}-{}", "n".repeat(300)))
        .collect();
    let mut readers = Vec::new();
    for n in &names {
        let mut ib = attach(&b, n).await;
        let name = n.clone();
        // Each takes its copy, as an agent does.
        readers.push(tokio::spawn(async move {
            match tokio::time::timeout(WAIT, ib.recv()).await {
                Ok(Some(Inbound::Message { envelope, receipt })) => {
                    drop(receipt);
                    assert_eq!(envelope.to, Recipient::Agent(name.as_str().into()));
                    envelope.payload.len()
                }
                _ => 0,
            }
        }));
    }
    for n in &names {
        await_peer(&a, n).await;
    }
    // The largest payload a message may carry here.
    let max = match a
        .send(direct(
            "a",
            &names[0],
            "results",
            vec![0u8; 2 * 1024 * 1024],
        ))
        .await
    {
        Err(Error::MessageTooLarge { max, .. }) => max,
        other => panic!("{other:?}"),
    };
    let mut e = direct("a", &names[0], "coordination", vec![9u8; max]);
    e.to = Recipient::Fleet;
    e.kind = MessageKind::Broadcast;
    let targets: Vec<AgentId> = names.iter().map(AgentId::new).collect();
    // Copies a session reaches now go together (a confirmed broadcast sends each alone).
    let report = a.broadcast(e, &targets).await.expect("broadcast");
    assert_eq!(report.delivered.len(), names.len(), "{:?}", report.failed);
    for r in readers {
        assert_eq!(r.await.expect("reader"), max, "every copy arrives");
    }
    assert_eq!(a.stats(&"a".into()).messages_failed, 0);
    a.shutdown().await;
    b.shutdown().await;
}
