//! Who is where: the membership of an endpoint as one deterministic state machine.
//!
//! The [`Registry`] knows the local agents, the connections (being set up, in use, being
//! retired), the endpoints connected directly with the agents each announced, what peers
//! relayed about endpoints they are connected to (peer exchange), and which endpoint owns
//! each remote agent id. Its methods take what happened (a hello, an attach, a control frame,
//! a lost connection) and return the [`Action`]s to perform (announce to a connection, retire
//! a connection, publish an event). It does no I/O and reads no clock (time is passed in), so
//! every interleaving can be tested without a socket; the endpoint holds it under one lock
//! and performs the actions.
//!
//! Membership updates are versioned: every attach or detach bumps the endpoint's
//! *generation*, carried by the hello (with the full agent list) and by each `Joined` and
//! `Left`. A receiver applies only what is newer than what it has, so updates that reach it
//! over two connections of the same endpoint pair, in any interleaving, end in the same state.
//!
//! Peer exchange is one hop: an endpoint relays only what it knows first-hand (endpoints
//! connected to it) and only to endpoints connected to it; a receiver keeps relayed knowledge
//! per source, takes it only from peers it trusts, within per-peer caps, and lets first-hand
//! knowledge override it. Relayed agents are routed by dialing their endpoint on first use.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::PeerExchange;
use aqe_core::{AgentId, Event, PeerState, Registration};

use crate::wire::{Control, Relayed, close};

/// A connection's handle in the registry, unique for the endpoint's life.
pub(crate) type ConnKey = u64;

/// How connections of one endpoint pair are ranked: the dialer's endpoint id, then the
/// dialer's nonce. Both sides know both, so both keep the same (smallest) connection.
pub(crate) type Rank = (u64, u64);

/// A checked hello from a peer, as the registry needs it (its membership follows in
/// `Snapshot` control frames).
#[derive(Debug, Clone)]
pub(crate) struct PeerHello {
    pub(crate) endpoint: u64,
    /// Where it listens, with the IP its connection comes from.
    pub(crate) listen: SocketAddr,
    pub(crate) rank: Rank,
    /// Whether the peer proved who it is (token, client certificate, or the server
    /// certificate this endpoint verified when it dialed): its relays are taken.
    pub(crate) authenticated: bool,
}

/// Caps and policy the registry applies to what peers tell it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) exchange: PeerExchange,
    pub(crate) agents_per_peer: usize,
    pub(crate) endpoints_per_peer: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            exchange: PeerExchange::Authenticated,
            agents_per_peer: 4096,
            endpoints_per_peer: 1024,
        }
    }
}

/// What the endpoint must do after a registry step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send this control frame on that connection (in order with the others).
    Send(ConnKey, Control),
    /// Publish this event.
    Publish(Event),
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
    /// This agent is reachable over that connection: deliver what waits for it.
    Reachable { agent: AgentId, conn: ConnKey },
    /// This agent is known to live at an endpoint listening at `addr`, not connected yet:
    /// what waits for it wants a connection there.
    Known { agent: AgentId, addr: SocketAddr },
}

/// Where a remote agent can be reached.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    /// Over this connection.
    Direct(ConnKey, &'a Registration, SocketAddr),
    /// By dialing the endpoint listening here (known through peer exchange).
    Dial(SocketAddr, &'a Registration),
}

impl<'a> Route<'a> {
    pub(crate) fn registration(&self) -> &'a Registration {
        match self {
            Route::Direct(_, r, _) | Route::Dial(_, r) => r,
        }
    }
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
    authenticated: bool,
    /// A membership snapshot arriving over several frames.
    snapshot: Option<(u64, Vec<Registration>)>,
}

/// An endpoint connected directly, and what it announced.
#[derive(Debug)]
struct Remote {
    listen: SocketAddr,
    generation: u64,
    agents: BTreeMap<AgentId, Registration>,
    /// The connection in use.
    active: ConnKey,
}

/// An endpoint as a peer relayed it.
#[derive(Debug, Default)]
struct Heard {
    listen: Option<SocketAddr>,
    generation: u64,
    agents: BTreeMap<AgentId, Registration>,
}

