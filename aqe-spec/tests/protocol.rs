//! PROTOCOL.md against the code, so that the document cannot drift from the wire:
//!
//! - every enum it lists has the variants the code has, with the numbers postcard gives them;
//! - every struct it lists has the code's fields, in the code's order;
//! - its close and reset codes are the constants the QUIC wire uses, all of them;
//! - its constants and the defaults of both configurations are the code's;
//! - every worked example decodes to the value it describes and that value encodes to
//!   exactly its bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use aqe_core::{
    Channel, ChannelKind, Encoding, Envelope, ErrorBody, MessageId, MessageKind, Priority,
    Recipient, Registration, RemoteErrorKind, StreamHeader, StreamOptions, Timestamp,
};
use aqe_nats::testing::forge::{self, Packet};
use aqe_quic::testing::{Chunk, FrameCodec, Preamble};
use aqe_session::{EndpointId, Frame, Hello, Lane, Refusal, Relayed, Transmit};
use aqe_spec::{Block, Shape, blocks, json_at, shape_of};

fn doc() -> Vec<Block> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md"))
        .expect("PROTOCOL.md");
    blocks(&text).unwrap_or_else(|e| panic!("{e}"))
}

/// Every wire type the document must list, with its layout from the code.
fn shapes() -> BTreeMap<&'static str, Shape> {
    let all = [
        shape_of::<Envelope>(),
        shape_of::<aqe_core::TraceParent>(),
        shape_of::<Recipient>(),
        shape_of::<MessageKind>(),
        shape_of::<Encoding>(),
        shape_of::<ErrorBody>(),
        shape_of::<RemoteErrorKind>(),
        shape_of::<Registration>(),
        shape_of::<Channel>(),
        shape_of::<ChannelKind>(),
        shape_of::<aqe_core::SlowConsumer>(),
        shape_of::<StreamHeader>(),
        shape_of::<StreamOptions>(),
        shape_of::<EndpointId>(),
        shape_of::<Hello>(),
        shape_of::<Frame>(),
        shape_of::<aqe_session::FanoutCopy>(),
        shape_of::<Relayed>(),
        shape_of::<Refusal>(),
        shape_of::<Preamble>(),
        shape_of::<Chunk>(),
        shape_of::<Packet>(),
    ];
    all.into_iter()
        .map(|s| {
            let s = s.expect("every wire type is an enum or a struct");
            let name = match &s {
                Shape::Enum { name, .. } | Shape::Struct { name, .. } => *name,
            };
            (name, s)
        })
        .collect()
}

#[test]
fn every_enum_and_struct_is_listed_as_the_code_lays_it_out() {
    let mut expected = shapes();
    for block in doc() {
        match block {
            Block::Enum { name, variants } => {
                let Some(Shape::Enum { variants: code, .. }) = expected.remove(name.as_str())
                else {
                    panic!("PROTOCOL.md lists enum {name}, which is not a wire enum (or twice)");
                };
                let listed: Vec<(u64, &str)> =
                    variants.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let actual: Vec<(u64, &str)> = code
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as u64, *v))
                    .collect();
                assert_eq!(listed, actual, "enum {name}: numbers and names");
            }
            Block::Struct { name, fields } => {
                let Some(Shape::Struct { fields: code, .. }) = expected.remove(name.as_str())
                else {
                    panic!(
                        "PROTOCOL.md lists struct {name}, which is not a wire struct (or twice)"
                    );
                };
                assert_eq!(fields, code.to_vec(), "struct {name}: fields in order");
            }
            _ => {}
        }
    }
    let missing: Vec<&str> = expected.keys().copied().collect();
    assert!(missing.is_empty(), "PROTOCOL.md does not list {missing:?}");
}

