//! Who is where: the membership of an endpoint as one deterministic state machine.
//!
//! The [`Registry`] knows the local agents, the connections (being set up, in use, being
//! retired), the remote endpoints with the agents each announced, and which endpoint owns
//! each remote agent id. Its methods take what happened (a hello, an attach, a control frame,
//! a lost connection) and return the [`Action`]s to perform (announce to a connection, dial
//! an address, retire a connection, publish an event). It does no I/O and reads no clock
//! (time is passed in), so every interleaving can be tested without a socket; the endpoint
//! holds it under one lock and performs the actions.
//!
//! Membership updates are versioned: every attach or detach bumps the endpoint's
//! *generation*, carried by the hello (with the full agent list) and by each `Joined` and
//! `Left`. A receiver applies only what is newer than what it has, so updates that reach it
//! over two connections of the same endpoint pair, in any interleaving, end in the same state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aqe_core::{AgentId, Event, PeerState, Registration};

use crate::wire::{Control, close};

/// A connection's handle in the registry, unique for the endpoint's life.
pub(crate) type ConnKey = u64;

/// How connections of one endpoint pair are ranked: the dialer's endpoint id, then the
/// dialer's nonce. Both sides know both, so both keep the same (smallest) connection.
pub(crate) type Rank = (u64, u64);

/// A checked hello from a peer, as the registry needs it.
#[derive(Debug, Clone)]
pub(crate) struct PeerHello {
    pub(crate) endpoint: u64,
    /// Where it listens, with an unspecified IP already replaced by the observed one.
    pub(crate) listen: SocketAddr,
    pub(crate) generation: u64,
    pub(crate) agents: Vec<Registration>,
    pub(crate) known: Vec<SocketAddr>,
    pub(crate) rank: Rank,
}

/// What the endpoint must do after a registry step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send this control frame on that connection (in order with the others).
    Send(ConnKey, Control),
    /// Publish this event.
    Publish(Event),
    /// Dial this address.
    Dial(SocketAddr),
    /// Stop using this connection and close it with `code`: after draining what is in flight
    /// on it (`drain`), or at once.
    Retire {
        conn: ConnKey,
        code: u32,
        drain: bool,
    },
    /// This connection is gone: what was sent on it unacknowledged must be redelivered.
    Orphaned(ConnKey),
    /// This connection is being retired while its peer lives on over another: what it holds
    /// unacknowledged moves to the connection in use now, ahead of anything newer, so that
    /// ordered channels stay ordered across the switch. The receiver drops copies that still
    /// arrive over the retired one.
    HandOver(ConnKey),
    /// This agent is reachable again over that connection: deliver what waits for it.
    Reachable { agent: AgentId, conn: ConnKey },
}

/// Why a hello is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer is this endpoint.
    SelfConnection,
    /// The connection is not being set up (already refused or closed).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Active,
    Retiring,
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    /// Set once the peer's hello was accepted.
    peer: Option<(u64, Rank)>,
}

/// A remote endpoint and what it announced.
#[derive(Debug)]
struct Remote {
    listen: SocketAddr,
    generation: u64,
    agents: BTreeMap<AgentId, Registration>,
    /// The connection in use.
    active: ConnKey,
}

/// The membership state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Registry {
    me: u64,
    generation: u64,
    locals: BTreeMap<AgentId, Registration>,
    conns: BTreeMap<ConnKey, Conn>,
    next_key: ConnKey,
    remotes: HashMap<u64, Remote>,
    /// Which remote endpoint each remote agent id is routed to: the first to announce it.
    owner: HashMap<AgentId, u64>,
    by_addr: HashMap<SocketAddr, u64>,
    dialing: HashSet<SocketAddr>,
    /// Endpoints lost without a goodbye, by listen address, since when.
    unreachable: HashMap<SocketAddr, Instant>,
}

impl Registry {
    pub(crate) fn new(me: u64) -> Self {
        Self {
            me,
            generation: 0,
            locals: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_key: 1,
            remotes: HashMap::new(),
            owner: HashMap::new(),
            by_addr: HashMap::new(),
            dialing: HashSet::new(),
            unreachable: HashMap::new(),
        }
    }

