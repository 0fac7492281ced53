//! Deterministic simulation of endpoints running the session layer over a seeded network.
//!
//! Each seed picks a scenario: a lossy wire (NATS-like: frames lost, duplicated, reordered,
//! a shared heartbeat) or links (QUIC-like: ordered lanes, no loss while a link lives, links
//! that break and come back); with or without crashes and restarts (same key, new
//! incarnation), clean shutdowns, partitions, an impostor (another key announcing a live
//! peer's agents at its address), and a peer whose agents never take anything; with or
//! without a redelivery handler (another transport reaching the addressee's host directly
//! while the two can reach each other, as a fallback chain registers). Agents send
//! reliable messages (ordered and unordered) and requests at random, now and then the very
//! moment the node publishes a route (as aqe-link's senders run beside its node); the real
//! aqe-core inbox and receipts carry them into agents that take them at random.
//!
//! After every step the invariants of `aqe-session` are checked (see its crate docs): each
//! reliable send settles once, by its deadline; nothing is taken twice by one incarnation;
//! ordered flows are taken in order, and what comes back to a node goes out again before
//! anything newer sent after it came back; what may have been taken by one principal is never
//! delivered to another; held state stays within its bounds; timers move forward. After the
//! network heals, membership converges.
//!
//! `AQE_SIM_SEEDS=N` runs N seeds (default 5000), `AQE_SIM_SEED=S` one seed, which a
//! failure prints as a one-line reproduction.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use aqe_core::plumbing::{AckSink, Inbox, InboxSender, inbox};
use aqe_core::{
    Address, AgentId, Channel, ChannelName, DeliveryFailure, Envelope, Inbound, MessageId,
    MessageKind, Receipt, Recipient, Registration,
};
use aqe_session::{
    Action, Answer, Budgets, Config, Ctx, Ended, EndpointId, Frame, Greeter, Greeting, Hello,
    Locals, Node, NotSent, Opened, Orphan, Outcome, PeerExchange, Principal, Rank, Route,
    SESSION_VERSION, Session, SessionEvent, SessionId, SessionInput, Trust, WirePolicy,
    check_hello, fanout_meta, outgoing,
};

// ----- randomness -----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn permille(&mut self, p: u32) -> bool {
        self.below(1000) < u64::from(p)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

// ----- scenario -----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// NATS-like: frames may be lost, duplicated, reordered; shared heartbeats.
    Lossy,
    /// QUIC-like: ordered lanes without loss while a link lives; links break.
    Links,
}

#[derive(Clone, Debug)]
struct Scenario {
    wire: Wire,
    hosts: usize,
    loss: u32,
    dup: u32,
    jitter: u64,
    crashes: bool,
    shutdowns: bool,
    partitions: bool,
    link_breaks: bool,
    impostor: bool,
    silent: bool,
    /// Agents leave their endpoint and come back while messages are on their way.
    churn: bool,
    /// Nodes have a redelivery handler (see [`Handing`]).
    handler: bool,
    traffic: Duration,
}

impl Scenario {
    fn of(rng: &mut Rng) -> Self {
        let wire = if rng.permille(500) {
            Wire::Lossy
        } else {
            Wire::Links
        };
        let lossy = wire == Wire::Lossy;
        Self {
            wire,
            hosts: 2 + rng.below(3) as usize,
            loss: if lossy {
                [0, 20, 50, 100][rng.below(4) as usize]
            } else {
                0
            },
            dup: if lossy {
                [0, 20][rng.below(2) as usize]
            } else {
                0
            },
            jitter: if lossy { rng.below(8) } else { 0 },
            crashes: rng.permille(400),
            shutdowns: rng.permille(200),
            partitions: rng.permille(300),
            link_breaks: !lossy && rng.permille(400),
            impostor: rng.permille(250),
            silent: rng.permille(200),
            traffic: Duration::from_millis(1500 + rng.below(2500)),
            churn: rng.permille(300),
            handler: rng.permille(300),
        }
    }
}

fn config(wire: Wire) -> Config {
    Config {
        window: 8,
        session_bytes: 4096,
        endpoint_bytes: 64 * 1024,
        // A few registrations: a peer's announcement may be ignored when it is full.
        membership_bytes: 16 * 1024,
        parked: 16,
        heartbeat: Duration::from_millis(100),
        liveness: Duration::from_millis(600),
        delivery_deadline: Duration::from_millis(2500),
        // A wire where every endpoint hears every other (NATS presence) needs no relays.
        exchange: match wire {
            Wire::Links => PeerExchange::Authenticated,
            Wire::Lossy => PeerExchange::Off,
        },
        wire: match wire {
            Wire::Links => WirePolicy::RELIABLE,
            Wire::Lossy => WirePolicy {
                retransmit_after: Some(Duration::from_millis(120)),
                pings: false,
                ..WirePolicy::LOSSY
            },
        },
        ..Config::default()
    }
}

// ----- what the simulation keeps with messages -----

struct Sim;

impl Ctx for Sim {
    /// The index of the message in the ledger.
    type Msg = usize;
    /// The index of the request in the ledger.
    type Req = usize;
}

/// Everything sent, and what became of it.
#[derive(Default)]
struct Ledger {
    sent: Vec<SentMsg>,
    by_id: HashMap<MessageId, usize>,
    /// Reliable messages sent as a broadcast's copy (a fanout).
    fanouts: u64,
    /// Per ordered flow (from, to): how many were sent.
    flows: HashMap<(AgentId, AgentId), u64>,
    /// Per ordered flow and receiving host and incarnation: the last index taken.
    taken_order: HashMap<(AgentId, AgentId, usize, u64, u64), u64>,
    /// Messages before this one are all settled.
    open_from: usize,
    /// Counts messages going into sessions and coming back to nodes, to order the two.
    tick: u64,
    requests: Vec<SentReq>,
}

struct SentMsg {
    /// The sending host and its incarnation: a sender that dies takes its messages with it.
    from: (usize, u64),
    /// Its sender died first: nothing is owed for it.
    orphaned: bool,
    to: AgentId,
    ordered: Option<u64>,
    /// Sent on the channel whose full inbox drops.
    droppable: bool,
    accepted: Instant,
    /// Its time-to-live, counted by the sender's session from acceptance.
    ttl: Option<Duration>,
    outcome: Option<(Outcome, Instant)>,
    /// Keys of the endpoints it was delivered to.
    delivered: BTreeSet<u64>,
    /// When it last came back to its sender's node (the ledger's tick; 0: never).
    returned: u64,
    /// Who took it: host, incarnation, attachment of its agent.
    taken_by: Vec<(usize, u64, u64)>,
}

struct SentReq {
    answered: u32,
    /// Hosts and incarnations whose agent ran it.
    ran: Vec<(usize, u64)>,
}

// ----- the network -----

enum Packet {
    /// A hello: on a link (links wire), or as a message (lossy wire; `link` 0).
    Hello {
        hello: Hello,
        reply: bool,
        link: u64,
    },
    /// A frame of the session of nonce `session` between `from` and `to` (as NATS frames
    /// name them; on a link, the link names the session).
    Frame {
        bytes: Bytes,
        link: u64,
        from: EndpointId,
        to: EndpointId,
        session: u64,
    },
    /// The lossy wire: the sender knows no session `session` with `to`.
    Reset {
        from: EndpointId,
        to: EndpointId,
        session: u64,
    },
    /// The shared heartbeat of the lossy wire.
    Alive {
        from: EndpointId,
        generation: u64,
    },
    Gone {
        from: EndpointId,
    },
}

struct InFlight {
    at: Instant,
    order: u64,
    to: usize,
    /// The incarnation it is for (a restarted host never sees its predecessor's packets).
    to_incarnation: u64,
    from: usize,
    packet: Packet,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

/// A link (links wire), between two incarnations.
struct Link {
    ends: [(usize, u64); 2],
    /// Per direction: when the last packet is delivered (lanes stay in order).
    last: [Instant; 2],
    up: bool,
}

// ----- hosts -----

/// What an agent's inbox made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Taken,
    Abandoned,
    /// Dropped unread by a full inbox (the channel's slow-consumer policy).
    Dropped,
}

#[derive(Default)]
struct Acks(Mutex<Vec<(u64, Got)>>);

impl AckSink for Acks {
    fn acknowledged(&self, token: u64) {
        self.0.lock().expect("lock").push((token, Got::Taken));
    }
    fn abandoned(&self, token: u64) {
        self.0.lock().expect("lock").push((token, Got::Abandoned));
    }
    fn expired(&self, _token: u64) {
        unreachable!("the simulation sends no message with a time-to-live");
    }
    fn dropped(&self, token: u64) {
        self.0.lock().expect("lock").push((token, Got::Dropped));
    }
}

struct SimSession {
    session: Session<Sim>,
    peer: usize,
    link: Option<u64>,
    acks: Arc<Acks>,
    /// Per agent: the ordered messages that went into this session, sent or redelivered, by
    /// their number in the flow, with when (the ledger's tick).
    entered: HashMap<AgentId, Vec<(u64, u64)>>,
}

struct Agent {
    id: AgentId,
    tx: InboxSender,
    rx: Inbox,
    /// Requests taken and not answered yet: (session, request).
    requests: VecDeque<(SessionId, MessageId, usize)>,
}