#[test]
fn close_and_reset_codes_are_the_wires() {
    use aqe_quic::testing::{close, reset};
    let code: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::from([
        (
            "close",
            BTreeMap::from([
                ("NORMAL", close::NORMAL),
                ("DUPLICATE", close::DUPLICATE),
                ("TOKEN_REJECTED", close::TOKEN_REJECTED),
                ("TOKEN_MISSING", close::TOKEN_MISSING),
                ("VERSION_MISMATCH", close::VERSION_MISMATCH),
                ("PROTOCOL_VIOLATION", close::PROTOCOL_VIOLATION),
                ("HELLO_TIMEOUT", close::HELLO_TIMEOUT),
                ("SELF_CONNECTION", close::SELF_CONNECTION),
                ("UNRESPONSIVE", close::UNRESPONSIVE),
                ("REPLACED", close::REPLACED),
                ("OVERLOADED", close::OVERLOADED),
                ("IDENTITY_MISMATCH", close::IDENTITY_MISMATCH),
            ]),
        ),
        (
            "reset",
            BTreeMap::from([("CANCELLED", reset::CANCELLED), ("REFUSED", reset::REFUSED)]),
        ),
    ]);
    let mut seen = BTreeSet::new();
    for block in doc() {
        if let Block::Codes { name, codes } = block {
            let table = code
                .get(name.as_str())
                .unwrap_or_else(|| panic!("unknown code table {name}"));
            let listed: BTreeMap<&str, u32> = codes
                .iter()
                .map(|(c, n)| (n.as_str(), u32::try_from(*c).expect("small")))
                .collect();
            assert_eq!(&listed, table, "codes {name}");
            seen.insert(name);
        }
    }
    assert_eq!(seen.len(), code.len(), "both code tables listed");
}

/// The constants the document states, from the code.
fn constants() -> BTreeMap<&'static str, String> {
    use aqe_quic::testing as q;
    use aqe_session as s;
    let mut acks = BTreeMap::new();
    for (keys, wire) in [
        (
            [
                "lossy ack delay ms",
                "lossy ack linger ms",
                "lossy ack batch",
            ],
            s::WirePolicy::LOSSY,
        ),
        (
            [
                "reliable ack delay ms",
                "reliable ack linger ms",
                "reliable ack batch",
            ],
            s::WirePolicy::RELIABLE,
        ),
    ] {
        let values = [
            wire.ack_delay.as_millis().to_string(),
            wire.ack_linger.as_millis().to_string(),
            wire.ack_batch.to_string(),
        ];
        acks.extend(keys.into_iter().zip(values));
    }
    let mut all = BTreeMap::from([
        ("alpn", String::from_utf8(q::ALPN.to_vec()).expect("ascii")),
        ("session version", s::SESSION_VERSION.to_string()),
        ("quic frame version", q::WIRE_VERSION.to_string()),
        (
            "quic max frame",
            aqe_quic::testing::MAX_FRAME_LEN.to_string(),
        ),
        ("quic max datagram", q::MAX_DATAGRAM.to_string()),
        ("quic large payload", q::LARGE.to_string()),
        ("nats packet version", forge::NATS_WIRE_VERSION.to_string()),
        ("snapshot parts", s::MAX_SNAPSHOT_PARTS.to_string()),
        ("snapshot part bytes", s::SNAPSHOT_PART_BYTES.to_string()),
        ("registration bytes", s::MAX_REGISTRATION.to_string()),
        ("probe minimum ms", s::PROBE_MIN.as_millis().to_string()),
        ("range span", s::MAX_RANGE_SPAN.to_string()),
        ("fanout copies", s::MAX_FANOUT.to_string()),
        ("fanout copy bytes", s::FANOUT_COPY_BYTES.to_string()),
        (
            "displaced recheck ms",
            s::DISPLACED_RECHECK.as_millis().to_string(),
        ),
        (
            "introspection prefix",
            aqe_link::ENDPOINT_AGENT_PREFIX.to_owned(),
        ),
        (
            "lossy retransmit ms",
            s::WirePolicy::LOSSY
                .retransmit_after
                .map_or(0, |d| d.as_millis())
                .to_string(),
        ),
        ("dedup window", aqe_core::plumbing::DEDUP_WINDOW.to_string()),
        (
            "dedup senders",
            aqe_core::plumbing::DEDUP_SENDERS.to_string(),
        ),
    ]);
    all.append(&mut acks);
    all
}