    // ----- local agents -----

    #[cfg(test)]
    pub(crate) fn local(&self, id: &AgentId) -> Option<&Registration> {
        self.locals.get(id)
    }

    #[cfg(test)]
    pub(crate) fn locals(&self) -> impl Iterator<Item = &Registration> {
        self.locals.values()
    }

    /// Every connection that is set up or in use, or being retired: membership updates go
    /// to all of them, so whichever a peer reads last, it ends knowing the latest state.
    fn open_conns(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.conns.keys().copied()
    }

    /// Hosts a new local agent. `None` if the id is taken here.
    pub(crate) fn attach(&mut self, reg: Registration) -> Option<Vec<Action>> {
        if self.locals.contains_key(&reg.id) {
            return None;
        }
        self.generation += 1;
        let mut actions: Vec<Action> = self
            .open_conns()
            .map(|k| Action::Send(k, Control::Joined(self.generation, reg.clone())))
            .collect();
        // A local agent takes precedence over a remote one of the same id.
        if let Some(endpoint) = self.owner.remove(&reg.id) {
            tracing::warn!(agent = %reg.id, remote = endpoint, "a local agent shadows a remote one of the same id");
            actions.push(Action::Publish(Event::PeerLeft(reg.id.clone())));
        }
        self.locals.insert(reg.id.clone(), reg);
        Some(actions)
    }

    /// Stops hosting a local agent. `None` if it was not here.
    pub(crate) fn detach(&mut self, id: &AgentId) -> Option<Vec<Action>> {
        self.locals.remove(id)?;
        self.generation += 1;
        let mut actions: Vec<Action> = self
            .open_conns()
            .map(|k| Action::Send(k, Control::Left(self.generation, id.clone())))
            .collect();
        // A remote agent of that id, shadowed until now, becomes reachable.
        self.elect_owner(id, &mut actions);
        Some(actions)
    }

    // ----- connections -----

    /// A connection starts its handshake: its key, and what this endpoint's hello says
    /// (membership generation, agents, known peers). From now on membership updates are
    /// queued for it, after that hello.
    pub(crate) fn begin(&mut self) -> (ConnKey, u64, Vec<Registration>, Vec<SocketAddr>) {
        let key = self.next_key;
        self.next_key += 1;
        self.conns.insert(
            key,
            Conn {
                phase: Phase::Handshaking,
                peer: None,
            },
        );
        let known = self.remotes.values().map(|r| r.listen).collect();
        (
            key,
            self.generation,
            self.locals.values().cloned().collect(),
            known,
        )
    }

    /// A handshake failed: forget the connection.
    pub(crate) fn abort(&mut self, key: ConnKey) {
        if self
            .conns
            .get(&key)
            .is_some_and(|c| c.phase == Phase::Handshaking)
        {
            self.conns.remove(&key);
        }
    }

