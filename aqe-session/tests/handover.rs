//! What a session leaves when it ends goes before anything newer: the node queues it into
//! the session its agent moves to *before* it publishes that route. Senders run beside the
//! node and use a route the moment it is published (aqe-link applies a step's actions one by
//! one), so a route published first would let a newer message of the flow in ahead of the
//! older ones, which would then fail rather than arrive out of order.
//!
//! The case that broke this: a receiver process killed and restarted at once. Its new
//! incarnation's session already announces the agent when the old session ends. Its route
//! then goes from the old session to the new one directly, never withdrawn in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use aqe_core::{AgentId, ChannelName, Envelope, MessageKind, Recipient, Registration};
use aqe_session::{
    Action, Budgets, Config, Ctx, Ended, EndpointId, Frame, Hello, Locals, Node, Opened, Principal,
    Rank, Route, SESSION_VERSION, Session, SessionEvent, SessionInput, Trust, outgoing,
};

struct T;

impl Ctx for T {
    type Msg = usize;
    type Req = ();
}

struct Nobody;

impl Locals for Nobody {
    fn admits(&self, _: &AgentId, _: &ChannelName) -> bool {
        false
    }
}

const ME: EndpointId = EndpointId::new(1, 1);

fn addr() -> SocketAddr {
    "127.0.0.1:4433".parse().expect("address")
}

/// Opens a session with `peer` (which announces agent `b`), as the transport would: the
/// node says so, the session starts, and what it tells goes to the node.
fn open(node: &mut Node<usize>, peer: EndpointId, now: Instant) -> Session<T> {
    let config = Arc::new(Config::default());
    let trust = Trust {
        authenticated: true,
        principal: Principal::Key(peer.key),
    };
    let rank = Rank {
        initiator: ME,
        nonce: peer.incarnation,
    };
    let hello = Hello {
        version: SESSION_VERSION,
        endpoint: peer,
        nonce: peer.incarnation,
        listen: Some(addr()),
        token: None,
        window: 64,
        session_bytes: 1 << 20,
        heartbeat_ms: 1000,
        liveness_ms: 3000,
    };
    let Opened::Fresh { id, .. } = node.open(peer, rank, trust, Some(addr()), addr().into()) else {
        panic!("a fresh session");
    };
    let budgets = Arc::new(Budgets::new(&config));
    let mut s = Session::new(id, rank, &hello, trust, config, budgets, now);
    let snapshot = Frame::Snapshot {
        generation: 0,
        part: 0,
        parts: 1,
        agents: vec![Registration::new(AgentId::from("b"), "t")],
    };
    s.on_frame(snapshot, now, &Nobody).expect("snapshot");
    tell(node, &mut s, now);
    s
}

/// Hands what session `s` tells to the node; the node's actions.
fn tell(node: &mut Node<usize>, s: &mut Session<T>, now: Instant) -> Vec<Action<usize>> {
    let mut actions = Vec::new();
    while let Some(ev) = s.poll_event() {
        if let SessionEvent::Node(input) = ev {
            actions.extend(node.on(s.id(), input, now));
        }
    }
    while s.poll_transmit().is_some() {}
    actions
}

fn send(s: &mut Session<T>, n: usize, now: Instant) {
    let e = Envelope::new(
        AgentId::from("a"),
        Recipient::Agent(AgentId::from("b")),
        "coordination".into(),
        MessageKind::Direct,
        Bytes::from(vec![n as u8; 8]),
    );
    let (meta, body) = outgoing(&e, true, false, || aqe_core::Timestamp(0)).expect("outgoing");
    s.send(meta, body, n, now).expect("sent");
}

#[test]
fn an_ended_sessions_messages_go_into_the_next_session_before_its_route() {
    let now = Instant::now();
    let mut node: Node<usize> = Node::new(ME, addr().into(), Arc::new(Config::default()));
    let (old, new) = (EndpointId::new(2, 1), EndpointId::new(2, 2));
    let mut s1 = open(&mut node, old, now);
    assert!(
        matches!(node.route(&AgentId::from("b")), Some(Route::Session { session, .. }) if session == s1.id())
    );
    for n in 0..3 {
        send(&mut s1, n, now);
    }
    while s1.poll_transmit().is_some() {}
    // The process restarts: its new incarnation connects and announces `b` too, and only
    // then does the old session end (the first claimant keeps `b` until it does).
    let mut s2 = open(&mut node, new, now);
    s1.handle(SessionInput::End(Ended::LinkLost), now)
        .expect("ends");
    let actions = tell(&mut node, &mut s1, now);

    let redelivered = actions.iter().position(|a| {
        matches!(a, Action::Session(s, SessionInput::Redeliver(m)) if *s == s2.id() && m.len() == 3)
    });
    let routed = actions.iter().position(|a| {
        matches!(a, Action::Route { agent, to: Some(Route::Session { session, .. }) } if agent.as_str() == "b" && *session == s2.id())
    });
    let (Some(redelivered), Some(routed)) = (redelivered, routed) else {
        panic!("the messages and the route move to the new session: {actions:?}");
    };
    assert!(
        redelivered < routed,
        "the messages go in before the route is published: {actions:?}"
    );
    // The new route replaces the old at once: a route withdrawn meanwhile would fail the
    // sends made while the messages move over ("peer not found").
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Route { to: None, .. })),
        "never without a route: {actions:?}"
    );
    for a in actions {
        if let Action::Session(s, input) = a {
            assert_eq!(s, s2.id());
            s2.handle(input, now).expect("the new session lives");
        }
    }
    // They went out to the new incarnation, nothing failed.
    let mut settled = 0;
    while let Some(ev) = s2.poll_event() {
        settled += usize::from(matches!(ev, SessionEvent::Settled(_)));
    }
    assert_eq!(settled, 0, "none fails as overtaken");
    assert!(
        std::iter::from_fn(|| s2.poll_transmit()).count() > 0,
        "redelivered"
    );
}

#[test]
fn no_route_while_the_redelivery_handler_carries_a_message() {
    let now = Instant::now();
    let mut node: Node<usize> = Node::new(ME, addr().into(), Arc::new(Config::default()));
    node.set_redelivery(true);
    let b = AgentId::from("b");
    let mut s1 = open(&mut node, EndpointId::new(2, 1), now);
    send(&mut s1, 0, now);
    while s1.poll_transmit().is_some() {}
    s1.handle(SessionInput::End(Ended::LinkLost), now)
        .expect("ends");
    let actions = tell(&mut node, &mut s1, now);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::HandOff(to) if *to == b)),
        "nothing reaches b: the handler takes it: {actions:?}"
    );
    let mut late = Vec::new();
    let carried = node.take_orphan(&b, &mut late).expect("one waits");
    assert!(late.is_empty());
    // A new session reaches `b` while the handler still carries the message: newer
    // messages must not pass it, so there is no route until the hand-off ends.
    let s2 = open(&mut node, EndpointId::new(3, 1), now);
    assert!(node.route(&b).is_none(), "no route while it is carried");
    drop(carried.taken());
    assert!(node.take_orphan(&b, &mut late).is_none());
    let actions = node.hand_off_ended(&b);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Route { agent, to: Some(Route::Session { session, .. }) } if *agent == b && *session == s2.id())),
        "routed once the handler is done: {actions:?}"
    );
}