#[test]
fn constants_and_defaults_are_the_codes() {
    let mut want = constants();
    let quic = serde_json::to_value(aqe_quic::QuicConfig::default()).expect("json");
    let nats = serde_json::to_value(aqe_nats::NatsConfig::default()).expect("json");
    let mut defaults_seen = BTreeSet::new();
    for block in doc() {
        let Block::Values { name, values } = block else {
            continue;
        };
        if name == "constants" {
            for (k, v) in values {
                let actual = want
                    .remove(k.as_str())
                    .unwrap_or_else(|| panic!("PROTOCOL.md states constant {k:?}, unknown here"));
                assert_eq!(v, actual, "constant {k}");
            }
            continue;
        }
        let config = match name.as_str() {
            "quicConfig" => &quic,
            "natsConfig" => &nats,
            other => panic!("defaults of {other}?"),
        };
        for (k, v) in values {
            let actual = json_at(config, &k).unwrap_or_else(|| panic!("{name}.{k} is no option"));
            assert_eq!(v, actual, "default of {name}.{k}");
        }
        defaults_seen.insert(name);
    }
    assert!(want.is_empty(), "constants not stated: {:?}", want.keys());
    assert_eq!(defaults_seen.len(), 2, "defaults of both configurations");
}

// ----- worked examples -----

fn a() -> EndpointId {
    EndpointId::new(0x1122_3344_5566_7788, 1_764_000_000_000_000)
}

fn b() -> EndpointId {
    EndpointId::new(0x99aa_bbcc_ddee_ff00, 1_764_000_000_123_456)
}

fn envelope() -> Envelope {
    let mut e = Envelope::new(
        "a".into(),
        Recipient::Agent("b".into()),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from_static(b"hi"),
    );
    e.id = MessageId(300);
    e.priority = Priority::new(5).expect("priority");
    e.timestamp = Timestamp(1_764_000_000_000);
    e.encoding = Encoding::Raw;
    e
}

/// The envelope of section 2 broadcast (`to: Fleet`), as copies to `b` (message 5, after 4)
/// and `c` (message 6, the first of its flow).
fn fanout() -> Frame {
    let mut e = envelope();
    e.to = Recipient::Fleet;
    e.kind = MessageKind::Broadcast;
    Frame::Fanout {
        low: 3,
        generation: 2,
        confirm: false,
        copies: vec![
            aqe_session::FanoutCopy {
                seq: 5,
                after: 4,
                to: "b".into(),
            },
            aqe_session::FanoutCopy {
                seq: 6,
                after: 0,
                to: "c".into(),
            },
        ],
        envelope: e,
    }
}

fn hello(listen: Option<SocketAddr>, token: Option<&str>) -> Hello {
    Hello {
        version: aqe_session::SESSION_VERSION,
        endpoint: a(),
        nonce: 7,
        listen,
        token: token.map(str::to_owned),
        window: 1024,
        session_bytes: 16 * 1024 * 1024,
        heartbeat_ms: 500,
        liveness_ms: 3000,
    }
}

fn quic_frame<T: serde::Serialize>(value: &T) -> Vec<u8> {
    FrameCodec::default()
        .encode_to_bytes(value)
        .expect("encode")
        .to_vec()
}

fn quic_decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    let mut buf = BytesMut::from(bytes);
    let v = FrameCodec::default()
        .decode::<T>(&mut buf)
        .expect("decodes")
        .expect("one whole frame");
    assert!(buf.is_empty(), "exactly one frame");
    v
}

fn nats_frames(frames: &[Frame]) -> Vec<u8> {
    forge::frames(a(), b(), 7, frames).to_vec()
}