    /// The peer's hello on connection `key` passed the endpoint's checks.
    pub(crate) fn on_hello(
        &mut self,
        key: ConnKey,
        hello: PeerHello,
    ) -> Result<Vec<Action>, Refusal> {
        if hello.endpoint == self.me {
            self.conns.remove(&key);
            return Err(Refusal::SelfConnection);
        }
        match self.conns.get(&key) {
            Some(c) if c.phase == Phase::Handshaking => {}
            _ => return Err(Refusal::Unknown),
        }
        let mut actions = Vec::new();
        // Another endpoint now listens where a known one did: that one restarted or is
        // gone, and its connection leads nowhere.
        if let Some(&old) = self.by_addr.get(&hello.listen)
            && old != hello.endpoint
            && let Some(old_conn) = self.remotes.get(&old).map(|r| r.active)
        {
            tracing::info!(addr = %hello.listen, "a new endpoint listens at a known address: the old one is gone");
            self.lose_endpoint(old, false, None, &mut actions);
            // What it held unacknowledged is redelivered before anything newer can be routed
            // to the new endpoint: in this same step.
            self.conns.remove(&old_conn);
            actions.push(Action::Retire {
                conn: old_conn,
                code: close::REPLACED,
                drain: false,
            });
            actions.push(Action::Orphaned(old_conn));
        }
        self.unreachable.remove(&hello.listen);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer = Some((hello.endpoint, hello.rank));
        }
        let existing = self.remotes.get(&hello.endpoint).map(|r| r.active);
        match existing {
            Some(other) if other != key => {
                // One connection per endpoint pair: keep the smaller rank on both sides.
                let other_rank = self
                    .conns
                    .get(&other)
                    .and_then(|c| c.peer)
                    .map(|(_, r)| r)
                    .unwrap_or((u64::MAX, u64::MAX));
                let (keep, retire) = if hello.rank < other_rank {
                    (key, other)
                } else {
                    (other, key)
                };
                self.set_phase(keep, Phase::Active);
                self.set_phase(retire, Phase::Retiring);
                if let Some(r) = self.remotes.get_mut(&hello.endpoint) {
                    r.active = keep;
                }
                actions.push(Action::Retire {
                    conn: retire,
                    code: close::DUPLICATE,
                    drain: true,
                });
                actions.push(Action::HandOver(retire));
                self.apply_snapshot(hello.endpoint, hello.generation, hello.agents, &mut actions);
            }
            _ => {
                self.set_phase(key, Phase::Active);
                self.remotes.insert(
                    hello.endpoint,
                    Remote {
                        listen: hello.listen,
                        generation: 0,
                        agents: BTreeMap::new(),
                        active: key,
                    },
                );
                self.by_addr.insert(hello.listen, hello.endpoint);
                actions.push(Action::Publish(Event::ConnectionEstablished {
                    addr: hello.listen,
                }));
                self.apply_snapshot(hello.endpoint, hello.generation, hello.agents, &mut actions);
                // Peer exchange: dial what the peer knows; tell the others about the peer.
                for addr in hello.known {
                    if let Some(a) = self.want_dial(addr) {
                        actions.push(a);
                    }
                }
                for (&other_key, c) in &self.conns {
                    if other_key != key && c.phase == Phase::Active {
                        actions.push(Action::Send(other_key, Control::Peers(vec![hello.listen])));
                    }
                }
            }
        }
        Ok(actions)
    }

    fn set_phase(&mut self, key: ConnKey, phase: Phase) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.phase = phase;
        }
    }

    /// A control frame (other than acknowledgements and heartbeats) from connection `key`.
    pub(crate) fn on_control(&mut self, key: ConnKey, control: Control) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(endpoint) = self.conns.get(&key).and_then(|c| c.peer).map(|(e, _)| e) else {
            return actions;
        };
        match control {
            Control::Joined(generation, reg) => {
                let Some(remote) = self.remotes.get_mut(&endpoint) else {
                    return actions;
                };
                if generation <= remote.generation {
                    return actions;
                }
                remote.generation = generation;
                let id = reg.id.clone();
                remote.agents.insert(id.clone(), reg);
                self.elect_owner(&id, &mut actions);
            }
            Control::Left(generation, id) => {
                let Some(remote) = self.remotes.get_mut(&endpoint) else {
                    return actions;
                };
                if generation <= remote.generation {
                    return actions;
                }
                remote.generation = generation;
                if remote.agents.remove(&id).is_some() {
                    self.disown(&id, endpoint, &mut actions);
                }
            }
            Control::Peers(addrs) => {
                for addr in addrs {
                    if let Some(a) = self.want_dial(addr) {
                        actions.push(a);
                    }
                }
            }
            Control::Ack(..) | Control::Unprocessed(..) | Control::Ping(_) | Control::Drained => {}
        }
        actions
    }

    /// Replaces an endpoint's agents with a hello's list, if the hello is newer.
    fn apply_snapshot(
        &mut self,
        endpoint: u64,
        generation: u64,
        agents: Vec<Registration>,
        actions: &mut Vec<Action>,
    ) {
        let Some(remote) = self.remotes.get_mut(&endpoint) else {
            return;
        };
        if generation < remote.generation || (generation == remote.generation && generation > 0) {
            return;
        }
        remote.generation = generation;
        let new: BTreeMap<AgentId, Registration> =
            agents.into_iter().map(|r| (r.id.clone(), r)).collect();
        let gone: Vec<AgentId> = remote
            .agents
            .keys()
            .filter(|id| !new.contains_key(*id))
            .cloned()
            .collect();
        let added: Vec<AgentId> = new
            .keys()
            .filter(|id| !remote.agents.contains_key(*id))
            .cloned()
            .collect();
        remote.agents = new;
        for id in gone {
            self.disown(&id, endpoint, actions);
        }
        for id in added {
            self.elect_owner(&id, actions);
        }
    }

    /// Routes `id` to an endpoint announcing it, if none owns it yet and it is not local.
    fn elect_owner(&mut self, id: &AgentId, actions: &mut Vec<Action>) {
        if self.locals.contains_key(id) || self.owner.contains_key(id) {
            if let Some(owner) = self.owner.get(id)
                && let Some(claimant) = self
                    .remotes
                    .iter()
                    .find(|(e, r)| *e != owner && r.agents.contains_key(id))
            {
                tracing::warn!(agent = %id, owner, other = *claimant.0, "two endpoints announce the same agent id; the first keeps it");
            }
            return;
        }
        // Deterministic: the claimant with the smallest endpoint id.
        let Some((&endpoint, remote)) = self
            .remotes
            .iter()
            .filter(|(_, r)| r.agents.contains_key(id))
            .min_by_key(|(e, _)| **e)
        else {
            return;
        };
        let Some(reg) = remote.agents.get(id) else {
            return;
        };
        let info = reg.peer_info(Some(remote.listen), PeerState::Connected);
        let conn = remote.active;
        self.owner.insert(id.clone(), endpoint);
        actions.push(Action::Publish(Event::PeerDiscovered(info)));
        actions.push(Action::Reachable {
            agent: id.clone(),
            conn,
        });
    }

    /// `endpoint` no longer hosts `id`: if it owned it, the agent left (or moves to another
    /// claimant).
    fn disown(&mut self, id: &AgentId, endpoint: u64, actions: &mut Vec<Action>) {
        if self.owner.get(id) == Some(&endpoint) {
            self.owner.remove(id);
            actions.push(Action::Publish(Event::PeerLeft(id.clone())));
            self.elect_owner(id, actions);
        }
    }

    /// Connection `key` ended. `clean`: the peer said goodbye (it shut down, or retired a
    /// duplicate), so it is not counted unreachable. `reason` explains it in the event.
    pub(crate) fn on_connection_lost(
        &mut self,
        key: ConnKey,
        clean: bool,
        reason: String,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(conn) = self.conns.remove(&key) else {
            return actions;
        };
        let Some((endpoint, _)) = conn.peer else {
            return actions;
        };
        actions.push(Action::Orphaned(key));
        let is_active = self.remotes.get(&endpoint).is_some_and(|r| r.active == key);
        if is_active {
            let listen = self.remotes.get(&endpoint).map(|r| r.listen);
            if !clean && let Some(listen) = listen {
                self.unreachable.insert(listen, now);
            }
            self.lose_endpoint(endpoint, clean, Some(reason), &mut actions);
        }
        actions
    }

    /// Forgets a remote endpoint: its agents leave, its other connections are retired.
    fn lose_endpoint(
        &mut self,
        endpoint: u64,
        clean: bool,
        reason: Option<String>,
        actions: &mut Vec<Action>,
    ) {
        let Some(remote) = self.remotes.remove(&endpoint) else {
            return;
        };
        if self.by_addr.get(&remote.listen) == Some(&endpoint) {
            self.by_addr.remove(&remote.listen);
        }
        for id in remote.agents.keys() {
            self.disown(id, endpoint, actions);
        }
        // Connections to it still open (being retired) lead nowhere now.
        let others: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer.is_some_and(|(e, _)| e == endpoint))
            .map(|(k, _)| *k)
            .collect();
        for k in others {
            self.set_phase(k, Phase::Retiring);
            actions.push(Action::Retire {
                conn: k,
                code: close::NORMAL,
                drain: false,
            });
        }
        let reason = reason.unwrap_or_else(|| "replaced by a new endpoint at its address".into());
        tracing::info!(peer = %remote.listen, %reason, clean, "connection lost");
        actions.push(Action::Publish(Event::ConnectionLost {
            addr: remote.listen,
            reason,
        }));
    }

    // ----- dialing -----

    fn want_dial(&mut self, addr: SocketAddr) -> Option<Action> {
        if self.by_addr.contains_key(&addr) || !self.dialing.insert(addr) {
            return None;
        }
        Some(Action::Dial(addr))
    }

    /// The dial to `addr` ended (connected or not).
    pub(crate) fn dial_done(&mut self, addr: SocketAddr) {
        self.dialing.remove(&addr);
    }

    // ----- queries -----

    /// The connection and registration of remote agent `id`.
    pub(crate) fn route(&self, id: &AgentId) -> Option<(ConnKey, &Registration, SocketAddr)> {
        let endpoint = self.owner.get(id)?;
        let remote = self.remotes.get(endpoint)?;
        Some((remote.active, remote.agents.get(id)?, remote.listen))
    }

    /// The remote endpoint an agent id is routed to, if any.
    pub(crate) fn owner_of(&self, id: &AgentId) -> Option<u64> {
        self.owner.get(id).copied()
    }

    /// Whether a connection to the endpoint listening at `addr` is in use.
    pub(crate) fn connected_to(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// Whether connection `key` is the one in use for its endpoint.
    #[cfg(test)]
    pub(crate) fn is_active(&self, key: ConnKey) -> bool {
        self.conns
            .get(&key)
            .is_some_and(|c| c.phase == Phase::Active)
    }

    /// Remote agents reachable, with where they live.
    pub(crate) fn remote_agents(
        &self,
    ) -> impl Iterator<Item = (&Registration, SocketAddr, ConnKey)> {
        self.owner.iter().filter_map(|(id, e)| {
            let r = self.remotes.get(e)?;
            Some((r.agents.get(id)?, r.listen, r.active))
        })
    }

    /// Connections in use, with the peer's listen address.
    pub(crate) fn active_conns(&self) -> impl Iterator<Item = (ConnKey, SocketAddr)> + '_ {
        self.remotes.values().map(|r| (r.active, r.listen))
    }

    /// Peer endpoints lost without a goodbye within `within` of `now`.
    pub(crate) fn unreachable(&mut self, now: Instant, within: Duration) -> usize {
        self.unreachable
            .retain(|_, since| now.saturating_duration_since(*since) < within);
        self.unreachable.len()
    }

    /// Forgets everything: the endpoint shuts down. The events to publish.
    pub(crate) fn clear(&mut self) -> Vec<Action> {
        let mut actions: Vec<Action> = self
            .locals
            .keys()
            .chain(self.owner.keys())
            .map(|id| Action::Publish(Event::PeerLeft(id.clone())))
            .collect();
        actions.extend(self.conns.keys().map(|k| Action::Orphaned(*k)));
        self.locals.clear();
        self.owner.clear();
        self.remotes.clear();
        self.by_addr.clear();
        self.conns.clear();
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn reg(id: &str) -> Registration {
        Registration::new(id, "test").with_channel(aqe_core::Channel::coordination())
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A deterministic pseudo-random sequence (xorshift), so each seed replays exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// What crosses the network between two registries, per connection and direction, in
    /// order (a QUIC stream).
    #[derive(Debug)]
    enum Frame {
        Hello(PeerHello),
        Control(Control),
    }

    /// One side of the simulation: a registry, and per connection what it sends.
    struct Side {
        reg: Registry,
        id: u64,
        listen: SocketAddr,
        /// Outgoing frames per local connection key.
        out: BTreeMap<ConnKey, VecDeque<Frame>>,
        /// Our key for a connection, by the connection's global number.
        keys: BTreeMap<u32, ConnKey>,
        events: Vec<Event>,
        retired: Vec<ConnKey>,
    }

    impl Side {
        fn new(id: u64, port: u16) -> Self {
            Self {
                reg: Registry::new(id),
                id,
                listen: addr(port),
                out: BTreeMap::new(),
                keys: BTreeMap::new(),
                events: Vec::new(),
                retired: Vec::new(),
            }
        }

        fn apply(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Send(k, c) => {
                        if let Some(q) = self.out.get_mut(&k) {
                            q.push_back(Frame::Control(c));
                        }
                    }
                    Action::Publish(e) => self.events.push(e),
                    Action::Retire { conn, .. } => self.retired.push(conn),
                    Action::Dial(_)
                    | Action::Orphaned(_)
                    | Action::HandOver(_)
                    | Action::Reachable { .. } => {}
                }
            }
        }

        /// Starts the handshake of global connection `n`; the hello goes first on it.
        fn begin(&mut self, n: u32, rank: Rank) {
            let (key, generation, agents, known) = self.reg.begin();
            self.keys.insert(n, key);
            let hello = PeerHello {
                endpoint: self.id,
                listen: self.listen,
                generation,
                agents,
                known,
                rank,
            };
            self.out.insert(key, VecDeque::from([Frame::Hello(hello)]));
        }

        fn receive(&mut self, n: u32, frame: Frame) {
            let key = self.keys[&n];
            match frame {
                Frame::Hello(h) => {
                    let actions = self.reg.on_hello(key, h).expect("hello accepted");
                    self.apply(actions);
                }
                Frame::Control(c) => {
                    let actions = self.reg.on_control(key, c);
                    self.apply(actions);
                }
            }
        }

        /// Remote agents this side routes to.
        fn knows(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .reg
                .remote_agents()
                .map(|(r, _, _)| r.id.to_string())
                .collect();
            v.sort();
            v
        }

        fn hosts(&self) -> Vec<String> {
            self.reg.locals().map(|r| r.id.to_string()).collect()
        }
    }

    /// Runs one random interleaving of attaches and detaches on both sides with `conns`
    /// connection handshakes between them (several: simultaneous dials), delivering frames
    /// in per-connection order at random moments, until everything is delivered.
    fn simulate(seed: u64, conns: u32, same_dialer: bool) -> (Side, Side) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut a = Side::new(10, 1000);
        let mut b = Side::new(20, 2000);
        let mut ops = 0;
        // Connection n: who dialed it (a: true), its rank, and whether the listener has
        // begun its side yet.
        let mut started = vec![false; conns as usize];
        let mut answered = vec![false; conns as usize];
        let dialer_is_a: Vec<bool> = (0..conns)
            .map(|n| if same_dialer { true } else { n % 2 == 0 })
            .collect();
        loop {
            let mut progress = false;
            let choice = rng.below(6);
            match choice {
                // Agents come and go on either side, a bounded number of times.
                0 | 1 if ops < 12 => {
                    let side = if choice == 0 { &mut a } else { &mut b };
                    let name = format!("{}{}", if choice == 0 { 'a' } else { 'b' }, rng.below(3));
                    let actions = if side.reg.local(&AgentId::from(name.as_str())).is_some() {
                        side.reg.detach(&AgentId::from(name.as_str()))
                    } else {
                        side.reg.attach(reg(&name))
                    };
                    side.apply(actions.expect("consistent"));
                    ops += 1;
                    progress = true;
                }
                // A dialer starts a connection.
                2 => {
                    if let Some(n) = (0..conns).find(|n| !started[*n as usize]) {
                        started[n as usize] = true;
                        let rank = (
                            if dialer_is_a[n as usize] { a.id } else { b.id },
                            u64::from(n) * 7 % 5,
                        );
                        if dialer_is_a[n as usize] {
                            a.begin(n, rank);
                        } else {
                            b.begin(n, rank);
                        }
                        progress = true;
                    }
                }
                // One frame crosses one connection, in order.
                _ => {
                    let n = rng.below(conns as usize) as u32;
                    if !started[n as usize] {
                        continue;
                    }
                    let a_to_b = rng.below(2) == 0;
                    let (from, to) = if a_to_b {
                        (&mut a, &mut b)
                    } else {
                        (&mut b, &mut a)
                    };
                    let Some(&key) = from.keys.get(&n) else {
                        continue;
                    };
                    let Some(frame) = from.out.get_mut(&key).and_then(VecDeque::pop_front) else {
                        continue;
                    };
                    if !to.keys.contains_key(&n) {
                        // The listener sees the dialer's hello first and begins its side.
                        let rank = match &frame {
                            Frame::Hello(h) => h.rank,
                            Frame::Control(_) => unreachable!("the hello comes first"),
                        };
                        to.begin(n, rank);
                        answered[n as usize] = true;
                    }
                    to.receive(n, frame);
                    progress = true;
                }
            }
            let pending = a.out.values().chain(b.out.values()).any(|q| !q.is_empty());
            if !progress && !pending && ops >= 12 && started.iter().all(|s| *s) {
                break;
            }
            if ops >= 12 && started.iter().all(|s| *s) && !pending {
                break;
            }
        }
        assert!(answered.iter().all(|x| *x));
        (a, b)
    }

    #[test]
    fn every_interleaving_of_attach_and_detach_with_a_handshake_converges() {
        for seed in 1..2000 {
            let (a, b) = simulate(seed, 1, true);
            assert_eq!(a.knows(), b.hosts(), "seed {seed}: a's view of b");
            assert_eq!(b.knows(), a.hosts(), "seed {seed}: b's view of a");
        }
    }

    #[test]
    fn simultaneous_dials_keep_exactly_one_connection_on_both_sides() {
        for (seed, conns, same) in
            (1..600).flat_map(|s| [(s, 2, false), (s, 2, true), (s, 3, false)])
        {
            let (a, b) = simulate(seed, conns, same);
            let active_a: Vec<u32> = a
                .keys
                .iter()
                .filter(|(_, k)| a.reg.is_active(**k))
                .map(|(n, _)| *n)
                .collect();
            let active_b: Vec<u32> = b
                .keys
                .iter()
                .filter(|(_, k)| b.reg.is_active(**k))
                .map(|(n, _)| *n)
                .collect();
            assert_eq!(active_a.len(), 1, "seed {seed}: one connection in use on a");
            assert_eq!(
                active_a, active_b,
                "seed {seed}: both sides keep the same one"
            );
            assert_eq!(
                a.retired.len(),
                conns as usize - 1,
                "seed {seed}: the others are retired"
            );
            assert_eq!(a.knows(), b.hosts(), "seed {seed}");
            assert_eq!(b.knows(), a.hosts(), "seed {seed}");
            // Retiring drains; it is never an immediate close.
        }
    }

    fn hello(endpoint: u64, port: u16, generation: u64, agents: &[&str]) -> PeerHello {
        PeerHello {
            endpoint,
            listen: addr(port),
            generation,
            agents: agents.iter().map(|a| reg(a)).collect(),
            known: vec![],
            rank: (endpoint, 0),
        }
    }

    #[test]
    fn a_duplicate_is_retired_by_draining_not_by_a_timer() {
        let mut r = Registry::new(1);
        let (k1, ..) = r.begin();
        r.on_hello(k1, hello(9, 900, 1, &["x"])).expect("first");
        let (k2, ..) = r.begin();
        let actions = r
            .on_hello(
                k2,
                PeerHello {
                    rank: (0, 0),
                    ..hello(9, 900, 1, &["x"])
                },
            )
            .expect("second");
        assert!(
            actions.contains(&Action::Retire {
                conn: k1,
                code: close::DUPLICATE,
                drain: true
            }),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::HandOver(k1)), "{actions:?}");
        assert!(r.is_active(k2) && !r.is_active(k1));
        assert_eq!(r.route(&"x".into()).map(|(k, ..)| k), Some(k2));
        // The retired one ending changes nothing: the endpoint is still reachable.
        let actions = r.on_connection_lost(k1, true, "retired".into(), Instant::now());
        assert_eq!(actions, [Action::Orphaned(k1)]);
        assert!(r.route(&"x".into()).is_some());
    }

    #[test]
    fn a_restarted_peer_at_the_same_address_replaces_the_dead_connection_at_once() {
        let mut r = Registry::new(1);
        let (k1, ..) = r.begin();
        r.on_hello(k1, hello(9, 900, 3, &["x", "y"]))
            .expect("first");
        let (k2, ..) = r.begin();
        let actions = r
            .on_hello(k2, hello(77, 900, 1, &["x"]))
            .expect("restarted");
        let at = |a: Action| actions.iter().position(|b| *b == a);
        let retire = at(Action::Retire {
            conn: k1,
            code: close::REPLACED,
            drain: false,
        });
        let orphan = at(Action::Orphaned(k1));
        let reach = at(Action::Reachable {
            agent: "x".into(),
            conn: k2,
        });
        assert!(retire.is_some(), "{actions:?}");
        assert!(
            orphan.is_some() && reach.is_some() && orphan < reach,
            "what the old connection held goes out before x is reachable again: {actions:?}"
        );
        assert!(actions.contains(&Action::Publish(Event::PeerLeft("y".into()))));
        // x left with the old endpoint and is back with the new one, reachable over k2.
        assert!(actions.contains(&Action::Reachable {
            agent: "x".into(),
            conn: k2
        }));
        assert_eq!(r.route(&"x".into()).map(|(k, ..)| k), Some(k2));
        assert!(r.route(&"y".into()).is_none());
    }

    #[test]
    fn an_agent_announced_by_two_endpoints_stays_with_the_first_until_it_is_gone() {
        let mut r = Registry::new(1);
        let (k1, ..) = r.begin();
        r.on_hello(k1, hello(9, 900, 1, &["x"])).expect("first");
        let (k2, ..) = r.begin();
        let actions = r.on_hello(k2, hello(8, 800, 1, &["x"])).expect("second");
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Publish(Event::PeerDiscovered(_)))),
            "{actions:?}"
        );
        assert_eq!(
            r.route(&"x".into()).map(|(k, ..)| k),
            Some(k1),
            "no silent overwrite"
        );
        let actions = r.on_connection_lost(k1, false, "liveness".into(), Instant::now());
        assert!(
            actions.contains(&Action::Reachable {
                agent: "x".into(),
                conn: k2
            }),
            "{actions:?}"
        );
        assert_eq!(r.unreachable(Instant::now(), Duration::from_secs(1)), 1);
    }

    #[test]
    fn stale_updates_are_ignored_and_membership_follows_generations() {
        let mut r = Registry::new(1);
        let (k, ..) = r.begin();
        r.on_hello(k, hello(9, 900, 5, &["x"])).expect("hello");
        assert!(r.on_control(k, Control::Joined(4, reg("old"))).is_empty());
        assert!(r.route(&"old".into()).is_none());
        let actions = r.on_control(k, Control::Left(6, "x".into()));
        assert_eq!(actions, [Action::Publish(Event::PeerLeft("x".into()))]);
        let actions = r.on_control(k, Control::Joined(7, reg("z")));
        assert!(
            matches!(&actions[0], Action::Publish(Event::PeerDiscovered(p)) if p.id.as_str() == "z")
        );
    }

    #[test]
    fn attach_during_a_handshake_is_announced_after_the_hello() {
        let mut r = Registry::new(1);
        let (k, generation, agents, _) = r.begin();
        assert_eq!((generation, agents.len()), (0, 0));
        let actions = r.attach(reg("late")).expect("attach");
        assert!(
            matches!(&actions[..], [Action::Send(key, Control::Joined(1, reg))] if *key == k && reg.id.as_str() == "late")
        );
    }
}