/// A hand-off to the simulated redelivery handler, which stands for another transport: one
/// message at a time, oldest first, as aqe-link hands them, delivered into the addressee's
/// inbox on the host that really holds it (when that host is reachable and the other
/// transport up) 0-5 ms later (a link takes 2 ms: either way may be the faster) and
/// confirmed when taken; a refusal or a drop ends the hand-off and gives the message back,
/// and the message's deadline bounds the handler.
struct Handing {
    to: AgentId,
    /// The message with the handler, and the token its receipt acknowledges.
    current: Option<(Orphan<usize>, u64)>,
}

/// A message the redelivery handler carries to host `to` (and incarnation) by the other
/// transport, arriving `at`.
struct Flight {
    at: Instant,
    to: (usize, u64),
    agent: AgentId,
    item: Inbound,
}

struct Hosted(HashMap<AgentId, Vec<ChannelName>>);

impl Locals for Hosted {
    fn admits(&self, to: &AgentId, channel: &ChannelName) -> bool {
        self.0.get(to).is_some_and(|c| c.contains(channel))
    }
}

struct Host {
    key: u64,
    incarnation: u64,
    alive: bool,
    /// Its agents never take anything.
    silent: bool,
    /// It claims another host's agent and address.
    impostor_of: Option<usize>,
    listen: SocketAddr,
    node: Node<usize>,
    budget: Arc<Budgets>,
    sessions: BTreeMap<SessionId, SimSession>,
    agents: Vec<Agent>,
    hosted: Hosted,
    routes: HashMap<AgentId, Route>,
    next_alive: Instant,
    greeter: Greeter,
    /// How many times its agent attached.
    attachment: u64,
    handing: Vec<Handing>,
    /// Receipts of what the redelivery handler delivered.
    handler_acks: Arc<Acks>,
}

/// The channel whose full inbox drops the oldest of it waiting (unordered).
const DROPS: &str = "drops";

fn channels() -> Vec<Channel> {
    vec![
        Channel::coordination(),
        Channel::results(),
        Channel::new(DROPS, aqe_core::ChannelKind::Unicast)
            .with_ordered(false)
            .with_slow_consumer(aqe_core::SlowConsumer::DropOldest),
    ]
}

/// Agents' inbox capacity: small, so that `drops` drops now and then (the other channels
/// queue above it, within the senders' windows).
const INBOX: usize = 4;

impl Host {
    fn endpoint(&self) -> EndpointId {
        EndpointId::new(self.key, self.incarnation)
    }
}

struct World {
    /// Ledger indices whose story is printed (`AQE_SIM_TRACE=3` or `AQE_SIM_TRACE=0-20`).
    trace: Option<(usize, usize)>,
    seed: u64,
    rng: Rng,
    sc: Scenario,
    config: Arc<Config>,
    start: Instant,
    now: Instant,
    hosts: Vec<Host>,
    net: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    /// Hosts on one side of a partition, while it lasts.
    partition: Option<BTreeSet<usize>>,
    ledger: Ledger,
    step: u64,
    /// Agents send now (traffic, or the calm spell).
    sending: bool,
    /// Messages given to a redelivery handler, and the last receipt token it used.
    handed: usize,
    /// What the redelivery handlers carry now.
    flights: Vec<Flight>,
    next_token: u64,
}