/// Each example: what it encodes, and how to decode it back to a comparable form.
fn check_example(name: &str, bytes: &[u8]) {
    match name {
        "envelope" => {
            let e = envelope();
            assert_eq!(aqe_core::encode(&e).expect("encode").as_ref(), bytes);
            assert_eq!(aqe_core::decode::<Envelope>(bytes).expect("decode"), e);
        }
        "socket address" => {
            let addr: SocketAddr = "127.0.0.1:47301".parse().expect("addr");
            assert_eq!(postcard::to_allocvec(&addr).expect("encode"), bytes);
            assert_eq!(
                postcard::from_bytes::<SocketAddr>(bytes).expect("decode"),
                addr
            );
        }
        "quic hello" => {
            let h = hello(
                Some("127.0.0.1:47301".parse().expect("addr")),
                Some("s3cret"),
            );
            assert_eq!(quic_frame(&h), bytes);
            assert_eq!(quic_decode::<Hello>(bytes), h);
        }
        "quic message" => {
            let f = Frame::Message {
                seq: 5,
                after: 4,
                low: 3,
                generation: 2,
                confirm: false,
                envelope: envelope(),
            };
            assert_eq!(quic_frame(&f), bytes);
            assert_eq!(quic_decode::<Frame>(bytes), f);
            // The header and the envelope encoded once, as a sender frames a message.
            let mut framed = BytesMut::new();
            let t = Transmit::Message {
                lane: Lane::Ordered("coordination".into()),
                header: aqe_session::MessageHeader {
                    seq: 5,
                    after: 4,
                    low: 3,
                    generation: 2,
                    confirm: false,
                },
                priority: aqe_core::Priority::DEFAULT,
                body: aqe_core::encode_envelope(&envelope()).expect("encode"),
            };
            aqe_quic::testing::frame_transmit(&t, &mut framed).expect("frame");
            assert_eq!(framed.as_ref(), bytes);
        }
        "quic fanout" => {
            let f = fanout();
            assert_eq!(quic_frame(&f), bytes);
            assert_eq!(quic_decode::<Frame>(bytes), f);
            // As a sender frames the copies it joined, the envelope encoded once.
            let Frame::Fanout {
                copies, envelope, ..
            } = f
            else {
                unreachable!("a fanout")
            };
            let body = aqe_core::encode_envelope(&envelope).expect("encode");
            let mut copies = copies.into_iter().map(|c| {
                let header = aqe_session::MessageHeader {
                    seq: c.seq,
                    after: c.after,
                    low: 3,
                    generation: 2,
                    confirm: false,
                };
                let lane = Lane::Ordered("coordination".into());
                Transmit::fanout(
                    lane,
                    header,
                    c.to,
                    aqe_core::Priority::DEFAULT,
                    body.clone(),
                )
            });
            let mut t = copies.next().expect("a copy");
            for c in copies {
                assert!(t.join(c).is_none(), "joins");
            }
            let mut framed = BytesMut::new();
            aqe_quic::testing::frame_transmit(&t, &mut framed).expect("frame");
            assert_eq!(framed.as_ref(), bytes);
        }
        "quic acks" => {
            let f = Frame::Acks {
                received: vec![],
                taken: vec![(1, 3), (5, 5)],
            };
            assert_eq!(quic_frame(&f), bytes);
            assert_eq!(quic_decode::<Frame>(bytes), f);
        }
        "quic ping" => {
            let f = Frame::Ping {
                nonce: 9,
                generation: 2,
                low: 6,
            };
            assert_eq!(quic_frame(&f), bytes);
            assert_eq!(quic_decode::<Frame>(bytes), f);
        }
        "quic preamble" => {
            let p = Preamble::Channel("coordination".into());
            assert_eq!(quic_frame(&p), bytes);
            assert_eq!(quic_decode::<Preamble>(bytes), p);
        }
        "quic datagram" => {
            let mut e = envelope();
            e.channel = "metrics".into();
            let f = Frame::Datagram {
                generation: 2,
                envelope: e,
            };
            let t = Transmit::Frame(Lane::Datagram, f.clone());
            assert_eq!(
                aqe_quic::testing::datagram(&t).expect("encode").as_ref(),
                bytes
            );
            assert_eq!(
                aqe_quic::testing::decode_datagram(bytes).expect("decode"),
                f
            );
        }
        "nats alive" => {
            let p = Packet::Alive {
                from: a(),
                generation: 2,
            };
            assert_eq!(forge::packet(&p).as_ref(), bytes);
            assert_eq!(forge::decode(bytes).expect("decode"), (p, 0));
        }
        "nats hello" => {
            let p = Packet::Hello {
                to: b(),
                reply: false,
                hello: hello(None, None),
            };
            assert_eq!(forge::packet(&p).as_ref(), bytes);
            assert_eq!(forge::decode(bytes).expect("decode"), (p, 0));
        }
        "nats frames" => {
            let frames = [
                Frame::Acks {
                    received: vec![(1, 4)],
                    taken: vec![(1, 2)],
                },
                Frame::SnapshotRequest,
            ];
            assert_eq!(nats_frames(&frames), bytes);
            let (packet, n) = forge::decode(bytes).expect("decode");
            assert_eq!(
                packet,
                Packet::Frames {
                    from: a(),
                    to: b(),
                    session: 7
                }
            );
            assert_eq!(n, frames.len());
        }
        other => panic!("PROTOCOL.md has example {other:?}, which no check knows"),
    }
}