/// The membership state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Registry {
    me: u64,
    generation: u64,
    policy: Policy,
    locals: BTreeMap<AgentId, Registration>,
    conns: BTreeMap<ConnKey, Conn>,
    next_key: ConnKey,
    remotes: HashMap<u64, Remote>,
    /// Relayed knowledge, by the endpoint that relayed it, then the endpoint it is about.
    heard: HashMap<u64, HashMap<u64, Heard>>,
    /// Which remote endpoint each remote agent id is routed to: the first to announce it.
    owner: HashMap<AgentId, u64>,
    /// Claims of an owned id by another endpoint, reported once each.
    conflicts: HashSet<(AgentId, u64)>,
    by_addr: HashMap<SocketAddr, u64>,
    /// Endpoints lost without a goodbye, by listen address, since when.
    unreachable: HashMap<SocketAddr, Instant>,
}

impl Registry {
    pub(crate) fn new(me: u64, policy: Policy) -> Self {
        Self {
            me,
            generation: 0,
            policy,
            locals: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_key: 1,
            remotes: HashMap::new(),
            heard: HashMap::new(),
            owner: HashMap::new(),
            conflicts: HashSet::new(),
            by_addr: HashMap::new(),
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

    /// Active connections other than `except`, with the endpoint at their far end.
    fn active_except(&self, except: Option<u64>) -> Vec<ConnKey> {
        self.remotes
            .iter()
            .filter(|(e, _)| Some(**e) != except)
            .map(|(_, r)| r.active)
            .collect()
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
    /// (membership generation and agents). From now on membership updates are queued for it,
    /// after that hello.
    pub(crate) fn begin(&mut self) -> (ConnKey, u64, Vec<Registration>) {
        let key = self.next_key;
        self.next_key += 1;
        self.conns.insert(
            key,
            Conn {
                phase: Phase::Handshaking,
                peer: None,
                authenticated: false,
                snapshot: None,
            },
        );
        (
            key,
            self.generation,
            self.locals.values().cloned().collect(),
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
            self.lose_endpoint(old, None, &mut actions);
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
            c.authenticated = hello.authenticated;
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
                if keep == key {
                    self.announce_reachable(hello.endpoint, &mut actions);
                }
            }
            _ => {
                self.set_phase(key, Phase::Active);
                // Until its own snapshot arrives (next on its control stream), it is what
                // peers relayed about it, if anything: agents known that way stay routable.
                let (generation, agents) = self
                    .heard
                    .values()
                    .filter_map(|h| h.get(&hello.endpoint))
                    .max_by_key(|h| h.generation)
                    .map(|h| (h.generation, h.agents.clone()))
                    .unwrap_or_default();
                self.remotes.insert(
                    hello.endpoint,
                    Remote {
                        listen: hello.listen,
                        generation,
                        agents,
                        active: key,
                    },
                );
                self.by_addr.insert(hello.listen, hello.endpoint);
                actions.push(Action::Publish(Event::ConnectionEstablished {
                    addr: hello.listen.into(),
                }));
                // Agents known so far through peer exchange are now reachable directly.
                self.announce_reachable(hello.endpoint, &mut actions);
                // Tell the newcomer about the endpoints connected here (applying its snapshot,
                // when it comes, tells them about it).
                if self.policy.exchange != PeerExchange::Off {
                    for (&endpoint, r) in &self.remotes {
                        if endpoint != hello.endpoint {
                            actions.push(Action::Send(key, Control::Relay(snapshot(endpoint, r))));
                        }
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

    /// Every agent `endpoint` owns is reachable over its connection in use.
    fn announce_reachable(&self, endpoint: u64, actions: &mut Vec<Action>) {
        let Some(conn) = self.remotes.get(&endpoint).map(|r| r.active) else {
            return;
        };
        for (id, e) in &self.owner {
            if *e == endpoint {
                actions.push(Action::Reachable {
                    agent: id.clone(),
                    conn,
                });
            }
        }
    }

    /// Relays news about direct peer `endpoint` to the other direct peers.
    fn relay(&self, endpoint: u64, news: Relayed, actions: &mut Vec<Action>) {
        if self.policy.exchange == PeerExchange::Off {
            return;
        }
        for k in self.active_except(Some(endpoint)) {
            actions.push(Action::Send(k, Control::Relay(news.clone())));
        }
    }

    /// A control frame (other than acknowledgements and heartbeats) from connection `key`.
    pub(crate) fn on_control(&mut self, key: ConnKey, control: Control) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((endpoint, authenticated)) = self
            .conns
            .get(&key)
            .and_then(|c| c.peer.map(|(e, _)| (e, c.authenticated)))
        else {
            return actions;
        };
        match control {
            Control::Snapshot {
                generation,
                agents,
                last,
            } => {
                let cap = self.policy.agents_per_peer;
                let Some(conn) = self.conns.get_mut(&key) else {
                    return actions;
                };
                let pending = conn
                    .snapshot
                    .get_or_insert_with(|| (generation, Vec::new()));
                if pending.0 != generation {
                    // A new snapshot began before the last one ended: start over.
                    *pending = (generation, Vec::new());
                }
                let room = cap.saturating_sub(pending.1.len());
                if agents.len() > room {
                    tracing::warn!(
                        peer = endpoint,
                        cap,
                        "a peer announces more agents than allowed; the rest ignored"
                    );
                }
                pending.1.extend(agents.into_iter().take(room));
                if last && let Some((generation, agents)) = conn.snapshot.take() {
                    self.apply_snapshot(endpoint, generation, agents, &mut actions);
                }
            }
            Control::Joined(generation, reg) => {
                let cap = self.policy.agents_per_peer;
                let Some(remote) = self.remotes.get_mut(&endpoint) else {
                    return actions;
                };
                if generation <= remote.generation {
                    return actions;
                }
                remote.generation = generation;
                if remote.agents.len() >= cap && !remote.agents.contains_key(&reg.id) {
                    tracing::warn!(peer = %remote.listen, cap, "a peer announces more agents than allowed; ignored");
                    return actions;
                }
                let id = reg.id.clone();
                remote.agents.insert(id.clone(), reg.clone());
                self.elect_owner(&id, &mut actions);
                self.relay(
                    endpoint,
                    Relayed::Joined {
                        endpoint,
                        generation,
                        agent: reg,
                    },
                    &mut actions,
                );
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
                self.relay(
                    endpoint,
                    Relayed::Left {
                        endpoint,
                        generation,
                        agent: id,
                    },
                    &mut actions,
                );
            }
            Control::Relay(news) => {
                let trusted = match self.policy.exchange {
                    PeerExchange::Off => false,
                    PeerExchange::Authenticated => authenticated,
                    PeerExchange::All => true,
                };
                if trusted {
                    self.on_relay(endpoint, news, &mut actions);
                } else {
                    tracing::debug!(
                        peer = endpoint,
                        "peer exchange from an unauthenticated peer ignored"
                    );
                }
            }
            Control::Ack(..) | Control::Unprocessed(..) | Control::Ping(_) | Control::Drained => {}
        }
        actions
    }

    /// What `source` (a peer connected here) says about an endpoint connected to it.
    fn on_relay(&mut self, source: u64, news: Relayed, actions: &mut Vec<Action>) {
        let about = match &news {
            Relayed::Snapshot { endpoint, .. }
            | Relayed::Joined { endpoint, .. }
            | Relayed::Left { endpoint, .. }
            | Relayed::Gone { endpoint } => *endpoint,
        };
        if about == self.me || about == source {
            return;
        }
        let (agents_cap, endpoints_cap) =
            (self.policy.agents_per_peer, self.policy.endpoints_per_peer);
        let heard = self.heard.entry(source).or_default();
        let changed: Vec<AgentId> = match news {
            Relayed::Snapshot {
                listen,
                generation,
                agents,
                ..
            } => {
                if !heard.contains_key(&about) && heard.len() >= endpoints_cap {
                    tracing::warn!(
                        source,
                        cap = endpoints_cap,
                        "a peer tells of more endpoints than allowed; ignored"
                    );
                    return;
                }
                let entry = heard.entry(about).or_default();
                if entry.listen.is_some() && generation <= entry.generation {
                    return;
                }
                let new: BTreeMap<AgentId, Registration> = agents
                    .into_iter()
                    .take(agents_cap)
                    .map(|r| (r.id.clone(), r))
                    .collect();
                let mut changed: Vec<AgentId> = entry
                    .agents
                    .keys()
                    .filter(|id| !new.contains_key(*id))
                    .cloned()
                    .collect();
                changed.extend(
                    new.keys()
                        .filter(|id| !entry.agents.contains_key(*id))
                        .cloned(),
                );
                entry.listen = Some(listen);
                entry.generation = generation;
                entry.agents = new;
                changed
            }
            Relayed::Joined {
                generation, agent, ..
            } => {
                let Some(entry) = heard.get_mut(&about).filter(|e| e.listen.is_some()) else {
                    return;
                };
                if generation <= entry.generation
                    || (entry.agents.len() >= agents_cap && !entry.agents.contains_key(&agent.id))
                {
                    return;
                }
                entry.generation = generation;
                let id = agent.id.clone();
                entry.agents.insert(id.clone(), agent);
                vec![id]
            }
            Relayed::Left {
                generation, agent, ..
            } => {
                let Some(entry) = heard.get_mut(&about) else {
                    return;
                };
                if generation <= entry.generation {
                    return;
                }
                entry.generation = generation;
                entry.agents.remove(&agent);
                vec![agent]
            }
            Relayed::Gone { .. } => match heard.remove(&about) {
                Some(entry) => entry.agents.into_keys().collect(),
                None => return,
            },
        };
        for id in changed {
            self.reconsider(&id, actions);
        }
    }

    /// Replaces a direct endpoint's agents with a hello's list, if the hello is newer.
    fn apply_snapshot(
        &mut self,
        endpoint: u64,
        generation: u64,
        agents: Vec<Registration>,
        actions: &mut Vec<Action>,
    ) {
        let cap = self.policy.agents_per_peer;
        let Some(remote) = self.remotes.get_mut(&endpoint) else {
            return;
        };
        if generation < remote.generation || (generation == remote.generation && generation > 0) {
            return;
        }
        remote.generation = generation;
        if agents.len() > cap {
            tracing::warn!(peer = %remote.listen, cap, "a peer announces more agents than allowed; the rest ignored");
        }
        let new: BTreeMap<AgentId, Registration> = agents
            .into_iter()
            .take(cap)
            .map(|r| (r.id.clone(), r))
            .collect();
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
        let news = snapshot(endpoint, remote);
        for id in gone {
            self.disown(&id, endpoint, actions);
        }
        for id in added {
            self.elect_owner(&id, actions);
        }
        self.relay(endpoint, news, actions);
    }

    /// The endpoints claiming `id`: connected ones first, then those peers told of; each
    /// with the registration and the address it is known at.
    fn claimants(&self, id: &AgentId) -> Vec<(u64, Registration, SocketAddr, bool)> {
        let mut out: Vec<(u64, Registration, SocketAddr, bool)> = self
            .remotes
            .iter()
            .filter_map(|(e, r)| {
                r.agents
                    .get(id)
                    .map(|reg| (*e, reg.clone(), r.listen, true))
            })
            .collect();
        for heard in self.heard.values() {
            for (e, h) in heard {
                if self.remotes.contains_key(e) || *e == self.me {
                    continue;
                }
                if let (Some(reg), Some(listen)) = (h.agents.get(id), h.listen)
                    && !out.iter().any(|(x, ..)| x == e)
                {
                    out.push((*e, reg.clone(), listen, false));
                }
            }
        }
        // Deterministic: connected first, then by endpoint id.
        out.sort_by_key(|(e, _, _, direct)| (!*direct, *e));
        out
    }

    /// Routes `id` to an endpoint claiming it, if none owns it yet and it is not local;
    /// reports a second claimant of an owned id.
    fn elect_owner(&mut self, id: &AgentId, actions: &mut Vec<Action>) {
        let claimants = self.claimants(id);
        if let Some(owner) = self.owner.get(id).copied() {
            for (e, _, listen, _) in &claimants {
                if *e != owner && self.conflicts.insert((id.clone(), *e)) {
                    tracing::warn!(agent = %id, owner, other = *e, "two endpoints announce the same agent id; the first keeps it");
                    actions.push(Action::Publish(Event::AgentConflict {
                        agent: id.clone(),
                        claimed_by: (*listen).into(),
                    }));
                }
            }
            return;
        }
        if self.locals.contains_key(id) {
            for (e, _, listen, _) in &claimants {
                if self.conflicts.insert((id.clone(), *e)) {
                    actions.push(Action::Publish(Event::AgentConflict {
                        agent: id.clone(),
                        claimed_by: (*listen).into(),
                    }));
                }
            }
            return;
        }
        let Some((endpoint, reg, listen, direct)) = claimants.first().cloned() else {
            return;
        };
        let state = if direct {
            PeerState::Connected
        } else {
            PeerState::Known
        };
        let info = reg.peer_info(Some(listen.into()), state);
        self.owner.insert(id.clone(), endpoint);
        actions.push(Action::Publish(Event::PeerDiscovered(info)));
        match self.remotes.get(&endpoint) {
            Some(r) if direct => actions.push(Action::Reachable {
                agent: id.clone(),
                conn: r.active,
            }),
            _ => actions.push(Action::Known {
                agent: id.clone(),
                addr: listen,
            }),
        }
        for (e, _, listen, _) in &claimants[1..] {
            if self.conflicts.insert((id.clone(), *e)) {
                actions.push(Action::Publish(Event::AgentConflict {
                    agent: id.clone(),
                    claimed_by: (*listen).into(),
                }));
            }
        }
    }

    /// `id` changed at some endpoint: if its owner no longer claims it, it leaves (or moves
    /// to another claimant); if it has no owner, one may be elected.
    fn reconsider(&mut self, id: &AgentId, actions: &mut Vec<Action>) {
        if let Some(owner) = self.owner.get(id).copied() {
            let still = self.claimants(id).iter().any(|(e, ..)| *e == owner);
            if !still {
                self.owner.remove(id);
                actions.push(Action::Publish(Event::PeerLeft(id.clone())));
            }
        }
        self.elect_owner(id, actions);
    }

    /// `endpoint` no longer hosts `id`: if it owned it, the agent left (or moves to another
    /// claimant).
    fn disown(&mut self, id: &AgentId, endpoint: u64, actions: &mut Vec<Action>) {
        if self.owner.get(id) == Some(&endpoint) {
            self.reconsider(id, actions);
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
            self.lose_endpoint(endpoint, Some(reason), &mut actions);
        }
        actions
    }

    /// Forgets a remote endpoint: what it told first-hand and what it relayed; its agents
    /// leave (unless a peer still tells of them: they are then known, not connected); its
    /// other connections are retired; its peers are told.
    fn lose_endpoint(&mut self, endpoint: u64, reason: Option<String>, actions: &mut Vec<Action>) {
        let Some(remote) = self.remotes.remove(&endpoint) else {
            return;
        };
        if self.by_addr.get(&remote.listen) == Some(&endpoint) {
            self.by_addr.remove(&remote.listen);
        }
        // What others relayed about it is stale now: its connection here just failed.
        for heard in self.heard.values_mut() {
            heard.remove(&endpoint);
        }
        let relayed: Vec<AgentId> = self
            .heard
            .remove(&endpoint)
            .map(|h| h.into_values().flat_map(|e| e.agents.into_keys()).collect())
            .unwrap_or_default();
        for id in remote.agents.keys().chain(relayed.iter()) {
            self.reconsider(id, actions);
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
        self.relay(endpoint, Relayed::Gone { endpoint }, actions);
        let reason = reason.unwrap_or_else(|| "replaced by a new endpoint at its address".into());
        tracing::info!(peer = %remote.listen, %reason, "connection lost");
        actions.push(Action::Publish(Event::ConnectionLost {
            addr: remote.listen.into(),
            reason,
        }));
    }

    // ----- queries -----

    /// Where remote agent `id` can be reached.
    pub(crate) fn route(&self, id: &AgentId) -> Option<Route<'_>> {
        let endpoint = self.owner.get(id)?;
        if let Some(remote) = self.remotes.get(endpoint) {
            return Some(Route::Direct(
                remote.active,
                remote.agents.get(id)?,
                remote.listen,
            ));
        }
        self.heard
            .values()
            .filter_map(|h| h.get(endpoint))
            .find_map(|h| Some(Route::Dial(h.listen?, h.agents.get(id)?)))
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

    /// Remote agents this endpoint routes to: registration, address, and the connection in
    /// use if there is one.
    pub(crate) fn remote_agents(
        &self,
    ) -> impl Iterator<Item = (&Registration, SocketAddr, Option<ConnKey>)> {
        self.owner.keys().filter_map(|id| match self.route(id)? {
            Route::Direct(k, reg, listen) => Some((reg, listen, Some(k))),
            Route::Dial(listen, reg) => Some((reg, listen, None)),
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
        self.heard.clear();
        self.by_addr.clear();
        self.conns.clear();
        actions
    }
}

/// A relay snapshot of a direct peer.
fn snapshot(endpoint: u64, r: &Remote) -> Relayed {
    Relayed::Snapshot {
        endpoint,
        listen: r.listen,
        generation: r.generation,
        agents: r.agents.values().cloned().collect(),
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
                reg: Registry::new(id, Policy::default()),
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
                    Action::Orphaned(_)
                    | Action::HandOver(_)
                    | Action::Reachable { .. }
                    | Action::Known { .. } => {}
                }
            }
        }

        /// Starts the handshake of global connection `n`; the hello goes first on it.
        fn begin(&mut self, n: u32, rank: Rank) {
            let (key, generation, agents) = self.reg.begin();
            self.keys.insert(n, key);
            let hello = PeerHello {
                endpoint: self.id,
                listen: self.listen,
                rank,
                authenticated: true,
            };
            // The hello, then the membership snapshot taken with it.
            let snapshot = Control::Snapshot {
                generation,
                agents,
                last: true,
            };
            self.out.insert(
                key,
                VecDeque::from([Frame::Hello(hello), Frame::Control(snapshot)]),
            );
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

    /// A hello, with the membership snapshot that follows it on the control stream.
    struct Greeting {
        hello: PeerHello,
        generation: u64,
        agents: Vec<Registration>,
    }

    fn hello(endpoint: u64, port: u16, generation: u64, agents: &[&str]) -> Greeting {
        Greeting {
            hello: PeerHello {
                endpoint,
                listen: addr(port),
                rank: (endpoint, 0),
                authenticated: true,
            },
            generation,
            agents: agents.iter().map(|a| reg(a)).collect(),
        }
    }

    impl Registry {
        /// The peer's hello, then its snapshot.
        fn greet(&mut self, key: ConnKey, g: Greeting) -> Result<Vec<Action>, Refusal> {
            let mut actions = self.on_hello(key, g.hello)?;
            actions.extend(self.on_control(
                key,
                Control::Snapshot {
                    generation: g.generation,
                    agents: g.agents,
                    last: true,
                },
            ));
            Ok(actions)
        }
    }

    fn direct_conn(r: &Registry, id: &str) -> Option<ConnKey> {
        match r.route(&id.into()) {
            Some(Route::Direct(k, ..)) => Some(k),
            _ => None,
        }
    }

    fn registry(me: u64) -> Registry {
        Registry::new(me, Policy::default())
    }

    fn relays(actions: &[Action], to: ConnKey) -> Vec<Relayed> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(k, Control::Relay(r)) if *k == to => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn published(actions: &[Action]) -> Vec<&Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_hub_relays_what_it_knows_first_hand_and_only_that() {
        // The hub, connected to b (endpoint 20) then c (endpoint 30).
        let mut hub = registry(1);
        let (kb, ..) = hub.begin();
        hub.greet(kb, hello(20, 2000, 1, &["b"])).expect("b");
        let (kc, ..) = hub.begin();
        let actions = hub.greet(kc, hello(30, 3000, 1, &["c"])).expect("c");
        // c is told of b; b is told of c.
        assert!(
            matches!(
                &relays(&actions, kc)[..],
                [Relayed::Snapshot { endpoint: 20, .. }]
            ),
            "{actions:?}"
        );
        assert!(
            matches!(
                &relays(&actions, kb)[..],
                [Relayed::Snapshot { endpoint: 30, .. }]
            ),
            "{actions:?}"
        );
        // A change at b is relayed to c; what c relays is never relayed further.
        let actions = hub.on_control(kb, Control::Joined(2, reg("b2")));
        assert!(matches!(
            &relays(&actions, kc)[..],
            [Relayed::Joined { endpoint: 20, .. }]
        ));
        let actions = hub.on_control(
            kc,
            Control::Relay(Relayed::Snapshot {
                endpoint: 99,
                listen: addr(9900),
                generation: 1,
                agents: vec![reg("far")],
            }),
        );
        assert!(relays(&actions, kb).is_empty(), "one hop only: {actions:?}");
        // Losing b tells c.
        let actions = hub.on_connection_lost(kb, false, "gone".into(), Instant::now());
        assert!(matches!(
            &relays(&actions, kc)[..],
            [Relayed::Gone { endpoint: 20 }]
        ));
    }

    #[test]
    fn relayed_agents_are_known_until_their_endpoint_is_connected_or_gone() {
        let mut c = registry(30);
        let (kh, ..) = c.begin();
        c.greet(kh, hello(1, 1000, 1, &["hub"])).expect("hub");
        let actions = c.on_control(
            kh,
            Control::Relay(Relayed::Snapshot {
                endpoint: 20,
                listen: addr(2000),
                generation: 1,
                agents: vec![reg("b")],
            }),
        );
        assert!(
            actions.contains(&Action::Known {
                agent: "b".into(),
                addr: addr(2000)
            }),
            "{actions:?}"
        );
        assert!(
            matches!(&published(&actions)[..], [Event::PeerDiscovered(p)] if p.state == PeerState::Known)
        );
        assert!(matches!(c.route(&"b".into()), Some(Route::Dial(a, _)) if a == addr(2000)));
        // Connected directly: the same agent, now reachable over the connection.
        let (kb, ..) = c.begin();
        let actions = c.greet(kb, hello(20, 2000, 1, &["b"])).expect("b");
        assert!(
            actions.contains(&Action::Reachable {
                agent: "b".into(),
                conn: kb
            }),
            "{actions:?}"
        );
        assert!(
            published(&actions)
                .iter()
                .all(|e| !matches!(e, Event::PeerDiscovered(_))),
            "not discovered twice"
        );
        assert!(matches!(c.route(&"b".into()), Some(Route::Direct(k, ..)) if k == kb));
        // Another endpoint that the hub says is gone leaves.
        c.on_control(
            kh,
            Control::Relay(Relayed::Snapshot {
                endpoint: 40,
                listen: addr(4000),
                generation: 1,
                agents: vec![reg("d")],
            }),
        );
        let actions = c.on_control(kh, Control::Relay(Relayed::Gone { endpoint: 40 }));
        assert_eq!(published(&actions), [&Event::PeerLeft("d".into())]);
        // Losing the hub forgets what it relayed.
        c.on_control(
            kh,
            Control::Relay(Relayed::Snapshot {
                endpoint: 50,
                listen: addr(5000),
                generation: 1,
                agents: vec![reg("e")],
            }),
        );
        let actions = c.on_connection_lost(kh, true, "bye".into(), Instant::now());
        assert!(
            published(&actions).contains(&&Event::PeerLeft("e".into())),
            "{actions:?}"
        );
        assert!(
            c.route(&"b".into()).is_some(),
            "b is still connected directly"
        );
    }

    #[test]
    fn relays_from_an_unauthenticated_peer_are_ignored_and_caps_hold() {
        let mut r = Registry::new(
            1,
            Policy {
                endpoints_per_peer: 2,
                agents_per_peer: 2,
                ..Policy::default()
            },
        );
        let (k, ..) = r.begin();
        let mut stranger = hello(9, 900, 1, &[]);
        stranger.hello.authenticated = false;
        r.greet(k, stranger).expect("hello");
        let steer = Control::Relay(Relayed::Snapshot {
            endpoint: 66,
            listen: addr(6666),
            generation: 1,
            agents: vec![reg("bait")],
        });
        assert!(
            r.on_control(k, steer.clone()).is_empty(),
            "nothing learnt from a stranger"
        );
        assert!(r.route(&"bait".into()).is_none());
        // An authenticated peer is believed, within its caps.
        let (k2, ..) = r.begin();
        r.greet(k2, hello(8, 800, 1, &["a", "b", "c"]))
            .expect("hello");
        assert_eq!(r.remote_agents().count(), 2, "agents per peer capped");
        for e in 0..5u64 {
            r.on_control(
                k2,
                Control::Relay(Relayed::Snapshot {
                    endpoint: 100 + e,
                    listen: addr(100 + e as u16),
                    generation: 1,
                    agents: vec![reg(&format!("r{e}"))],
                }),
            );
        }
        assert_eq!(r.heard[&8].len(), 2, "endpoints per peer capped");
    }

    #[test]
    fn a_duplicate_is_retired_by_draining_not_by_a_timer() {
        let mut r = registry(1);
        let (k1, ..) = r.begin();
        r.greet(k1, hello(9, 900, 1, &["x"])).expect("first");
        let (k2, ..) = r.begin();
        let mut smaller = hello(9, 900, 1, &["x"]);
        smaller.hello.rank = (0, 0);
        let actions = r.greet(k2, smaller).expect("second");
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
        assert_eq!(direct_conn(&r, "x"), Some(k2));
        // The retired one ending changes nothing: the endpoint is still reachable.
        let actions = r.on_connection_lost(k1, true, "retired".into(), Instant::now());
        assert_eq!(actions, [Action::Orphaned(k1)]);
        assert!(r.route(&"x".into()).is_some());
    }

    #[test]
    fn a_restarted_peer_at_the_same_address_replaces_the_dead_connection_at_once() {
        let mut r = registry(1);
        let (k1, ..) = r.begin();
        r.greet(k1, hello(9, 900, 3, &["x", "y"])).expect("first");
        let (k2, ..) = r.begin();
        let actions = r.greet(k2, hello(77, 900, 1, &["x"])).expect("restarted");
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
        assert_eq!(direct_conn(&r, "x"), Some(k2));
        assert!(r.route(&"y".into()).is_none());
    }

    #[test]
    fn an_agent_announced_by_two_endpoints_stays_with_the_first_until_it_is_gone() {
        let mut r = registry(1);
        let (k1, ..) = r.begin();
        r.greet(k1, hello(9, 900, 1, &["x"])).expect("first");
        let (k2, ..) = r.begin();
        let actions = r.greet(k2, hello(8, 800, 1, &["x"])).expect("second");
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Publish(Event::PeerDiscovered(_)))),
            "{actions:?}"
        );
        assert!(
            actions.contains(&Action::Publish(Event::AgentConflict {
                agent: "x".into(),
                claimed_by: addr(800).into()
            })),
            "the claim is refused and reported: {actions:?}"
        );
        assert_eq!(direct_conn(&r, "x"), Some(k1), "no silent overwrite");
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
        let mut r = registry(1);
        let (k, ..) = r.begin();
        r.greet(k, hello(9, 900, 5, &["x"])).expect("hello");
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
        let mut r = registry(1);
        let (k, generation, agents) = r.begin();
        assert_eq!((generation, agents.len()), (0, 0));
        let actions = r.attach(reg("late")).expect("attach");
        assert!(
            matches!(&actions[..], [Action::Send(key, Control::Joined(1, reg))] if *key == k && reg.id.as_str() == "late")
        );
    }
}