fn agent_id(i: usize) -> AgentId {
    AgentId::new(format!("a{i}"))
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let sc = Scenario::of(&mut rng);
        let config = Arc::new(config(sc.wire));
        let start = Instant::now();
        let mut w = Self {
            trace: std::env::var("AQE_SIM_TRACE").ok().and_then(|t| {
                let (a, b) = t.split_once('-').unwrap_or((&t, &t));
                Some((a.parse().ok()?, b.parse().ok()?))
            }),
            seed,
            rng,
            config,
            start,
            now: start,
            hosts: Vec::new(),
            net: BinaryHeap::new(),
            handed: 0,
            next_token: 0,
            order: 0,
            links: BTreeMap::new(),
            next_link: 1,
            partition: None,
            ledger: Ledger::default(),
            step: 0,
            sending: false,
            flights: Vec::new(),
            sc,
        };
        for i in 0..w.sc.hosts {
            let silent = w.sc.silent && i == w.sc.hosts - 1 && w.sc.hosts > 2;
            w.spawn(i, 0x1000 + i as u64, 1, silent, None);
        }
        w
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n  at {:?} (step {}), scenario {:?}\n  reproduce: AQE_SIM_SEED={} cargo test -p aqe-session --test simulation",
            self.now - self.start,
            self.step,
            self.sc,
            self.seed
        );
    }

    /// Starts host `i` (again): a new incarnation with fresh state.
    fn spawn(
        &mut self,
        i: usize,
        key: u64,
        incarnation: u64,
        silent: bool,
        impostor_of: Option<usize>,
    ) {
        let listen: SocketAddr =
            SocketAddr::from(([10, 0, 0, 1], 9000 + impostor_of.unwrap_or(i) as u16));
        let me = EndpointId::new(key, incarnation);
        let mut node = Node::new(me, Address::from(listen), self.config.clone());
        node.set_redelivery(self.sc.handler);
        let claimed = agent_id(impostor_of.unwrap_or(i));
        let reg = channels().into_iter().fold(
            Registration::new(claimed.clone(), "sim"),
            Registration::with_channel,
        );
        let (tx, rx) = inbox(claimed.clone(), INBOX);
        tx.set_slow_consumers(&channels());
        let mut hosted = HashMap::new();
        hosted.insert(
            claimed.clone(),
            reg.channels.iter().map(|c| c.name.clone()).collect(),
        );
        let actions = node.attach(reg).expect("attach");
        let host = Host {
            key,
            incarnation,
            alive: true,
            silent,
            impostor_of,
            listen,
            node,
            budget: Arc::new(Budgets::new(&self.config)),
            sessions: BTreeMap::new(),
            agents: vec![Agent {
                id: claimed,
                tx,
                rx,
                requests: VecDeque::new(),
            }],
            hosted: Hosted(hosted),
            routes: HashMap::new(),
            next_alive: self.now,
            greeter: Greeter::new(me, Duration::from_millis(100), Duration::from_millis(600)),
            attachment: 0,
            handing: Vec::new(),
            handler_acks: Arc::default(),
        };
        if i < self.hosts.len() {
            self.hosts[i] = host;
        } else {
            self.hosts.push(host);
        }
        self.apply(i, actions);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.hosts[a].alive
            && self.hosts[b].alive
            && self
                .partition
                .as_ref()
                .is_none_or(|p| p.contains(&a) == p.contains(&b))
    }

    fn send(&mut self, from: usize, to: usize, packet: Packet, link: Option<u64>) {
        self.order += 1;
        let order = self.order;
        let to_incarnation = self.hosts[to].incarnation;
        match (self.sc.wire, link) {
            (Wire::Links, Some(l)) => {
                let across = !self.reachable(from, to);
                let Some(link) = self.links.get_mut(&l) else {
                    return;
                };
                if !link.up {
                    return;
                }
                if across {
                    // A partition outlasting the transport's patience: the link is dead, and
                    // neither side is told (their sessions notice the silence).
                    link.up = false;
                    return;
                }
                let dir = usize::from(link.ends[0].0 != from);
                let base = self.now + Duration::from_millis(2);
                let at = base.max(link.last[dir]);
                link.last[dir] = at;
                let to_incarnation = link.ends[1 - dir].1;
                self.net.push(Reverse(InFlight {
                    at,
                    order,
                    to,
                    to_incarnation,
                    from,
                    packet,
                }));
            }
            _ => {
                // The lossy wire, or packets outside links (presence, the lossy hello).
                if !self.reachable(from, to) || self.rng.permille(self.sc.loss) {
                    return;
                }
                let copies = if self.rng.permille(self.sc.dup) { 2 } else { 1 };
                let mut packet = Some(packet);
                for c in 0..copies {
                    let at =
                        self.now + Duration::from_millis(1 + self.rng.below(self.sc.jitter + 1));
                    let p = if c + 1 == copies {
                        packet.take()
                    } else {
                        packet.as_ref().map(clone_packet)
                    };
                    if let Some(p) = p {
                        self.order += 1;
                        self.net.push(Reverse(InFlight {
                            at,
                            order: self.order,
                            to,
                            to_incarnation,
                            from,
                            packet: p,
                        }));
                    }
                }
            }
        }
    }

    fn hello_of(&self, i: usize, nonce: u64) -> Hello {
        let h = &self.hosts[i];
        Hello {
            version: SESSION_VERSION,
            endpoint: h.endpoint(),
            nonce,
            listen: Some(h.listen),
            token: None,
            window: self.config.window,
            session_bytes: self.config.session_bytes,
            heartbeat_ms: 100,
            liveness_ms: 600,
        }
    }

    // ----- links -----

    fn dial(&mut self, a: usize, b: usize) {
        let l = self.next_link;
        self.next_link += 1;
        self.links.insert(
            l,
            Link {
                ends: [
                    (a, self.hosts[a].incarnation),
                    (b, self.hosts[b].incarnation),
                ],
                last: [self.now; 2],
                up: true,
            },
        );
        let hello = self.hello_of(a, l);
        self.send(
            a,
            b,
            Packet::Hello {
                hello,
                reply: false,
                link: l,
            },
            Some(l),
        );
    }

    /// Link `l` closes; each end still using it sees it gone (`goodbye` from `closer`: it
    /// shut down).
    fn close_link(&mut self, l: u64, closer: Option<(usize, bool)>) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        if !link.up {
            return;
        }
        link.up = false;
        let ends = link.ends;
        for (h, inc) in ends {
            if Some(h) == closer.map(|c| c.0)
                || !self.hosts[h].alive
                || self.hosts[h].incarnation != inc
            {
                continue;
            }
            let why = if closer.is_some_and(|c| c.1) {
                Ended::Goodbye
            } else {
                Ended::LinkLost
            };
            for s in self.hosts[h]
                .sessions
                .values_mut()
                .filter(|s| s.link == Some(l))
            {
                s.session.end(why);
            }
            self.pump(h);
        }
    }

    /// A hello from `from` passed: what session it makes, on link `link` (links wire).
    fn on_hello(&mut self, h: usize, from: usize, hello: Hello, reply: bool, link: u64) {
        let me = self.hosts[h].endpoint();
        let verified = Some(self.hosts[from].key);
        let trust = match check_hello(&hello, me, None, verified) {
            Ok(t) => t,
            Err(e) => self.fail(&format!("a hello between honest hosts refused: {e}")),
        };
        let peer = hello.endpoint;
        match self.sc.wire {
            Wire::Links => {
                let initiator = if reply { me } else { peer };
                let rank = Rank {
                    initiator,
                    nonce: link,
                };
                if self
                    .open(h, from, &hello, rank, trust, Some(link))
                    .is_some()
                    && !reply
                {
                    let hello = self.hello_of(h, link);
                    self.send(
                        h,
                        from,
                        Packet::Hello {
                            hello,
                            reply: true,
                            link,
                        },
                        Some(link),
                    );
                }
            }
            Wire::Lossy => {
                let current = self.session_with(h, &peer).map(|s| s.session.rank());
                let greetings = self.hosts[h]
                    .greeter
                    .on_hello(peer, hello.nonce, reply, current);
                let mut refused = false;
                for g in greetings {
                    match g {
                        Greeting::Open { rank, .. } => {
                            refused = self.open(h, from, &hello, rank, trust, None).is_none();
                        }
                        Greeting::Hello { nonce, reply, .. } if !refused => {
                            let hello = self.hello_of(h, nonce);
                            self.send(
                                h,
                                from,
                                Packet::Hello {
                                    hello,
                                    reply,
                                    link: 0,
                                },
                                None,
                            );
                        }
                        Greeting::Hello { .. } => {}
                    }
                }
            }
        }
        self.pump(h);
    }

    /// Opens the session of `rank`; `None` when the node refuses it (a living session of
    /// smaller rank is kept, and probed).
    fn open(
        &mut self,
        h: usize,
        from: usize,
        hello: &Hello,
        rank: Rank,
        trust: Trust,
        link: Option<u64>,
    ) -> Option<SessionId> {
        let listen = hello.listen;
        let address = Address::from(listen.unwrap_or(self.hosts[from].listen));
        let opened = self.hosts[h]
            .node
            .open(hello.endpoint, rank, trust, listen, address);
        if std::env::var("AQE_SIM_FRAMES").is_ok() {
            eprintln!(
                "[{:?}] host {h} open {:?} rank {rank:?}: {}",
                self.now - self.start,
                hello.endpoint,
                match &opened {
                    Opened::Fresh { id, .. } => format!("fresh {id}"),
                    Opened::Existing(id) => format!("existing {id}"),
                    Opened::Refused(id) => format!("refused by {id}"),
                }
            );
        }
        match opened {
            Opened::Fresh { id, actions } => {
                self.apply(h, actions);
                let s = Session::new(
                    id,
                    rank,
                    hello,
                    trust,
                    self.config.clone(),
                    self.hosts[h].budget.clone(),
                    self.now,
                );
                self.hosts[h].sessions.insert(
                    id,
                    SimSession {
                        session: s,
                        peer: from,
                        link,
                        acks: Arc::default(),
                        entered: HashMap::new(),
                    },
                );
                self.hosts[h].greeter.forget(&hello.endpoint);
                Some(id)
            }
            Opened::Existing(id) => Some(id),
            Opened::Refused(current) => {
                let now = self.now;
                if let Some(s) = self.hosts[h].sessions.get_mut(&current) {
                    let _ = s.session.handle(SessionInput::Probe, now);
                }
                if let Some(l) = link {
                    self.close_link(l, Some((h, false)));
                    self.close_link(l, None);
                }
                None
            }
        }
    }

    fn session_with(&self, h: usize, peer: &EndpointId) -> Option<&SimSession> {
        let sid = self.hosts[h].node.session_of(peer)?;
        self.hosts[h]
            .sessions
            .get(&sid)
            .filter(|s| s.session.is_linked())
    }

    // ----- performing what comes out -----

    fn apply(&mut self, h: usize, actions: Vec<Action<usize>>) {
        let mut queue: VecDeque<Action<usize>> = actions.into();
        while let Some(a) = queue.pop_front() {
            let now = self.now;
            match a {
                Action::Session(sid, input) => {
                    let redelivered: Vec<usize> = match &input {
                        SessionInput::Redeliver(msgs) => msgs
                            .iter()
                            .filter_map(|m| self.ledger.by_id.get(&m.envelope().ok()?.id).copied())
                            .collect(),
                        _ => Vec::new(),
                    };
                    if std::env::var("AQE_SIM_ROUTES").is_ok() && !redelivered.is_empty() {
                        eprintln!(
                            "[{:?}] host {h} {sid}: redeliver {redelivered:?}",
                            self.now - self.start
                        );
                    }
                    let Some(s) = self.hosts[h].sessions.get_mut(&sid) else {
                        continue;
                    };
                    if let Err(back) = s.session.handle(input, now) {
                        self.hosts[h].node.requeue(back);
                        continue;
                    }
                    for i in redelivered {
                        self.entered(h, sid, i, "redelivered");
                    }
                }
                Action::Route { agent, to } => {
                    if std::env::var("AQE_SIM_ROUTES").is_ok() {
                        eprintln!(
                            "[{:?}] host {h} route {agent} {}",
                            self.now - self.start,
                            to.is_some()
                        );
                    }
                    let routes = &mut self.hosts[h].routes;
                    let published = matches!(to, Some(Route::Session { .. }));
                    match to {
                        Some(r) => {
                            routes.insert(agent.clone(), r);
                        }
                        None => {
                            routes.remove(&agent);
                        }
                    }
                    // Senders run beside the node: one may use a route the moment it is
                    // published, before the node's next action (aqe-link applies them one
                    // by one while agents send).
                    if published
                        && self.sending
                        && self.rng.permille(300)
                        && let Some(target) =
                            (0..self.sc.hosts).find(|t| self.hosts[*t].agents[0].id == agent)
                    {
                        self.traffic_to(h, target, false);
                    }
                }
                Action::Publish(_) => {}
                Action::Dial { addr, .. } => {
                    if self.sc.wire == Wire::Links
                        && let Some(b) = self.resolve(addr)
                        && self.reachable(h, b)
                        && !self.linked(h, b)
                    {
                        self.dial(h, b);
                    }
                }
                Action::HandOff(to) => {
                    if std::env::var("AQE_SIM_ROUTES").is_ok() {
                        eprintln!("[{:?}] host {h} hand-off {to}", self.now - self.start);
                    }
                    if !self.sc.handler {
                        self.fail("a hand-off without a redelivery handler");
                    }
                    if self.hosts[h].handing.iter().any(|x| x.to == to) {
                        self.fail(&format!("two hand-offs for {to} at once"));
                    }
                    self.hosts[h].handing.push(Handing { to, current: None });
                }
                Action::Settled(list) => {
                    for s in list {
                        self.settled(s.ctx, s.outcome);
                    }
                }
                Action::Forget(sid) => {
                    if std::env::var("AQE_SIM_FRAMES").is_ok() {
                        eprintln!("[{:?}] host {h} forget {sid}", self.now - self.start);
                    }
                    self.hosts[h].sessions.remove(&sid);
                }
            }
        }
    }

    /// Who answers at `addr`: the host listening there (an impostor claims a victim's
    /// address; only one of them can have bound it: the victim while it lives).
    fn resolve(&self, addr: SocketAddr) -> Option<usize> {
        let listeners: Vec<usize> = (0..self.hosts.len())
            .filter(|i| self.hosts[*i].alive && self.hosts[*i].listen == addr)
            .collect();
        listeners
            .iter()
            .copied()
            .find(|i| self.hosts[*i].impostor_of.is_none())
            .or(listeners.first().copied())
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.links.values().any(|l| {
            l.up && ((l.ends[0].0 == a && l.ends[1].0 == b)
                || (l.ends[0].0 == b && l.ends[1].0 == a))
        })
    }

    fn note(&self, i: usize, what: &str) {
        if self.trace.is_some_and(|(a, b)| (a..=b).contains(&i)) {
            let m = self.ledger.sent.get(i);
            eprintln!(
                "[{:?}] message {i} (from {:?} to {:?} #{:?}): {what}",
                self.now - self.start,
                m.map(|m| m.from),
                m.map(|m| m.to.clone()),
                m.and_then(|m| m.ordered)
            );
        }
    }

    fn settled(&mut self, i: usize, outcome: Outcome) {
        self.note(i, &format!("settled {outcome:?}"));
        let now = self.now;
        let deadline = self.config.delivery_deadline;
        let m = &mut self.ledger.sent[i];
        if let Some((o, _)) = m.outcome {
            let what = format!("message {i} settled twice: {o:?} then {outcome:?}");
            self.fail(&what);
        }
        m.outcome = Some((outcome, now));
        if now > m.accepted + deadline + Duration::from_millis(1) {
            let late = now - (m.accepted + deadline);
            self.fail(&format!("message {i} settled {late:?} after its deadline"));
        }
        match outcome {
            Outcome::Taken if m.taken_by.is_empty() => {
                self.fail(&format!("message {i} confirmed but never taken"))
            }
            Outcome::Failed(
                DeliveryFailure::Unreachable
                | DeliveryFailure::ReceiverStopped
                | DeliveryFailure::Refused
                | DeliveryFailure::Expired
                | DeliveryFailure::Dropped,
            ) if !m.taken_by.is_empty() => {
                let what = format!("message {i} taken but reported {outcome:?}");
                self.fail(&what);
            }
            Outcome::Failed(DeliveryFailure::Dropped) if !m.droppable => {
                let what = format!("message {i} dropped on a channel that blocks");
                self.fail(&what);
            }
            Outcome::Failed(DeliveryFailure::Expired)
                if m.ttl.is_none_or(|ttl| now < m.accepted + ttl) =>
            {
                let what = format!("message {i} reported expired before its TTL ({:?})", m.ttl);
                self.fail(&what);
            }
            _ => {}
        }
    }

    /// Drains what host `h`'s sessions and node want done, until nothing is left.
    fn pump(&mut self, h: usize) {
        if !self.hosts[h].alive {
            return;
        }
        loop {
            let mut progress = false;
            // Receipts settled by agents.
            let now = self.now;
            for s in self.hosts[h].sessions.values_mut() {
                let acks: Vec<(u64, Got)> = std::mem::take(&mut *s.acks.0.lock().expect("lock"));
                for (seq, got) in acks {
                    progress = true;
                    match got {
                        Got::Taken => s.session.taken(seq, now),
                        Got::Abandoned => s.session.abandoned(seq, now),
                        Got::Dropped => s.session.dropped(seq, now),
                    }
                }
            }
            let sids: Vec<SessionId> = self.hosts[h].sessions.keys().copied().collect();
            for sid in sids {
                while let Some(ev) = self.hosts[h]
                    .sessions
                    .get_mut(&sid)
                    .and_then(|s| s.session.poll_event())
                {
                    progress = true;
                    self.event(h, sid, ev);
                }
                while let Some((t, peer, link, to, nonce)) =
                    self.hosts[h].sessions.get_mut(&sid).and_then(|s| {
                        let t = s.session.poll_transmit()?;
                        Some((t, s.peer, s.link, s.session.peer(), s.session.rank().nonce))
                    })
                {
                    progress = true;
                    let from = self.hosts[h].endpoint();
                    let mut buf = BytesMut::new();
                    if t.encode(&mut buf).is_err() {
                        self.fail("a frame does not encode");
                    }
                    if self.sc.wire == Wire::Links && link.is_none() {
                        continue;
                    }
                    let packet = Packet::Frame {
                        bytes: buf.freeze(),
                        link: link.unwrap_or(0),
                        from,
                        to,
                        session: nonce,
                    };
                    self.send(h, peer, packet, link);
                }
            }
            if !progress {
                break;
            }
        }
    }

    fn event(&mut self, h: usize, sid: SessionId, ev: SessionEvent<Sim>) {
        let now = self.now;
        match ev {
            SessionEvent::Deliver { to, seq, envelope } => {
                let key = self.hosts[h].key;
                if let Some(&i) = self.ledger.by_id.get(&envelope.id)
                    && seq.is_some()
                {
                    self.note(i, &format!("delivered to {to} at host {h} (key {key:x}), seq {seq:?}, session {sid}"));
                    let m = &mut self.ledger.sent[i];
                    m.delivered.insert(key);
                    let (n, keys, addressee) =
                        (m.delivered.len(), m.delivered.clone(), m.to.clone());
                    if n > 1 {
                        self.fail(&format!(
                            "message {i} delivered to two principals: {keys:?}"
                        ));
                    }
                    if addressee != to {
                        self.fail(&format!("message {i} for {addressee} delivered to {to}"));
                    }
                }
                let Some(agent) = self.hosts[h].agents.iter().find(|a| a.id == to) else {
                    self.fail("a delivery to an agent not hosted here");
                };
                let receipt = match seq {
                    Some(seq) => {
                        let acks = self.hosts[h].sessions[&sid].acks.clone();
                        Receipt::shared(acks, seq)
                    }
                    None => Receipt::none(),
                };
                if let Err((_, item)) = agent
                    .tx
                    .deliver_now(Inbound::Message { envelope, receipt }, || {})
                {
                    item.abandon();
                }
            }
            SessionEvent::Request { to, envelope } => {
                let inc = self.hosts[h].incarnation;
                let Some(&i) = self.ledger.by_id.get(&envelope.id) else {
                    return;
                };
                let r = &mut self.ledger.requests[i];
                if r.ran.contains(&(h, inc)) {
                    self.fail(&format!("request {i} ran twice in one incarnation"));
                }
                r.ran.push((h, inc));
                if let Some(a) = self.hosts[h].agents.iter_mut().find(|a| a.id == to) {
                    a.requests.push_back((sid, envelope.id, i));
                }
            }
            SessionEvent::Cancelled { id } => {
                for a in &mut self.hosts[h].agents {
                    a.requests.retain(|(s, r, _)| !(*s == sid && *r == id));
                }
            }
            SessionEvent::Settled(s) => self.settled(s.ctx, s.outcome),
            SessionEvent::Answered { req, answer, .. } => {
                let r = &mut self.ledger.requests[req];
                r.answered += 1;
                if r.answered > 1 {
                    self.fail(&format!("request {req} answered twice"));
                }
                if let Answer::Response(e) = answer
                    && r.ran.is_empty()
                {
                    self.fail(&format!(
                        "request {req} answered ({:?}) without running",
                        e.kind
                    ));
                }
            }
            SessionEvent::Room => {}
            SessionEvent::Node(input) => {
                if std::env::var("AQE_SIM_ROUTES").is_ok() {
                    let what = match &input {
                        aqe_session::NodeInput::Ended { orphans, why, .. } => {
                            format!("ended ({why:?}), {} orphans", orphans.len())
                        }
                        aqe_session::NodeInput::Displaced { orphans } => {
                            format!("{} displaced", orphans.len())
                        }
                        other => format!("{:?}", std::mem::discriminant(other)),
                    };
                    eprintln!("[{:?}] host {h} {sid}: {what}", self.now - self.start);
                }
                // When messages came back to the node: a newer one of their flow that goes
                // into a session after this must not go before them (see `entered`).
                if let aqe_session::NodeInput::Ended { orphans, .. }
                | aqe_session::NodeInput::Displaced { orphans } = &input
                {
                    self.ledger.tick += 1;
                    for o in orphans {
                        if let Some(&i) =
                            o.envelope().ok().and_then(|e| self.ledger.by_id.get(&e.id))
                        {
                            self.ledger.sent[i].returned = self.ledger.tick;
                        }
                    }
                }
                let actions = self.hosts[h].node.on(sid, input, now);
                self.apply(h, actions);
            }
            SessionEvent::Close(why) => {
                let link = self.hosts[h].sessions.get(&sid).and_then(|s| s.link);
                if let Some(l) = link {
                    let goodbye = why == Ended::Shutdown;
                    self.close_link(l, Some((h, goodbye)));
                }
            }
        }
    }

    // ----- inputs -----

    fn deliver(&mut self, p: InFlight) {
        let h = p.to;
        if !self.hosts[h].alive || self.hosts[h].incarnation != p.to_incarnation {
            return;
        }
        let now = self.now;
        match p.packet {
            Packet::Hello { hello, reply, link } => {
                if self.sc.wire == Wire::Links && !self.links.get(&link).is_some_and(|l| l.up) {
                    return;
                }
                self.on_hello(h, p.from, hello, reply, link);
            }
            Packet::Frame {
                bytes,
                link,
                from,
                to,
                session,
            } => {
                if to != self.hosts[h].endpoint() {
                    return;
                }
                let frame: Frame = match postcard::from_bytes(&bytes) {
                    Ok(f) => f,
                    Err(e) => self.fail(&format!("a frame does not decode: {e}")),
                };
                if std::env::var("AQE_SIM_FRAMES").is_ok() {
                    eprintln!(
                        "[{:?}] host {h} from {} session {session}: {frame:?}",
                        now - self.start,
                        p.from
                    );
                }
                let current = self.hosts[h].node.session_of(&from);
                let matches = current
                    .and_then(|sid| self.hosts[h].sessions.get(&sid))
                    .is_some_and(|s| match self.sc.wire {
                        Wire::Links => s.link == Some(link),
                        Wire::Lossy => s.session.rank().nonce == session,
                    });
                if !matches {
                    if std::env::var("AQE_SIM_FRAMES").is_ok() {
                        eprintln!(
                            "[{:?}] host {h} from {} stale frame (session {session})",
                            now - self.start,
                            p.from
                        );
                    }
                    if self.sc.wire == Wire::Lossy
                        && !self.hosts[h].greeter.is_pending(&from, session)
                    {
                        let me = self.hosts[h].endpoint();
                        self.send(
                            h,
                            p.from,
                            Packet::Reset {
                                from: me,
                                to: from,
                                session,
                            },
                            None,
                        );
                    }
                    return;
                }
                let Some(sid) = current else { return };
                if std::env::var("AQE_SIM_FRAMES").is_ok() {
                    let name = format!("{frame:?}");
                    eprintln!(
                        "[{:?}] host {h} from {} {}",
                        now - self.start,
                        p.from,
                        &name[..name.len().min(90)]
                    );
                }
                let host = &mut self.hosts[h];
                let Some(s) = host.sessions.get_mut(&sid) else {
                    return;
                };
                if let Err(rule) = s.session.on_frame(frame, now, &host.hosted) {
                    self.fail(&format!("an honest peer's frame broke a rule: {rule}"));
                }
                self.pump(h);
            }
            Packet::Reset { from, to, session } => {
                if to != self.hosts[h].endpoint() {
                    return;
                }
                if let Some(sid) = self.hosts[h].node.session_of(&from)
                    && let Some(s) = self.hosts[h].sessions.get_mut(&sid)
                    && s.session.rank().nonce == session
                {
                    s.session.end(Ended::Reset);
                    self.pump(h);
                }
            }
            Packet::Alive { from, generation } => {
                if std::env::var("AQE_SIM_FRAMES").is_ok() {
                    eprintln!(
                        "[{:?}] host {h} from {} Alive {generation} (session {:?})",
                        now - self.start,
                        p.from,
                        self.hosts[h].node.session_of(&from)
                    );
                }
                match self.hosts[h].node.session_of(&from) {
                    Some(sid)
                        if self.hosts[h]
                            .sessions
                            .get(&sid)
                            .is_some_and(|s| s.session.is_linked()) =>
                    {
                        if let Some(s) = self.hosts[h].sessions.get_mut(&sid) {
                            s.session.alive(generation, now);
                        }
                        self.pump(h);
                    }
                    _ => {
                        // A new endpoint (or a session that ended): a handshake.
                        let nonce = self.rng.next() | 1;
                        if let Some(Greeting::Hello { nonce, .. }) =
                            self.hosts[h].greeter.greet(from, nonce, now)
                        {
                            let hello = self.hello_of(h, nonce);
                            self.send(
                                h,
                                p.from,
                                Packet::Hello {
                                    hello,
                                    reply: false,
                                    link: 0,
                                },
                                None,
                            );
                        }
                    }
                }
            }
            Packet::Gone { from } => {
                if let Some(sid) = self.hosts[h].node.session_of(&from)
                    && let Some(s) = self.hosts[h].sessions.get_mut(&sid)
                {
                    s.session.end(Ended::Goodbye);
                    self.pump(h);
                }
            }
        }
    }

    /// Fires what is due; what comes out may make other timers due at once (a redelivery
    /// already past its deadline), so a few rounds run. A timer still due after them does
    /// not move forward: a bug.
    fn timers(&mut self) {
        for round in 0..4 {
            let mut fired = false;
            for h in 0..self.hosts.len() {
                fired |= self.fire(h);
            }
            if !fired {
                return;
            }
            if round == 3 {
                for host in self.hosts.iter().filter(|h| h.alive) {
                    for s in host.sessions.values() {
                        if s.session.poll_timeout().is_some_and(|t| t <= self.now) {
                            self.fail(&format!(
                                "a session's timer does not move forward ({:?})",
                                s.session
                            ));
                        }
                    }
                    if host.node.poll_timeout().is_some_and(|t| t <= self.now) {
                        self.fail("the node's timer does not move forward");
                    }
                }
            }
        }
    }

    fn fire(&mut self, h: usize) -> bool {
        let now = self.now;
        if !self.hosts[h].alive {
            return false;
        }
        let mut fired = false;
        let host = &mut self.hosts[h];
        for s in host.sessions.values_mut() {
            if s.session.poll_timeout().is_some_and(|t| t <= now) {
                s.session.handle_timeout(now, &host.hosted);
                fired = true;
            }
        }
        if host.node.poll_timeout().is_some_and(|t| t <= now) {
            let actions = host.node.handle_timeout(now);
            self.apply(h, actions);
            fired = true;
        }
        if self.hosts[h]
            .greeter
            .poll_timeout()
            .is_some_and(|t| t <= now)
        {
            fired = true;
            for g in self.hosts[h].greeter.handle_timeout(now) {
                if let Greeting::Hello { to, nonce, reply } = g
                    && let Some(b) = (0..self.hosts.len())
                        .find(|b| self.hosts[*b].alive && self.hosts[*b].endpoint() == to)
                {
                    let hello = self.hello_of(h, nonce);
                    self.send(
                        h,
                        b,
                        Packet::Hello {
                            hello,
                            reply,
                            link: 0,
                        },
                        None,
                    );
                }
            }
        }
        self.pump(h);
        fired
    }

    fn next_timer(&self) -> Option<Instant> {
        self.hosts
            .iter()
            .filter(|h| h.alive)
            .flat_map(|h| {
                h.sessions
                    .values()
                    .filter_map(|s| s.session.poll_timeout())
                    .chain(h.node.poll_timeout())
                    .chain(h.greeter.poll_timeout())
                    .chain(h.handing.iter().filter_map(|x| {
                        let (o, _) = x.current.as_ref()?;
                        Some(o.accepted() + self.config.delivery_deadline)
                    }))
            })
            .chain(self.flights.iter().map(|f| f.at))
            .min()
    }

    /// Moves the hand-offs on (see [`Handing`]).
    fn hand_offs(&mut self) {
        let deadline = self.config.delivery_deadline;
        let now = self.now;
        let (due, later): (Vec<Flight>, Vec<Flight>) = std::mem::take(&mut self.flights)
            .into_iter()
            .partition(|f| f.at <= now);
        self.flights = later;
        for f in due {
            let (b, inc) = f.to;
            let agent = self.hosts[b]
                .agents
                .iter()
                .find(|a| a.id == f.agent)
                .filter(|_| self.hosts[b].alive && self.hosts[b].incarnation == inc);
            match agent {
                Some(agent) => {
                    if let Err((_, item)) = agent.tx.deliver_now(f.item, || {}) {
                        item.abandon();
                    }
                }
                // Its receiver is gone: the other transport says it could not deliver.
                None => f.item.abandon(),
            }
        }
        for h in 0..self.hosts.len() {
            if !self.hosts[h].alive || self.hosts[h].handing.is_empty() {
                continue;
            }
            let acks: Vec<(u64, Got)> =
                std::mem::take(&mut *self.hosts[h].handler_acks.0.lock().expect("lock"));
            let mut handing = std::mem::take(&mut self.hosts[h].handing);
            let mut ended = Vec::new();
            for x in &mut handing {
                if let Some((orphan, token)) = x.current.take() {
                    match acks.iter().find(|(t, _)| *t == token) {
                        Some((_, Got::Taken)) => {
                            let s = orphan.taken();
                            self.settled(s.ctx, s.outcome);
                        }
                        // Not delivered by the other transport either way (aqe-link's handler
                        // gets an error and gives the message back).
                        Some((_, Got::Dropped | Got::Abandoned)) => {
                            self.hosts[h].node.give_back(orphan);
                            ended.push(x.to.clone());
                            continue;
                        }
                        None if self.now >= orphan.accepted() + deadline => {
                            let s = orphan.failed(DeliveryFailure::Unconfirmed);
                            self.settled(s.ctx, s.outcome);
                        }
                        None => {
                            x.current = Some((orphan, token));
                            continue;
                        }
                    }
                }
                let mut late = Vec::new();
                let orphan = self.hosts[h].node.take_orphan(&x.to, &mut late);
                for s in late {
                    self.settled(s.ctx, s.outcome);
                }
                let Some(orphan) = orphan else {
                    ended.push(x.to.clone());
                    continue;
                };
                let holder = (0..self.hosts.len()).find(|&b| {
                    self.hosts[b].impostor_of.is_none()
                        && self.hosts[b].hosted.0.contains_key(&x.to)
                        && self.reachable(h, b)
                });
                let Some(b) = holder.filter(|_| self.rng.permille(800)) else {
                    self.hosts[h].node.give_back(orphan);
                    ended.push(x.to.clone());
                    continue;
                };
                self.handed += 1;
                self.next_token += 1;
                let token = self.next_token;
                let envelope = orphan.envelope().expect("an orphan decodes");
                if envelope.to != Recipient::Agent(x.to.clone()) {
                    self.fail(&format!(
                        "an orphan for {} addressed {:?}",
                        x.to, envelope.to
                    ));
                }
                if let Some(&i) = self.ledger.by_id.get(&envelope.id) {
                    self.note(i, &format!("handed to the handler for host {b}"));
                }
                let receipt = Receipt::shared(self.hosts[h].handler_acks.clone(), token);
                // Another transport takes its own time, which may be more than a link's.
                self.flights.push(Flight {
                    at: self.now + self.rng.ms(0, 5),
                    to: (b, self.hosts[b].incarnation),
                    agent: x.to.clone(),
                    item: Inbound::Message { envelope, receipt },
                });
                x.current = Some((orphan, token));
            }
            handing.retain(|x| !ended.contains(&x.to));
            handing.append(&mut self.hosts[h].handing);
            self.hosts[h].handing = handing;
            for to in ended {
                let actions = self.hosts[h].node.hand_off_ended(&to);
                self.apply(h, actions);
            }
            self.pump(h);
        }
    }

    // ----- agents and chaos -----

    fn take(&mut self) {
        for h in 0..self.hosts.len() {
            if !self.hosts[h].alive || self.hosts[h].silent {
                continue;
            }
            let inc = self.hosts[h].incarnation;
            // An agent that left and came back is a new instance: what its earlier one
            // took may come again, marked redelivered.
            let attachment = self.hosts[h].attachment;
            let n = self.rng.below(4);
            for _ in 0..n {
                let Some(item) = self.hosts[h].agents[0].rx.try_recv() else {
                    break;
                };
                if let Inbound::Message { envelope, receipt } = item {
                    if let Some(&i) = self.ledger.by_id.get(&envelope.id) {
                        self.note(i, &format!("taken at host {h} incarnation {inc}"));
                        let to = self.ledger.sent[i].to.clone();
                        let m = &mut self.ledger.sent[i];
                        if m.taken_by.contains(&(h, inc, attachment)) {
                            self.fail(&format!("message {i} taken twice by one incarnation"));
                        }
                        m.taken_by.push((h, inc, attachment));
                        if let Some(k) = m.ordered {
                            let last = self
                                .ledger
                                .taken_order
                                .entry((envelope.from.clone(), to, h, inc, attachment))
                                .or_insert(0);
                            if k <= *last {
                                let what = format!(
                                    "ordered message #{k} (ledger {i}) taken after #{last}"
                                );
                                self.fail(&what);
                            }
                            *last = k;
                        }
                    }
                    drop(receipt);
                }
            }
            // Answer requests taken.
            let now = self.now;
            while let Some((sid, id, _)) = self.hosts[h].agents[0].requests.pop_front() {
                let me = self.hosts[h].agents[0].id.clone();
                if let Some(s) = self.hosts[h].sessions.get_mut(&sid) {
                    let reply = Envelope::new(
                        me,
                        Recipient::Fleet,
                        "results".into(),
                        MessageKind::Response,
                        Bytes::new(),
                    )
                    .correlated(id);
                    let _ = s.session.answer(id, Ok(reply));
                }
                let _ = now;
            }
            self.pump(h);
        }
    }

    fn traffic(&mut self, h: usize) {
        if !self.hosts[h].alive || self.hosts[h].impostor_of.is_some() {
            return;
        }
        if !self.hosts[h]
            .hosted
            .0
            .contains_key(&self.hosts[h].agents[0].id)
        {
            // Its agent is away.
            return;
        }
        let n = self.sc.hosts;
        let target = self.rng.below(n as u64) as usize;
        if target == h {
            return;
        }
        self.traffic_to(h, target, true);
    }

    /// An ordered message `i` went into session `sid` of host `h`: no newer message of its
    /// flow may have gone in since it came back to the node (orphaned, or refused), for what
    /// is sent again goes "in order and before anything newer" (the README). A newer one that
    /// went in before that was on its way already: the session fails the older one rather
    /// than deliver it out of order.
    fn entered(&mut self, h: usize, sid: SessionId, i: usize, how: &str) {
        self.ledger.tick += 1;
        let tick = self.ledger.tick;
        let m = &self.ledger.sent[i];
        let (Some(k), to, returned) = (m.ordered, m.to.clone(), m.returned) else {
            return;
        };
        let Some(s) = self.hosts[h].sessions.get_mut(&sid) else {
            return;
        };
        let entered = s.entered.entry(to).or_default();
        if let Some((_, newer)) = entered.iter().find(|(t, n)| *t > returned && *n > k) {
            let what = format!(
                "message {i} (#{k} of its flow) {how} into session {sid} after #{newer}, sent after it came back"
            );
            self.fail(&what);
        }
        entered.push((tick, k));
    }

    /// Host `h`'s agent sends to host `target`'s agent, if it has a route; `pump`: and the
    /// host runs what that leads to (not while the node's actions are being applied).
    fn traffic_to(&mut self, h: usize, target: usize, pump: bool) {
        if !self.hosts[h].alive || self.hosts[h].impostor_of.is_some() || target == h {
            return;
        }
        if !self.hosts[h]
            .hosted
            .0
            .contains_key(&self.hosts[h].agents[0].id)
        {
            return;
        }
        let to = agent_id(target);
        let from = self.hosts[h].agents[0].id.clone();
        let Some(Route::Session { session, .. }) = self.hosts[h].routes.get(&to).cloned() else {
            return;
        };
        let now = self.now;
        if self.rng.permille(150) {
            // A request.
            let i = self.ledger.requests.len();
            let envelope = Envelope::new(
                from,
                Recipient::Agent(to),
                "results".into(),
                MessageKind::Request,
                Bytes::from_static(b"q"),
            );
            self.ledger.by_id.insert(envelope.id, i);
            self.ledger.requests.push(SentReq {
                answered: 0,
                ran: Vec::new(),
            });
            let Some(s) = self.hosts[h].sessions.get_mut(&session) else {
                return;
            };
            if s.session.request(envelope, i).is_err() {
                self.ledger.requests[i].answered = 1;
            }
            if pump {
                self.pump(h);
            }
            return;
        }
        let ordered = self.rng.permille(600);
        let channel: ChannelName = if ordered {
            "coordination".into()
        } else if self.rng.permille(250) {
            DROPS.into()
        } else {
            "results".into()
        };
        // Now and then a batch (`send_many`): admitted as far as the window has room.
        let count = if self.rng.permille(200) {
            2 + self.rng.below(5) as usize
        } else {
            1
        };
        let confirm = self.rng.permille(100);
        // Now and then a time-to-live, within the delivery deadline or beyond it.
        let ttl = self
            .rng
            .permille(150)
            .then(|| Duration::from_millis(20 + self.rng.below(3_000)));
        let first = self.ledger.sent.len();
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        let mut fans = Vec::new();
        for j in 0..count {
            let len = [1, 16, 300, 900][self.rng.below(4) as usize];
            let mut envelope = Envelope::new(
                from.clone(),
                Recipient::Agent(to.clone()),
                channel.clone(),
                MessageKind::Direct,
                Bytes::from(vec![7u8; len]),
            );
            if let Some(ttl) = ttl {
                envelope.ttl = Some(ttl);
                // Inboxes judge a TTL by the wall clock from `timestamp`: dated far ahead, no
                // inbox ever expires it, and only the session's simulated time does.
                envelope.timestamp = aqe_core::Timestamp(u64::MAX / 2);
            }
            // The wall clock only shortens a TTL by the envelope's age: none here (see above).
            let Ok((mut meta, mut body)) =
                outgoing(&envelope, ordered, confirm && count == 1, || {
                    aqe_core::Timestamp(0)
                })
            else {
                self.fail("outgoing");
            };
            // Now and then as a broadcast's copy: its envelope encoded for the whole fleet,
            // framed as a fanout that names its agent.
            if !meta.confirm && self.rng.permille(200) {
                let mut shared = envelope.clone();
                shared.to = Recipient::Fleet;
                meta = fanout_meta(&shared, to.clone(), ordered, || aqe_core::Timestamp(0));
                body = aqe_core::encode_envelope(&shared).expect("encode");
            }
            fans.push(meta.fanout);
            ids.push(envelope.id);
            batch.push((meta, body, first + j));
        }
        let Some(s) = self.hosts[h].sessions.get_mut(&session) else {
            return;
        };
        let accepted = if count == 1 {
            let (meta, body, i) = batch.pop().expect("one");
            match s.session.send(meta, body, i, now) {
                Ok(()) => 1,
                Err(NotSent::Full(_) | NotSent::Unlinked(_)) => 0,
            }
        } else {
            let mut batch = batch.into_iter().peekable();
            s.session
                .send_many(&mut batch, now)
                .map_or(0, |(taken, _)| taken)
        };
        for (j, id) in ids.into_iter().take(accepted).enumerate() {
            let i = first + j;
            self.ledger.fanouts += u64::from(fans[j]);
            self.note(i, &format!("accepted, ttl {ttl:?}"));
            let ordered = ordered.then(|| {
                let c = self
                    .ledger
                    .flows
                    .entry((from.clone(), to.clone()))
                    .or_insert(0);
                *c += 1;
                *c
            });
            self.ledger.by_id.insert(id, i);
            let inc = self.hosts[h].incarnation;
            self.ledger.sent.push(SentMsg {
                from: (h, inc),
                orphaned: false,
                to: to.clone(),
                ordered,
                droppable: channel.as_ref() == DROPS,
                accepted: now,
                ttl,
                outcome: None,
                delivered: BTreeSet::new(),
                returned: 0,
                taken_by: Vec::new(),
            });
            self.entered(h, session, i, "sent");
        }
        if pump {
            self.pump(h);
        }
    }

    fn chaos(&mut self, traffic_on: bool) {
        let r = self.rng.below(1000);
        let n = self.hosts.len();
        if traffic_on && self.sc.crashes && r < 6 {
            let h = self.rng.below(self.sc.hosts as u64) as usize;
            if self.hosts[h].alive {
                self.crash(h);
            } else {
                self.restart(h);
            }
        } else if traffic_on && self.sc.shutdowns && r < 9 {
            let h = self.rng.below(self.sc.hosts as u64) as usize;
            if self.hosts[h].alive {
                self.shutdown(h);
            }
        } else if traffic_on && self.sc.partitions && r < 14 {
            if self.partition.is_some() {
                self.partition = None;
            } else {
                let side: BTreeSet<usize> = (0..n).filter(|_| self.rng.permille(500)).collect();
                self.partition = Some(side);
            }
        } else if traffic_on && self.sc.churn && r < 17 {
            let h = self.rng.below(self.sc.hosts as u64) as usize;
            if self.hosts[h].alive {
                self.churn(h);
            }
        } else if traffic_on && self.sc.link_breaks && r < 20 {
            let ups: Vec<u64> = self
                .links
                .iter()
                .filter(|(_, l)| l.up)
                .map(|(k, _)| *k)
                .collect();
            if !ups.is_empty() {
                let l = ups[self.rng.below(ups.len() as u64) as usize];
                self.close_link(l, None);
            }
        }
        // Agents away come back.
        for h in 0..self.sc.hosts {
            let away = !self.hosts[h]
                .hosted
                .0
                .contains_key(&self.hosts[h].agents[0].id);
            if self.hosts[h].alive && away && self.rng.permille(if traffic_on { 30 } else { 200 }) {
                self.churn(h);
            }
        }
        // Dead hosts come back.
        for h in 0..self.sc.hosts {
            if !self.hosts[h].alive && self.rng.permille(if traffic_on { 30 } else { 200 }) {
                self.restart(h);
            }
        }
    }

    /// Host `h`'s agent leaves (what its inbox holds is given back unprocessed) or comes
    /// back.
    fn churn(&mut self, h: usize) {
        let id = self.hosts[h].agents[0].id.clone();
        let here = self.hosts[h].hosted.0.contains_key(&id);
        if here {
            let Some(actions) = self.hosts[h].node.detach(&id) else {
                return;
            };
            self.hosts[h].hosted.0.remove(&id);
            let (tx, rx) = inbox(id.clone(), INBOX);
            tx.set_slow_consumers(&channels());
            let agent = &mut self.hosts[h].agents[0];
            agent.tx = tx;
            let mut old = std::mem::replace(&mut agent.rx, rx);
            let key = self.hosts[h].key;
            while let Some(item) = old.try_recv() {
                if let Inbound::Message { envelope, .. } = &item
                    && let Some(&i) = self.ledger.by_id.get(&envelope.id)
                {
                    self.note(i, &format!("given back unprocessed by host {h}"));
                    self.ledger.sent[i].delivered.remove(&key);
                }
                // Refused (`Stopped`), as an agent that stops refuses what it holds.
                item.abandon();
            }
            self.apply(h, actions);
        } else {
            let reg = channels().into_iter().fold(
                Registration::new(id.clone(), "sim"),
                Registration::with_channel,
            );
            self.hosts[h]
                .hosted
                .0
                .insert(id, reg.channels.iter().map(|c| c.name.clone()).collect());
            let Ok(actions) = self.hosts[h].node.attach(reg) else {
                return;
            };
            self.hosts[h].attachment += 1;
            self.apply(h, actions);
        }
        self.pump(h);
    }

    fn crash(&mut self, h: usize) {
        self.hosts[h].alive = false;
        let inc = self.hosts[h].incarnation;
        for m in &mut self.ledger.sent[self.ledger.open_from..] {
            if m.from == (h, inc) && m.outcome.is_none() {
                m.orphaned = true;
            }
        }
        // Its state is gone; its inbox with it (queued receipts abandon into nothing).
        self.hosts[h].sessions.clear();
        let links: Vec<u64> = self
            .links
            .iter()
            .filter(|(_, l)| l.up && l.ends.iter().any(|e| e.0 == h))
            .map(|(k, _)| *k)
            .collect();
        for l in links {
            // Silently: the other side hears nothing more.
            if let Some(link) = self.links.get_mut(&l) {
                link.up = false;
            }
        }
    }

    fn shutdown(&mut self, h: usize) {
        let actions = self.hosts[h].node.shutdown();
        self.apply(h, actions);
        self.pump(h);
        if self.sc.wire == Wire::Lossy {
            let me = self.hosts[h].endpoint();
            for o in 0..self.hosts.len() {
                if o != h {
                    self.send(h, o, Packet::Gone { from: me }, None);
                }
            }
        }
        self.crash(h);
    }

    fn restart(&mut self, h: usize) {
        let (key, inc, silent, imp) = {
            let host = &self.hosts[h];
            (
                host.key,
                host.incarnation + 1,
                host.silent,
                host.impostor_of,
            )
        };
        self.spawn(h, key, inc, silent, imp);
    }

    /// Links wire: dial whoever is not linked; lossy wire: heartbeats.
    fn connect(&mut self) {
        let n = self.hosts.len();
        for a in 0..n {
            if !self.hosts[a].alive {
                continue;
            }
            match self.sc.wire {
                Wire::Links => {
                    for b in 0..n {
                        if a < b
                            && self.reachable(a, b)
                            && !self.linked(a, b)
                            && self.rng.permille(100)
                        {
                            self.dial(a, b);
                        }
                    }
                }
                Wire::Lossy => {
                    if self.now >= self.hosts[a].next_alive {
                        self.hosts[a].next_alive = self.now + Duration::from_millis(100);
                        let from = self.hosts[a].endpoint();
                        let generation = self.hosts[a].node.generation();
                        for b in 0..n {
                            if b != a {
                                self.send(a, b, Packet::Alive { from, generation }, None);
                            }
                        }
                    }
                }
            }
        }
    }

    // ----- checks -----

    fn check_deadlines(&mut self) {
        let deadline = self.config.delivery_deadline + Duration::from_millis(1);
        while let Some(m) = self.ledger.sent.get(self.ledger.open_from) {
            if m.outcome.is_some() || m.orphaned {
                self.ledger.open_from += 1;
                continue;
            }
            if self.now > m.accepted + deadline {
                let i = self.ledger.open_from;
                let mut at = Vec::new();
                for (h, host) in self.hosts.iter().enumerate() {
                    for (sid, s) in &host.sessions {
                        if s.session.unsettled_contexts().contains(&&i) {
                            at.push(format!(
                                "host {h} session {sid} ({:?}, next timer {:?})",
                                s.session,
                                s.session.poll_timeout().map(|t| t - self.start)
                            ));
                        }
                    }
                    if host.node.waiting_contexts().contains(&&i) {
                        at.push(format!(
                            "host {h} node (next timer {:?})",
                            host.node.poll_timeout().map(|t| t - self.start)
                        ));
                    }
                }
                self.fail(&format!(
                    "message {i} unsettled past its deadline; held at {at:?}"
                ));
            }
            break;
        }
    }

    fn check_bounds(&self) {
        let c = &self.config;
        for host in self.hosts.iter().filter(|h| h.alive) {
            for s in host.sessions.values() {
                let (count, bytes) = s.session.held();
                if count > c.window as usize * host.agents.len() {
                    self.fail(&format!("a session holds {count} messages"));
                }
                if bytes > c.session_bytes + 1024 {
                    self.fail(&format!("a session holds {bytes} bytes"));
                }
            }
            if host.budget.held.used() > c.endpoint_bytes + 1024 {
                self.fail("the endpoint budget is exceeded");
            }
            if host.budget.membership.used() > c.membership_bytes {
                self.fail("the endpoint's registration budget is exceeded");
            }
            // Every byte counted is held by a session that counts it: nothing leaks.
            let (held, members) = host
                .sessions
                .values()
                .map(|s| s.session.budgeted())
                .fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
            if (held, members) != (host.budget.held.used(), host.budget.membership.used()) {
                self.fail(&format!(
                    "budgets count ({}, {}), sessions hold ({held}, {members})",
                    host.budget.held.used(),
                    host.budget.membership.used()
                ));
            }
        }
    }

    /// Once healed and quiet: every live host routes every uncontested agent of every other
    /// live host to that host's current incarnation.
    fn converged(&self) -> Option<String> {
        for (h, host) in self.hosts.iter().enumerate() {
            if !host.alive || host.impostor_of.is_some() {
                continue;
            }
            for (g, other) in self.hosts.iter().enumerate() {
                if g == h || !other.alive || other.impostor_of.is_some() {
                    continue;
                }
                let id = agent_id(g);
                let contested = self
                    .hosts
                    .iter()
                    .any(|x| x.alive && x.impostor_of == Some(g));
                match host.routes.get(&id) {
                    Some(Route::Session { session, .. }) => {
                        let peer = host.sessions.get(session).map(|s| s.session.peer());
                        let holders: Vec<EndpointId> = self
                            .hosts
                            .iter()
                            .filter(|x| {
                                x.alive && (x.impostor_of == Some(g) || std::ptr::eq(*x, other))
                            })
                            .map(Host::endpoint)
                            .collect();
                        let ok = if contested {
                            peer.is_some_and(|p| holders.contains(&p))
                        } else {
                            peer == Some(other.endpoint())
                        };
                        if !ok {
                            return Some(format!(
                                "host {h} routes {id} to {peer:?}, not {:?}",
                                other.endpoint()
                            ));
                        }
                    }
                    r => {
                        let sessions: Vec<String> = host
                            .sessions
                            .values()
                            .map(|s| {
                                format!(
                                    "{:?} rank {:?} agents {:?} at generation {}",
                                    s.session,
                                    s.session.rank(),
                                    s.session
                                        .peer_agents()
                                        .iter()
                                        .map(|r| r.id.clone())
                                        .collect::<Vec<_>>(),
                                    s.session.peer_generation()
                                )
                            })
                            .collect();
                        return Some(format!(
                            "host {h} has no session route to {id}: {r:?}; host {g} is at {:?}; node {:?} sessions {sessions:?}; greeter {:?}",
                            other.endpoint(),
                            host.node,
                            host.greeter
                        ));
                    }
                }
            }
        }
        None
    }

    // ----- the run -----

    fn run(mut self) -> Stats {
        let traffic_end = self.start + self.sc.traffic;
        let impostor_at = self.start + Duration::from_millis(400);
        let mut impostor = self.sc.impostor;
        let end = traffic_end + self.config.liveness * 2;
        // Once healed, membership must converge: checked after `end`, for up to this long
        // more (a session that just ended on a long run of lost heartbeats comes back).
        let converge_by = end + Duration::from_secs(3);
        let mut next_action = self.start;
        // After the chaos and once healed: a calm spell (no crash, no partition; the wire's
        // loss for its first 250 ms, then none), whose every message must be taken (or, to
        // a peer that never takes anything, reported unconfirmed at its deadline): what the
        // wire lost is sent again in time. Then everything must settle.
        let mut calm: Option<(usize, Instant)> = None;
        let mut lossless_at: Option<Instant> = None;
        loop {
            let chaos_on = self.now < traffic_end;
            let mut sending = chaos_on;
            if lossless_at.is_some_and(|t| self.now >= t) {
                lossless_at = None;
                self.sc.loss = 0;
                self.sc.dup = 0;
            }
            match calm {
                None if self.now >= end => match self.converged() {
                    None => {
                        lossless_at = Some(self.now + Duration::from_millis(250));
                        calm = Some((
                            self.ledger.sent.len(),
                            self.now + Duration::from_millis(500),
                        ));
                    }
                    Some(why) if self.now >= converge_by => {
                        self.fail(&format!("membership did not converge: {why}"))
                    }
                    Some(_) => {}
                },
                Some((_, calm_end)) => {
                    sending = self.now < calm_end;
                    let settled = self
                        .ledger
                        .sent
                        .iter()
                        .all(|m| m.outcome.is_some() || m.orphaned);
                    let limit = calm_end + self.config.delivery_deadline + Duration::from_secs(1);
                    if !sending && (settled || self.now >= limit) {
                        break;
                    }
                }
                None => {}
            }
            self.sending = sending;
            self.step += 1;
            if impostor && self.now >= impostor_at {
                impostor = false;
                let victim = self.rng.below(self.sc.hosts as u64) as usize;
                let i = self.hosts.len();
                self.spawn(i, 0xbad, 1, false, Some(victim));
            }
            // Packets due.
            while self.net.peek().is_some_and(|p| p.0.at <= self.now) {
                let Some(Reverse(p)) = self.net.pop() else {
                    break;
                };
                self.deliver(p);
            }
            self.timers();
            if self.now >= next_action {
                next_action = self.now + self.rng.ms(1, 8);
                if !chaos_on {
                    self.partition = None;
                }
                if calm.is_none() {
                    self.chaos(chaos_on);
                }
                self.connect();
                if sending {
                    for h in 0..self.sc.hosts {
                        if self.rng.permille(350) {
                            self.traffic(h);
                        }
                    }
                }
                self.take();
            }
            self.hand_offs();
            self.check_deadlines();
            self.check_bounds();
            let next = [
                self.net.peek().map(|p| p.0.at),
                self.next_timer(),
                Some(next_action),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
            self.now = next.max(self.now + Duration::from_micros(100));
        }
        if let Some((from, _)) = calm {
            for (i, m) in self.ledger.sent.iter().enumerate().skip(from) {
                // Who holds the agent: one host, or two where an impostor claims it.
                let holds = |silent: bool| {
                    self.hosts.iter().any(|h| {
                        h.alive && h.silent == silent && h.agents.iter().any(|a| a.id == m.to)
                    })
                };
                let silent = holds(true);
                let ok = match m.outcome {
                    Some((Outcome::Taken, _)) => holds(false),
                    Some((Outcome::Failed(DeliveryFailure::Unconfirmed), _)) => silent,
                    // Its receiver kept up too slowly for its channel: a policy's outcome.
                    Some((Outcome::Failed(DeliveryFailure::Dropped), _)) => m.droppable,
                    _ => false,
                };
                if !ok {
                    self.fail(&format!(
                        "message {i}, sent in calm, ended {:?} (its receiver {}silent)",
                        m.outcome.map(|o| o.0),
                        if silent { "" } else { "not " }
                    ));
                }
            }
        }
        if let Some(i) = self
            .ledger
            .sent
            .iter()
            .position(|m| m.outcome.is_none() && !m.orphaned)
        {
            self.fail(&format!("message {i} never settled"));
        }
        let mut st = Stats::default();
        for m in &self.ledger.sent {
            match m.outcome {
                Some((Outcome::Taken, _)) => st.taken += 1,
                Some((Outcome::Failed(DeliveryFailure::Unconfirmed), _)) => st.unconfirmed += 1,
                Some((Outcome::Failed(DeliveryFailure::Expired), _)) => st.expired += 1,
                Some((Outcome::Failed(DeliveryFailure::Dropped), _)) => st.dropped += 1,
                Some((Outcome::Failed(_), _)) => st.failed += 1,
                None => {}
            }
        }
        st.sent = self.ledger.sent.len();
        st.handed = self.handed;
        st.fanouts = self.ledger.fanouts;
        st.requests = self.ledger.requests.len();
        st
    }
}