const EXAMPLES: [&str; 12] = [
    "envelope",
    "socket address",
    "quic hello",
    "quic message",
    "quic fanout",
    "quic acks",
    "quic ping",
    "quic preamble",
    "quic datagram",
    "nats alive",
    "nats hello",
    "nats frames",
];

#[test]
fn every_worked_example_decodes_and_encodes_to_its_bytes() {
    let mut left: BTreeSet<&str> = EXAMPLES.into_iter().collect();
    for block in doc() {
        if let Block::Example { name, bytes } = block {
            check_example(&name, &bytes);
            left.remove(name.as_str());
        }
    }
    assert!(
        left.is_empty(),
        "examples missing from PROTOCOL.md: {left:?}"
    );
}

/// Prints every example's bytes, for writing the document (`-- --ignored --nocapture`).
#[test]
#[ignore = "a writing aid"]
fn print_examples() {
    let show = |name: &str, b: &[u8]| {
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        println!("{name} ({} bytes): {}", b.len(), hex.join(" "));
    };
    show("envelope", &aqe_core::encode(&envelope()).expect("e"));
    let addr: SocketAddr = "127.0.0.1:47301".parse().expect("addr");
    show("socket address", &postcard::to_allocvec(&addr).expect("a"));
    show(
        "quic hello",
        &quic_frame(&hello(Some(addr), Some("s3cret"))),
    );
    show(
        "quic message",
        &quic_frame(&Frame::Message {
            seq: 5,
            after: 4,
            low: 3,
            generation: 2,
            confirm: false,
            envelope: envelope(),
        }),
    );
    show("quic fanout", &quic_frame(&fanout()));
    show(
        "quic acks",
        &quic_frame(&Frame::Acks {
            received: vec![],
            taken: vec![(1, 3), (5, 5)],
        }),
    );
    show(
        "quic ping",
        &quic_frame(&Frame::Ping {
            nonce: 9,
            generation: 2,
            low: 6,
        }),
    );
    show(
        "quic preamble",
        &quic_frame(&Preamble::Channel("coordination".into())),
    );
    let mut e = envelope();
    e.channel = "metrics".into();
    show(
        "quic datagram",
        &aqe_quic::testing::datagram(&Transmit::Frame(
            Lane::Datagram,
            Frame::Datagram {
                generation: 2,
                envelope: e,
            },
        ))
        .expect("d"),
    );
    show(
        "nats alive",
        &forge::packet(&Packet::Alive {
            from: a(),
            generation: 2,
        }),
    );
    show(
        "nats hello",
        &forge::packet(&Packet::Hello {
            to: b(),
            reply: false,
            hello: hello(None, None),
        }),
    );
    show(
        "nats frames",
        &nats_frames(&[
            Frame::Acks {
                received: vec![(1, 4)],
                taken: vec![(1, 2)],
            },
            Frame::SnapshotRequest,
        ]),
    );
}
