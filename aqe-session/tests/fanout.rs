//! A broadcast's copies between two sessions, frame by frame: encoded once, joined into one
//! `Fanout` frame on the way out, taken on the way in as one message per copy (each
//! addressed to its agent, numbered, acknowledged and refused on its own), and sent again
//! alone, still addressed right, when its session ends unsettled.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use aqe_core::{AgentId, ChannelName, Envelope, MessageKind, Recipient, Registration};
use aqe_session::{
    Budgets, Config, Ctx, Ended, EndpointId, FanoutCopy, Frame, Hello, Locals, MAX_FANOUT,
    NodeInput, Outcome, Principal, Rank, SESSION_VERSION, Session, SessionEvent, SessionId,
    Transmit, Trust, fanout_meta,
};

struct T;

impl Ctx for T {
    type Msg = usize;
    type Req = ();
}

/// Agents `b1`, `b2` and `b3`, on channel `news`.
struct Here(Vec<&'static str>);

impl Locals for Here {
    fn admits(&self, to: &AgentId, channel: &ChannelName) -> bool {
        channel.as_ref() == "news" && self.0.contains(&to.as_str())
    }
}

fn hello(endpoint: EndpointId) -> Hello {
    Hello {
        version: SESSION_VERSION,
        endpoint,
        nonce: 1,
        listen: None,
        token: None,
        window: 64,
        session_bytes: 1 << 20,
        heartbeat_ms: 1000,
        liveness_ms: 3000,
    }
}

/// A session of `me` with `peer`, the peer announcing agent `a` (its sender).
fn session(me: EndpointId, peer: EndpointId, now: Instant) -> Session<T> {
    let config = Arc::new(Config::default());
    let budgets = Arc::new(Budgets::new(&config));
    let trust = Trust {
        authenticated: true,
        principal: Principal::Key(peer.key),
    };
    let rank = Rank {
        initiator: me,
        nonce: 1,
    };
    let mut s = Session::new(
        SessionId(1),
        rank,
        &hello(peer),
        trust,
        config,
        budgets,
        now,
    );
    let snapshot = Frame::Snapshot {
        generation: 0,
        part: 0,
        parts: 1,
        agents: vec![Registration::new(AgentId::from("a"), "t")],
    };
    s.on_frame(snapshot, now, &Here(vec![])).expect("snapshot");
    while s.poll_event().is_some() {}
    while s.poll_transmit().is_some() {}
    s
}

/// What `t` is on the wire, read back as a frame.
fn wire(t: &Transmit) -> Frame {
    let mut buf = bytes::BytesMut::new();
    t.encode(&mut buf).expect("encode");
    postcard::from_bytes(&buf).expect("decode")
}

fn broadcast(payload: usize) -> Envelope {
    Envelope::new(
        AgentId::from("a"),
        Recipient::Fleet,
        "news".into(),
        MessageKind::Broadcast,
        Bytes::from(vec![5u8; payload]),
    )
}

/// Admits a copy of `e` for each of `to` in one batch.
fn send(s: &mut Session<T>, e: &Envelope, to: &[&str], now: Instant) -> usize {
    let body = aqe_core::encode_envelope(e).expect("encode");
    let mut batch = to
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let meta = fanout_meta(e, AgentId::from(*t), true, || aqe_core::Timestamp(0));
            (meta, body.clone(), i)
        })
        .peekable();
    s.send_many(&mut batch, now).expect("linked").0
}

#[test]
fn copies_travel_as_one_frame_and_arrive_as_one_message_each() {
    let now = Instant::now();
    let (ea, eb) = (EndpointId::new(1, 1), EndpointId::new(2, 1));
    let mut a = session(ea, eb, now);
    let mut b = session(eb, ea, now);
    for payload in [3, 5000] {
        let e = broadcast(payload);
        // `b4` is not hosted: its copy alone is refused.
        assert_eq!(send(&mut a, &e, &["b1", "b2", "b3", "b4"], now), 4);
        // Whatever else the session says (control frames), the copies are one frame.
        let mut fanouts = Vec::new();
        while let Some(t) = a.poll_transmit() {
            if matches!(t, Transmit::Fanout { .. }) {
                fanouts.push(t);
            } else {
                assert_eq!(*t.lane(), aqe_session::Lane::Control, "{t:?}");
            }
        }
        assert_eq!(fanouts.len(), 1, "the copies were one frame");
        let t = fanouts.pop().expect("one");
        let frame = wire(&t);
        let Frame::Fanout {
            copies, envelope, ..
        } = &frame
        else {
            panic!("not a fanout: {frame:?}");
        };
        let tos: Vec<&str> = copies.iter().map(|c| c.to.as_str()).collect();
        assert_eq!(tos, ["b1", "b2", "b3", "b4"]);
        assert_eq!(envelope.to, Recipient::Fleet);
        b.on_frame(frame, now, &Here(vec!["b1", "b2", "b3"]))
            .expect("a valid fanout");
        let mut got = Vec::new();
        while let Some(ev) = b.poll_event() {
            if let SessionEvent::Deliver { to, seq, envelope } = ev {
                assert_eq!(envelope.to, Recipient::Agent(to.clone()));
                assert_eq!(envelope.id, e.id);
                assert_eq!(envelope.payload, e.payload);
                got.push((to.as_str().to_owned(), seq.expect("reliable")));
            }
        }
        let names: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["b1", "b2", "b3"]);
        for (_, seq) in &got {
            b.taken(*seq, now);
        }
        // Acknowledgements and the refusal go back; every copy settles once.
        b.handle_timeout(now + std::time::Duration::from_millis(50), &Here(vec![]));
        let (mut settled, mut displaced) = (Vec::new(), Vec::new());
        while let Some(t) = b.poll_transmit() {
            a.on_frame(wire(&t), now, &Here(vec![])).expect("valid");
        }
        while let Some(ev) = a.poll_event() {
            match ev {
                SessionEvent::Settled(s) => settled.push((s.ctx, s.outcome)),
                SessionEvent::Node(NodeInput::Displaced { orphans }) => displaced.extend(orphans),
                _ => {}
            }
        }
        settled.sort_by_key(|(i, _)| *i);
        assert_eq!(
            settled,
            [
                (0, Outcome::Taken),
                (1, Outcome::Taken),
                (2, Outcome::Taken)
            ]
        );
        // Refused `NotHere`: the copy for b4 waits for its agent elsewhere, still its own.
        let tos: Vec<Recipient> = displaced
            .iter()
            .map(|o| o.envelope().expect("decodes").to)
            .collect();
        assert_eq!(tos, [Recipient::Agent(AgentId::from("b4"))]);
        assert_eq!(a.unsettled(), 0);
    }
}