fn clone_packet(p: &Packet) -> Packet {
    match p {
        Packet::Hello { hello, reply, link } => Packet::Hello {
            hello: hello.clone(),
            reply: *reply,
            link: *link,
        },
        Packet::Frame {
            bytes,
            link,
            from,
            to,
            session,
        } => Packet::Frame {
            bytes: bytes.clone(),
            link: *link,
            from: *from,
            to: *to,
            session: *session,
        },
        Packet::Reset { from, to, session } => Packet::Reset {
            from: *from,
            to: *to,
            session: *session,
        },
        Packet::Alive { from, generation } => Packet::Alive {
            from: *from,
            generation: *generation,
        },
        Packet::Gone { from } => Packet::Gone { from: *from },
    }
}

#[derive(Default, Debug)]
struct Stats {
    sent: usize,
    taken: usize,
    unconfirmed: usize,
    expired: usize,
    dropped: usize,
    failed: usize,
    requests: usize,
    handed: usize,
    fanouts: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.sent += o.sent;
        self.taken += o.taken;
        self.unconfirmed += o.unconfirmed;
        self.expired += o.expired;
        self.dropped += o.dropped;
        self.failed += o.failed;
        self.requests += o.requests;
        self.handed += o.handed;
        self.fanouts += o.fanouts;
    }
}

