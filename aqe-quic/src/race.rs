//! The hello/attach race, against a hand-driven peer over real QUIC: an agent attached while
//! the peer holds back its hello must be announced to it, and reachable both ways, for the
//! whole life of the connection.

use std::time::Duration;

use bytes::Bytes;

use crate::{QuicConfig, SecurityConfig};
use aqe_core::plumbing::{FrameCodec, inbox};
use aqe_core::{Channel, Envelope, Inbound, MessageKind, Recipient, Registration};

use crate::endpoint::Shared;
use crate::tls::Material;
use crate::wire::{Control, FrameReader, Hello, PROTOCOL_VERSION, Preamble, Sequenced};

const WAIT: Duration = Duration::from_secs(10);

fn reg(id: &str) -> Registration {
    Registration::new(id, "test").with_channel(Channel::coordination())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_attached_while_the_peer_delays_its_hello_is_announced_and_reachable() {
    let codec = FrameCodec::default();
    // The hand-driven peer: a QUIC server speaking aqe/3, trusted by the endpoint (same
    // development CA).
    let material = Material::new(&SecurityConfig::default())
        .await
        .expect("certificates");
    let mut server = s2n_quic::Server::builder()
        .with_tls(material.server().expect("tls"))
        .expect("tls")
        .with_io("127.0.0.1:0")
        .expect("io")
        .start()
        .expect("server");
    let peer_addr = server.local_addr().expect("addr");
    let ep = Shared::bind(QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    })
    .await
    .expect("bind");
    let (early_tx, _early) = inbox("early".into(), 64);
    ep.attach(reg("early"), early_tx).expect("attach early");

    let dial = tokio::spawn({
        let ep = ep.clone();
        async move { ep.connect(peer_addr).await }
    });
    let mut connection = tokio::time::timeout(WAIT, server.accept())
        .await
        .expect("dialed")
        .expect("connection");
    let (recv, mut send) = connection
        .accept_bidirectional_stream()
        .await
        .expect("control stream")
        .expect("control stream")
        .split();
    let mut control = FrameReader::new(recv, codec);
    let theirs: Hello = tokio::time::timeout(WAIT, control.next())
        .await
        .expect("hello in time")
        .expect("hello")
        .expect("hello");
    // The peer holds its hello back; meanwhile an agent attaches on the endpoint.
    let (late_tx, mut late) = inbox("late".into(), 64);
    ep.attach(reg("late"), late_tx).expect("attach late");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ours = Hello {
        version: PROTOCOL_VERSION,
        // The id its certificate gives: the endpoint checks.
        endpoint: material.identity,
        nonce: theirs.nonce,
        listen: peer_addr,
        token: None,
        window: 64,
    };
    let snapshot = Control::Snapshot {
        generation: 1,
        agents: vec![reg("p")],
        last: true,
    };
    send.send(crate::wire::frames(&codec, &[&ours, &snapshot]).expect("encode"))
        .await
        .expect("send hello and membership");
    tokio::time::timeout(WAIT, dial)
        .await
        .expect("dial in time")
        .expect("join")
        .expect("connected");
    // The endpoint's membership follows the hellos: the snapshot taken when the handshake
    // began, then what changed since.
    match control.next::<Control>().await {
        Ok(Some(Control::Snapshot { agents, last, .. })) => {
            assert!(last);
            assert_eq!(
                agents.iter().map(|a| a.id.to_string()).collect::<Vec<_>>(),
                ["early"]
            );
        }
        other => panic!("expected the membership snapshot, got {other:?}"),
    }

    // The late agent is announced after the hello, on the control stream.
    let joined = tokio::time::timeout(WAIT, async {
        loop {
            match control.next::<Control>().await {
                Ok(Some(Control::Joined(_, r))) => return r.id,
                Ok(Some(_)) => {}
                other => panic!("control stream: {other:?}"),
            }
        }
    })
    .await
    .expect("the late agent must be announced");
    assert_eq!(joined.as_str(), "late");

    // Reachable both ways: late sends to p over the connection...
    let to_p = Envelope::new(
        "late".into(),
        Recipient::Agent("p".into()),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from_static(b"to p"),
    );
    let transport = crate::QuicTransport::from_shared(ep.clone());
    // The peer's membership snapshot follows its hello: known once the endpoint has read it.
    tokio::time::timeout(WAIT, async {
        while !aqe_core::Transport::peers(&transport)
            .iter()
            .any(|p| p.id.as_str() == "p")
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("p known from the snapshot");
    aqe_core::Transport::send(&transport, to_p)
        .await
        .expect("p is routable");
    let stream = tokio::time::timeout(WAIT, connection.accept_receive_stream())
        .await
        .expect("a stream in time")
        .expect("stream")
        .expect("stream");
    let mut reader = FrameReader::new(stream, codec);
    assert!(
        matches!(reader.next::<Preamble>().await, Ok(Some(Preamble::Channel(c))) if c.as_str() == "coordination")
    );
    let got: Sequenced = reader.next().await.expect("frame").expect("frame");
    assert_eq!(
        (got.envelope.from.as_str(), &got.envelope.payload[..]),
        ("late", &b"to p"[..])
    );

    // ... and p reaches late.
    let mut out = connection.open_send_stream().await.expect("stream");
    let from_p = Envelope::new(
        "p".into(),
        Recipient::Agent("late".into()),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from_static(b"to late"),
    );
    let frames = crate::wire::frames(
        &codec,
        &[
            &Preamble::Channel("coordination".into()),
            &Sequenced {
                seq: 1,
                envelope: from_p,
            },
        ],
    )
    .expect("encode");
    out.send(frames).await.expect("send");
    match tokio::time::timeout(WAIT, late.recv()).await {
        Ok(Some(Inbound::Message { envelope, .. })) => {
            assert_eq!(&envelope.payload[..], b"to late");
        }
        other => panic!("late got nothing: {other:?}"),
    }
    // Taking it acknowledges it to p.
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match control.next::<Control>().await {
                Ok(Some(Control::Ack(ranges))) => return ranges,
                Ok(Some(_)) => {}
                other => panic!("control stream: {other:?}"),
            }
        }
    })
    .await
    .expect("acknowledged");
    assert_eq!(acked, [(1, 1)]);
    ep.shutdown().await;
}