#[test]
fn copies_of_different_envelopes_or_past_the_limit_are_separate_frames() {
    let now = Instant::now();
    let (ea, eb) = (EndpointId::new(1, 1), EndpointId::new(2, 1));
    let mut a = session(ea, eb, now);
    let (e1, e2) = (broadcast(10), broadcast(10));
    send(&mut a, &e1, &["b1", "b2"], now);
    send(&mut a, &e2, &["b1", "b2"], now);
    let mut frames = Vec::new();
    while let Some(t) = a.poll_transmit() {
        frames.push(wire(&t));
    }
    let ids: Vec<(u64, usize)> = frames
        .iter()
        .map(|f| match f {
            Frame::Fanout {
                copies, envelope, ..
            } => (envelope.id.0, copies.len()),
            f => panic!("not a fanout: {f:?}"),
        })
        .collect();
    assert_eq!(ids, [(e1.id.0, 2), (e2.id.0, 2)]);
    // Numbers follow the session's, as for single messages.
    let seqs: Vec<u64> = frames
        .iter()
        .flat_map(|f| match f {
            Frame::Fanout { copies, .. } => copies.iter().map(|c| c.seq).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
}

#[test]
fn a_fanout_breaking_a_rule_ends_the_session() {
    let now = Instant::now();
    let (ea, eb) = (EndpointId::new(1, 1), EndpointId::new(2, 1));
    let copy = |seq| FanoutCopy {
        seq,
        after: 0,
        to: AgentId::from("b1"),
    };
    let fanout = |copies: Vec<FanoutCopy>, low| Frame::Fanout {
        low,
        generation: 0,
        confirm: false,
        copies,
        envelope: broadcast(1),
    };
    for bad in [
        fanout(vec![], 1),
        fanout(vec![copy(1), copy(0)], 1),
        fanout(vec![copy(1), copy(1 << 20)], 0),
        fanout((1..=MAX_FANOUT as u64 + 1).map(copy).collect(), 1),
    ] {
        let mut b = session(eb, ea, now);
        assert!(b.on_frame(bad, now, &Here(vec!["b1"])).is_err());
        assert!(matches!(b.ended(), Some(Ended::Violation(_))));
    }
    // The most copies allowed is no violation.
    let mut b = session(eb, ea, now);
    let most = fanout((1..=MAX_FANOUT as u64).map(copy).collect(), 1);
    b.on_frame(most, now, &Here(vec!["b1"])).expect("valid");
}

#[test]
fn an_unsettled_copy_goes_again_alone_addressed_to_its_agent() {
    let now = Instant::now();
    let (ea, eb) = (EndpointId::new(1, 1), EndpointId::new(2, 1));
    let mut a = session(ea, eb, now);
    let e = broadcast(10);
    send(&mut a, &e, &["b1", "b2"], now);
    while a.poll_transmit().is_some() {}
    a.end(Ended::LinkLost);
    let mut orphans = Vec::new();
    while let Some(ev) = a.poll_event() {
        if let SessionEvent::Node(NodeInput::Ended { orphans: o, .. }) = ev {
            orphans.extend(o);
        }
    }
    let tos: Vec<Recipient> = orphans
        .iter()
        .map(|o| o.envelope().expect("decodes").to)
        .collect();
    assert_eq!(
        tos,
        [
            Recipient::Agent(AgentId::from("b1")),
            Recipient::Agent(AgentId::from("b2"))
        ]
    );
    // In doubt (it was transmitted): flagged `redelivered`, and its own encoding.
    assert!(
        orphans
            .iter()
            .all(|o| o.envelope().expect("decodes").redelivered)
    );
}