trait Correlated {
    fn correlated(self, id: MessageId) -> Self;
}

impl Correlated for Envelope {
    fn correlated(mut self, id: MessageId) -> Self {
        self.correlation_id = Some(id);
        self
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("AQE_SIM_SEED") {
        return vec![s.parse().expect("AQE_SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("AQE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    (1..=n).collect()
}

#[test]
fn every_seed_keeps_every_invariant() {
    let seeds = seeds();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let started = Instant::now();
    let totals: Vec<Stats> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let mut total = Stats::default();
                    for seed in chunk {
                        total.add(&World::new(seed).run());
                    }
                    total
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a seed failed"))
            .collect()
    });
    let mut t = Stats::default();
    for s in &totals {
        t.add(s);
    }
    eprintln!(
        "{} seeds in {:?}: {} reliable messages ({} taken, {} unconfirmed, {} expired before they left, {} dropped by a full inbox, {} failed otherwise, {} handed to a redelivery handler, {} sent as a broadcast's copy), {} requests",
        seeds.len(),
        started.elapsed(),
        t.sent,
        t.taken,
        t.unconfirmed,
        t.expired,
        t.dropped,
        t.failed,
        t.handed,
        t.fanouts,
        t.requests
    );
    assert!(
        seeds.len() < 100 || t.fanouts > 0,
        "no broadcast copy sent: fanouts went untested"
    );
    assert!(t.taken > 0, "the simulation moved nothing");
    assert!(
        seeds.len() < 1000 || t.expired > 0,
        "no message expired: the time-to-live went untested"
    );
    assert!(
        seeds.len() < 1000 || t.dropped > 0,
        "no message dropped: the slow-consumer policy went untested"
    );
}

#[test]
fn trust_is_what_the_hello_proved() {
    // Used by the simulation: hosts prove their keys (as over mutual TLS).
    let t = Trust {
        authenticated: true,
        principal: Principal::Key(1),
    };
    assert!(t.same_principal(&t));
}
