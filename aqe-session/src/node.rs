//! The node: what one endpoint decides across its sessions, sans-IO. It hosts the local
//! agents' registrations and announces them (generations, snapshots), routes every remote
//! agent id to one session (the first to announce it; a second claimant is refused and
//! reported), keeps what peers relayed about other endpoints, and holds the reliable
//! messages whose session lost its link until another way takes them or their deadline
//! passes.
//!
//! Inputs are method calls; outputs are [`Action`]s returned by each step, performed by the
//! transport in order: a redelivery into a session is always before the route that makes
//! newer messages go there.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_core::{Address, AgentId, ChannelName, Event, PeerState, Registration};

use crate::config::{
    Config, MAX_REGISTRATION, MAX_SNAPSHOT_PARTS, PeerExchange, SNAPSHOT_PART_BYTES,
};
use crate::frame::{Frame, Relayed};
use crate::outbox::{Flow, Orphan, Settled};
use crate::peer::AgentsChange;
use crate::session::{Ended, Rank, SessionInput};
use crate::{EndpointId, SessionId, Trust};

/// How long messages an endpoint refused because their agent was not there wait before
/// they are offered to it again, when its membership has not said where the agent went.
pub const DISPLACED_RECHECK: Duration = Duration::from_millis(200);

/// How messages came to wait at the node.
#[derive(Clone, Copy)]
enum Orphaned {
    /// Their session ended (`replaced`: by a newer one with the same endpoint).
    Lost { replaced: bool, now: Instant },
    /// Session `by`'s peer refused them: their agent was not there.
    Refused { by: SessionId, now: Instant },
}

/// What a session tells its node.
#[derive(Debug)]
pub enum NodeInput<M> {
    /// The session started (its link is up).
    Linked,
    /// The session is over.
    Ended {
        /// Unsettled messages, in the order they were accepted.
        orphans: Vec<Orphan<M>>,
        /// Why.
        why: Ended,
        /// For each ordered flow it carried, when its newest message was accepted.
        marks: Vec<(Flow, Instant)>,
    },
    /// The peer refused these because their agent is not there (it left, or stopped before
    /// taking them): they wait for the agent to be reached another way, or to come back.
    Displaced {
        /// The messages, in the order they were accepted.
        orphans: Vec<Orphan<M>>,
    },
    /// The peer's agents changed.
    Agents(AgentsChange),
    /// The peer relayed news of another endpoint.
    Relay(Relayed),
    /// The peer asks for this endpoint's membership.
    SnapshotRequested,
}

/// Where a remote agent is reached.
#[derive(Debug, Clone)]
pub enum Route {
    /// Over this session.
    Session {
        /// The session.
        session: SessionId,
        /// The agent's registration.
        reg: Arc<Registration>,
        /// Where its endpoint is, for events and reports.
        address: Address,
    },
    /// By making a link to the endpoint listening at `addr` (known through peer exchange).
    Dial {
        /// Where.
        addr: SocketAddr,
        /// Who is expected there.
        endpoint: EndpointId,
        /// The agent's registration.
        reg: Arc<Registration>,
    },
}

impl Route {
    /// The agent's registration.
    pub fn registration(&self) -> &Arc<Registration> {
        match self {
            Route::Session { reg, .. } | Route::Dial { reg, .. } => reg,
        }
    }
}

/// What the transport must do after a node step, in order.
#[derive(Debug)]
pub enum Action<M> {
    /// Hand this to that session.
    Session(SessionId, SessionInput<M>),
    /// Agent `agent` is now reached this way (`None`: not at all, unless it is local).
    Route {
        /// The agent.
        agent: AgentId,
        /// How.
        to: Option<Route>,
    },
    /// Publish this event.
    Publish(Event),
    /// Make a link to the endpoint at `addr`: messages wait for an agent there.
    Dial {
        /// Where.
        addr: SocketAddr,
        /// Who is expected there.
        endpoint: EndpointId,
    },
    /// Messages wait for `agent` and no session reaches it: give them to the redelivery
    /// handler, one by one ([`Node::take_orphan`]).
    HandOff(AgentId),
    /// These messages are settled (failed at their deadline, or at shutdown).
    Settled(Vec<Settled<M>>),
    /// The session is over: drop it.
    Forget(SessionId),
}

/// Why an agent cannot attach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// An agent of that id is attached here already.
    #[error("agent {0} is already attached to this endpoint")]
    Taken(AgentId),
    /// Its registration is too large to announce.
    #[error(
        "agent {id} announces {size} bytes of registration (channels, capabilities, metadata); at most {max} travel to peers"
    )]
    TooLarge {
        /// The agent.
        id: AgentId,
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The node is shutting down.
    #[error("shut down")]
    Shutdown,
}

struct Peer {
    endpoint: EndpointId,
    rank: Rank,
    trust: Trust,
    listen: Option<SocketAddr>,
    address: Address,
    linked: bool,
    /// Its membership is known (a snapshot was applied): what peers relayed about it gives
    /// way to what it says.
    synced: bool,
    generation: u64,
    agents: BTreeMap<AgentId, Arc<Registration>>,
}

#[derive(Default)]
struct Heard {
    listen: Option<SocketAddr>,
    generation: u64,
    agents: BTreeMap<AgentId, Arc<Registration>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Owner {
    Session(SessionId),
    Heard(EndpointId),
}

/// What a handshake leads to (see [`Node::open`]).
#[derive(Debug)]
pub enum Opened<M> {
    /// A new session: the transport makes the [`Session`](crate::Session) with this id, after
    /// performing the actions (which end a session it replaces, and probe older
    /// incarnations).
    Fresh {
        /// Its handle.
        id: SessionId,
        /// What to do first.
        actions: Vec<Action<M>>,
    },
    /// The session of this very handshake exists already (a repeated hello).
    Existing(SessionId),
    /// A session of smaller rank with the peer lives: this handshake loses; its link is
    /// closed. The transport may check that the living one still answers.
    Refused(SessionId),
}

/// The node (see the module docs).
pub struct Node<M> {
    me: EndpointId,
    address: Address,
    config: Arc<Config>,
    generation: u64,
    locals: BTreeMap<AgentId, Registration>,
    peers: BTreeMap<SessionId, Peer>,
    by_endpoint: BTreeMap<EndpointId, SessionId>,
    next_id: u64,
    owner: BTreeMap<AgentId, Owner>,
    conflicts: BTreeSet<(AgentId, EndpointId)>,
    heard: BTreeMap<SessionId, BTreeMap<EndpointId, Heard>>,
    waiting: BTreeMap<AgentId, VecDeque<Orphan<M>>>,
    /// Agents whose messages their endpoint refused while it still announces them: when to
    /// offer them there again (the agent may be back before its membership says so).
    recheck: BTreeMap<AgentId, Instant>,
    /// For each ordered flow to each peer endpoint, when its newest message went to the
    /// endpoint over a session now ended: an older one sent there now would arrive out of
    /// order, and fails instead. Kept for the delivery deadline.
    marks: BTreeMap<(EndpointId, Flow), Instant>,
    /// For each ordered flow, when the newest message given to the redelivery handler was
    /// accepted: the handler reaches the agent by another way, so an older message of the
    /// flow sent after it, by any way, could arrive out of order.
    handed: BTreeMap<Flow, Instant>,
    handing_off: BTreeSet<AgentId>,
    /// Endpoints lost without a goodbye, since when.
    lost: BTreeMap<EndpointId, Instant>,
    /// Whether a redelivery handler takes messages no session reaches.
    handler: bool,
    closing: bool,
}

impl<M> std::fmt::Debug for Node<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("me", &self.me)
            .field("generation", &self.generation)
            .field("sessions", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<M> Node<M> {
    /// The node of endpoint `me`, known to others at `address`.
    pub fn new(me: EndpointId, address: Address, config: Arc<Config>) -> Self {
        Self {
            me,
            address,
            config,
            generation: 0,
            locals: BTreeMap::new(),
            peers: BTreeMap::new(),
            by_endpoint: BTreeMap::new(),
            next_id: 1,
            owner: BTreeMap::new(),
            conflicts: BTreeSet::new(),
            heard: BTreeMap::new(),
            waiting: BTreeMap::new(),
            recheck: BTreeMap::new(),
            marks: BTreeMap::new(),
            handed: BTreeMap::new(),
            handing_off: BTreeSet::new(),
            lost: BTreeMap::new(),
            handler: false,
            closing: false,
        }
    }

    /// Whether a redelivery handler (another transport) takes the messages no session
    /// reaches: without one they wait for a session, or their deadline.
    pub fn set_redelivery(&mut self, handler: bool) {
        self.handler = handler;
    }

    /// This endpoint.
    pub fn me(&self) -> EndpointId {
        self.me
    }

    /// This endpoint's membership generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The configuration its sessions share.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    fn linked(&self) -> impl Iterator<Item = (SessionId, &Peer)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.linked)
            .map(|(id, p)| (*id, p))
    }

    // ----- local agents -----

    /// Hosts `reg`: announced to every session.
    ///
    /// # Errors
    /// [`AttachError`].
    pub fn attach(&mut self, reg: Registration) -> Result<Vec<Action<M>>, AttachError> {
        if self.closing {
            return Err(AttachError::Shutdown);
        }
        if self.locals.contains_key(&reg.id) {
            return Err(AttachError::Taken(reg.id));
        }
        let size = postcard::experimental::serialized_size(&reg).unwrap_or(usize::MAX);
        if size > MAX_REGISTRATION {
            return Err(AttachError::TooLarge {
                id: reg.id,
                size,
                max: MAX_REGISTRATION,
            });
        }
        self.generation += 1;
        let mut actions: Vec<Action<M>> = self
            .linked()
            .map(|(s, _)| {
                Action::Session(
                    s,
                    SessionInput::Send(Frame::Joined {
                        generation: self.generation,
                        agent: reg.clone(),
                    }),
                )
            })
            .collect();
        actions.push(Action::Publish(Event::PeerDiscovered(
            reg.peer_info(Some(self.address.clone()), PeerState::Connected),
        )));
        // A local agent shadows a remote one of the same id.
        if self.owner.remove(&reg.id).is_some() {
            tracing::warn!(agent = %reg.id, "a local agent shadows a remote one of the same id");
            actions.push(Action::Route {
                agent: reg.id.clone(),
                to: None,
            });
        }
        self.locals.insert(reg.id.clone(), reg);
        Ok(actions)
    }

    /// Stops hosting `id`; `None` if it was not here.
    pub fn detach(&mut self, id: &AgentId) -> Option<Vec<Action<M>>> {
        self.locals.remove(id)?;
        self.generation += 1;
        let mut actions: Vec<Action<M>> = self
            .linked()
            .map(|(s, _)| {
                Action::Session(
                    s,
                    SessionInput::Send(Frame::Left {
                        generation: self.generation,
                        agent: id.clone(),
                    }),
                )
            })
            .collect();
        actions.push(Action::Publish(Event::PeerLeft(id.clone())));
        // A remote agent of that id, shadowed until now, becomes reachable.
        self.elect(id, &mut actions);
        Some(actions)
    }

    /// The local agents' registrations.
    pub fn locals(&self) -> impl Iterator<Item = &Registration> {
        self.locals.values()
    }

    /// This endpoint's membership as snapshot frames, each part within
    /// [`SNAPSHOT_PART_BYTES`].
    pub fn snapshot(&self) -> Vec<Frame> {
        let mut parts: Vec<Vec<Registration>> = vec![Vec::new()];
        let mut size = 0;
        for reg in self.locals.values() {
            let len = postcard::experimental::serialized_size(reg).unwrap_or(SNAPSHOT_PART_BYTES);
            if size + len > SNAPSHOT_PART_BYTES
                && parts.last().is_some_and(|p| !p.is_empty())
                && parts.len() < usize::from(MAX_SNAPSHOT_PARTS)
            {
                parts.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(p) = parts.last_mut() {
                p.push(reg.clone());
            }
        }
        let n = u16::try_from(parts.len()).unwrap_or(MAX_SNAPSHOT_PARTS);
        parts
            .into_iter()
            .enumerate()
            .map(|(i, agents)| Frame::Snapshot {
                generation: self.generation,
                part: u16::try_from(i).unwrap_or(0),
                parts: n,
                agents,
            })
            .collect()
    }

    // ----- sessions -----

    /// A handshake with `peer`, of `rank`, passed its hello checks: the session it makes.
    ///
    /// One session per peer endpoint. Against a living session of another rank: a new
    /// handshake by the same initiator replaces it (the initiator started over); otherwise
    /// the smaller rank is kept (two handshakes crossed), and both sides decide alike. A
    /// newer incarnation of a proven key makes the older ones prove they live
    /// ([`SessionInput::Probe`]).
    pub fn open(
        &mut self,
        peer: EndpointId,
        rank: Rank,
        trust: Trust,
        listen: Option<SocketAddr>,
        address: Address,
    ) -> Opened<M> {
        let mut actions = Vec::new();
        if let Some(&old) = self.by_endpoint.get(&peer)
            && let Some(p) = self.peers.get(&old)
        {
            if p.rank == rank {
                return Opened::Existing(old);
            }
            if p.rank.initiator != rank.initiator && p.rank < rank {
                return Opened::Refused(old);
            }
            tracing::debug!(peer = ?peer, "a new session replaces the one there was");
            actions.push(Action::Session(old, SessionInput::End(Ended::Superseded)));
        }
        let id = SessionId(self.next_id);
        self.next_id += 1;
        if let crate::Principal::Key(key) = trust.principal {
            for (s, p) in self.linked() {
                if p.endpoint.key == key
                    && p.endpoint.incarnation < peer.incarnation
                    && p.trust.principal == trust.principal
                {
                    actions.push(Action::Session(s, SessionInput::Probe));
                }
            }
        }
        self.peers.insert(
            id,
            Peer {
                endpoint: peer,
                rank,
                trust,
                listen,
                address,
                linked: false,
                synced: false,
                generation: 0,
                agents: BTreeMap::new(),
            },
        );
        self.by_endpoint.insert(peer, id);
        Opened::Fresh { id, actions }
    }

    /// The session of endpoint `peer`, if there is one.
    pub fn session_of(&self, peer: &EndpointId) -> Option<SessionId> {
        self.by_endpoint.get(peer).copied()
    }

    /// What session `s` told; what to do about it.
    pub fn on(&mut self, s: SessionId, input: NodeInput<M>, now: Instant) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        match input {
            NodeInput::Linked => self.on_linked(s, &mut actions),
            NodeInput::Ended {
                orphans,
                why,
                marks,
            } => {
                if let Some(p) = self.peers.get(&s) {
                    let endpoint = p.endpoint;
                    let deadline = self.config.delivery_deadline;
                    self.marks.retain(|_, t| *t + deadline > now);
                    self.handed.retain(|_, t| *t + deadline > now);
                    for (flow, t) in marks {
                        let m = self.marks.entry((endpoint, flow)).or_insert(t);
                        *m = (*m).max(t);
                    }
                }
                let reason = match why {
                    Ended::Goodbye => "it shut down",
                    Ended::Unresponsive => "nothing heard from it for the liveness timeout",
                    Ended::Replaced => "a newer incarnation replaced it",
                    Ended::Violation(_) => "it broke the protocol",
                    Ended::Shutdown => "this endpoint shuts down",
                    Ended::LinkLost => "the link to it was lost",
                    Ended::Superseded => "a newer session with it replaced this one",
                    Ended::Reset => "it ended its side of the session",
                };
                let clean = matches!(why, Ended::Goodbye | Ended::Shutdown | Ended::Superseded);
                // What the session left waits before its agents are routed anew: a session
                // they move to takes it ahead of the route, so no newer message passes it.
                // Where it goes otherwise is decided once they are (`place_orphans`).
                let touched = self.wait(orphans, &mut actions);
                self.unlink(s, reason, &touched, &mut actions);
                // Another session with the same endpoint lives (crossed or restarted
                // handshakes): what this one leaves waits a moment for it.
                let mut replaced = why == Ended::Superseded;
                let mut agents = Vec::new();
                if let Some(p) = self.peers.remove(&s) {
                    replaced |= self
                        .by_endpoint
                        .get(&p.endpoint)
                        .is_some_and(|other| *other != s);
                    if !clean {
                        self.lost.insert(p.endpoint, now);
                    }
                    if self.by_endpoint.get(&p.endpoint) == Some(&s) {
                        self.by_endpoint.remove(&p.endpoint);
                        self.conflicts.retain(|(_, e)| *e != p.endpoint);
                    }
                    agents = p.agents.into_keys().collect();
                }
                for id in &agents {
                    self.reassign(id, &mut actions);
                    if !touched.contains(id) && !self.owner.contains_key(id) {
                        self.hand_off(id, &mut actions);
                    }
                }
                self.place_orphans(touched, Orphaned::Lost { replaced, now }, &mut actions);
                actions.push(Action::Forget(s));
            }
            NodeInput::Displaced { orphans } => {
                let touched = self.wait(orphans, &mut actions);
                self.place_orphans(touched, Orphaned::Refused { by: s, now }, &mut actions);
            }
            NodeInput::Agents(change) => self.on_agents(s, change, &mut actions),
            NodeInput::Relay(news) => self.on_relay(s, news, &mut actions),
            NodeInput::SnapshotRequested => {
                for f in self.snapshot() {
                    actions.push(Action::Session(s, SessionInput::Send(f)));
                }
            }
        }
        actions
    }

    fn on_linked(&mut self, s: SessionId, actions: &mut Vec<Action<M>>) {
        let Some(p) = self.peers.get_mut(&s) else {
            return;
        };
        p.linked = true;
        let (endpoint, address, trust) = (p.endpoint, p.address.clone(), p.trust);
        self.lost.remove(&endpoint);
        actions.push(Action::Publish(Event::ConnectionEstablished {
            addr: address,
        }));
        for f in self.snapshot() {
            actions.push(Action::Session(s, SessionInput::Send(f)));
        }
        // Relays: of the others to an authenticated newcomer.
        if self.config.exchange != PeerExchange::Off && trust.authenticated {
            let news: Vec<Relayed> = self
                .linked()
                .filter(|(o, p)| *o != s && p.trust.authenticated)
                .filter_map(|(_, p)| relayed(p))
                .collect();
            for n in news {
                actions.push(Action::Session(s, SessionInput::Send(Frame::Relay(n))));
            }
        }
        // Agents it announced before (a link back) and agents heard of it are reachable
        // directly again.
        let mut ids: Vec<AgentId> = self.peers[&s].agents.keys().cloned().collect();
        for h in self.heard.values() {
            if let Some(e) = h.get(&endpoint) {
                ids.extend(e.agents.keys().cloned());
            }
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            self.reconsider(&id, actions);
        }
        if let Some(p) = self.peers.get(&s)
            && !p.agents.is_empty()
        {
            self.relay_about(s, actions);
        }
    }

    /// `s` ended: its agents are not reached through it any more, and are routed anew. Where
    /// what waits for `held` goes, if nothing reaches them now, the caller decides.
    fn unlink(
        &mut self,
        s: SessionId,
        reason: &str,
        held: &[AgentId],
        actions: &mut Vec<Action<M>>,
    ) {
        let Some(p) = self.peers.get_mut(&s) else {
            return;
        };
        if !std::mem::take(&mut p.linked) {
            return;
        }
        let (endpoint, address, trust) = (p.endpoint, p.address.clone(), p.trust);
        let ids: Vec<AgentId> = p.agents.keys().cloned().collect();
        tracing::info!(peer = ?endpoint, reason, "link lost");
        actions.push(Action::Publish(Event::ConnectionLost {
            addr: address,
            reason: reason.to_owned(),
        }));
        // What it relayed is stale now.
        let relayed: Vec<AgentId> = self
            .heard
            .remove(&s)
            .map(|h| h.into_values().flat_map(|e| e.agents.into_keys()).collect())
            .unwrap_or_default();
        for id in ids.iter().chain(relayed.iter()) {
            if held.contains(id) {
                self.reassign(id, actions);
            } else {
                self.reconsider(id, actions);
            }
        }
        if self.config.exchange != PeerExchange::Off && trust.authenticated {
            self.relay_to_others(s, Relayed::Gone { endpoint }, actions);
        }
    }

    fn on_agents(&mut self, s: SessionId, change: AgentsChange, actions: &mut Vec<Action<M>>) {
        let Some(p) = self.peers.get_mut(&s) else {
            return;
        };
        let first = !std::mem::replace(&mut p.synced, true);
        p.generation += 1;
        // What peers relayed about its endpoint gives way now.
        let endpoint = p.endpoint;
        let mut relayed: Vec<AgentId> = Vec::new();
        if first {
            for h in self.heard.values() {
                if let Some(e) = h.get(&endpoint) {
                    relayed.extend(e.agents.keys().cloned());
                }
            }
        }
        let Some(p) = self.peers.get_mut(&s) else {
            return;
        };
        for id in &change.removed {
            p.agents.remove(id);
        }
        for reg in &change.added {
            p.agents.insert(reg.id.clone(), reg.clone());
        }
        if !p.linked {
            return;
        }
        for id in change.removed.iter().chain(relayed.iter()) {
            self.reconsider(id, actions);
        }
        for reg in &change.added {
            // A changed registration of the owner: its route changes too, and what its
            // endpoint refused while the agent was away goes again.
            if self.owner.get(&reg.id) == Some(&Owner::Session(s)) {
                self.flush(&reg.id, s, actions);
                actions.push(self.route_action(&reg.id));
            }
            self.elect(&reg.id, actions);
        }
        self.relay_about(s, actions);
    }

    fn relay_about(&self, s: SessionId, actions: &mut Vec<Action<M>>) {
        let Some(p) = self.peers.get(&s) else {
            return;
        };
        if self.config.exchange == PeerExchange::Off || !p.trust.authenticated || !p.linked {
            return;
        }
        if let Some(news) = relayed(p) {
            self.relay_to_others(s, news, actions);
        }
    }

    /// Sends `news` about `about`'s endpoint to every other authenticated linked session.
    fn relay_to_others(&self, about: SessionId, news: Relayed, actions: &mut Vec<Action<M>>) {
        for (o, p) in self.linked() {
            if o != about && p.trust.authenticated {
                actions.push(Action::Session(
                    o,
                    SessionInput::Send(Frame::Relay(news.clone())),
                ));
            }
        }
    }

    fn on_relay(&mut self, s: SessionId, news: Relayed, actions: &mut Vec<Action<M>>) {
        let Some(source) = self.peers.get(&s) else {
            return;
        };
        let trusted = match self.config.exchange {
            PeerExchange::Off => false,
            PeerExchange::Authenticated => source.trust.authenticated,
            PeerExchange::All => true,
        };
        if !trusted || !source.linked {
            tracing::debug!(peer = ?source.endpoint, "peer exchange from an unauthenticated peer ignored");
            return;
        }
        let source_endpoint = source.endpoint;
        let about = match &news {
            Relayed::Endpoint { endpoint, .. } | Relayed::Gone { endpoint } => *endpoint,
        };
        if about == self.me || about == source_endpoint {
            return;
        }
        let (agents_cap, endpoints_cap) = (
            self.config.agents_per_peer as usize,
            self.config.endpoints_per_peer as usize,
        );
        let heard = self.heard.entry(s).or_default();
        let changed: Vec<AgentId> = match news {
            Relayed::Endpoint {
                listen,
                generation,
                agents,
                ..
            } => {
                if !heard.contains_key(&about) && heard.len() >= endpoints_cap {
                    tracing::warn!(
                        cap = endpoints_cap,
                        "a peer tells of more endpoints than allowed; ignored"
                    );
                    return;
                }
                let entry = heard.entry(about).or_default();
                if entry.listen.is_some() && generation <= entry.generation {
                    return;
                }
                let new: BTreeMap<AgentId, Arc<Registration>> = agents
                    .into_iter()
                    .take(agents_cap)
                    .map(|r| (r.id.clone(), Arc::new(r)))
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
            Relayed::Gone { .. } => match heard.remove(&about) {
                Some(entry) => entry.agents.into_keys().collect(),
                None => return,
            },
        };
        for id in changed {
            self.reconsider(&id, actions);
        }
    }

    // ----- routing -----

    /// Who claims `id`: linked sessions in the order they were made, then endpoints heard
    /// of (not linked).
    fn claimants(&self, id: &AgentId) -> Vec<(Owner, EndpointId, Address)> {
        let mut out: Vec<(Owner, EndpointId, Address)> = self
            .linked()
            .filter(|(_, p)| p.agents.contains_key(id))
            .map(|(s, p)| (Owner::Session(s), p.endpoint, p.address.clone()))
            .collect();
        let mut heard: Vec<(EndpointId, SocketAddr)> = Vec::new();
        for h in self.heard.values() {
            for (e, entry) in h {
                // Reached directly and its membership known: what it says counts.
                if self
                    .by_endpoint
                    .get(e)
                    .and_then(|s| self.peers.get(s))
                    .is_some_and(|p| p.linked && p.synced)
                {
                    continue;
                }
                if let (true, Some(listen)) = (entry.agents.contains_key(id), entry.listen)
                    && !heard.iter().any(|(x, _)| x == e)
                {
                    heard.push((*e, listen));
                }
            }
        }
        heard.sort();
        out.extend(
            heard
                .into_iter()
                .map(|(e, listen)| (Owner::Heard(e), e, Address::from(listen))),
        );
        out
    }

    fn route_of(&self, id: &AgentId) -> Option<Route> {
        match self.owner.get(id)? {
            Owner::Session(s) => {
                let p = self.peers.get(s)?;
                Some(Route::Session {
                    session: *s,
                    reg: p.agents.get(id)?.clone(),
                    address: p.address.clone(),
                })
            }
            Owner::Heard(e) => self.heard.values().find_map(|h| {
                let entry = h.get(e)?;
                Some(Route::Dial {
                    addr: entry.listen?,
                    endpoint: *e,
                    reg: entry.agents.get(id)?.clone(),
                })
            }),
        }
    }

    fn route_action(&self, id: &AgentId) -> Action<M> {
        Action::Route {
            agent: id.clone(),
            to: self.route(id),
        }
    }

    /// Where `id` is reached now, if anywhere (nowhere while messages its endpoint refused
    /// wait to be offered again, or while the redelivery handler carries older ones: newer
    /// messages must not pass them).
    pub fn route(&self, id: &AgentId) -> Option<Route> {
        if self.recheck.contains_key(id) || self.handing_off.contains(id) {
            return None;
        }
        self.route_of(id)
    }

    /// Routes `id` to a claimant if none owns it and it is not local; reports a second
    /// claimant of an owned id.
    fn elect(&mut self, id: &AgentId, actions: &mut Vec<Action<M>>) {
        let claimants = self.claimants(id);
        let owner = self.owner.get(id).copied();
        let mut report = |node: &mut Self, e: EndpointId, addr: &Address| {
            if node.conflicts.insert((id.clone(), e)) {
                tracing::warn!(agent = %id, other = ?e, "two endpoints announce the same agent id; the first keeps it");
                actions.push(Action::Publish(Event::AgentConflict {
                    agent: id.clone(),
                    claimed_by: addr.clone(),
                }));
            }
        };
        if let Some(owner) = owner {
            // Known through peer exchange, now reached directly: the same endpoint, a route
            // of its own.
            if let Owner::Heard(e) = owner
                && let Some((direct, _, _)) = claimants
                    .iter()
                    .find(|(o, x, _)| *x == e && matches!(o, Owner::Session(_)))
                    .cloned()
            {
                self.owner.insert(id.clone(), direct);
                if let Owner::Session(s) = direct {
                    self.flush(id, s, actions);
                }
                actions.push(self.route_action(id));
                return;
            }
            for (o, e, addr) in &claimants {
                if *o != owner {
                    report(self, *e, addr);
                }
            }
            return;
        }
        if self.locals.contains_key(id) {
            for (_, e, addr) in &claimants {
                report(self, *e, addr);
            }
            return;
        }
        let Some((first, _, _)) = claimants.first().cloned() else {
            return;
        };
        for (_, e, addr) in &claimants[1..] {
            report(self, *e, addr);
        }
        self.owner.insert(id.clone(), first);
        let Some(route) = self.route_of(id) else {
            self.owner.remove(id);
            return;
        };
        let (state, address) = match &route {
            Route::Session { address, .. } => (PeerState::Connected, address.clone()),
            Route::Dial { addr, .. } => (PeerState::Known, Address::from(*addr)),
        };
        let info = route.registration().peer_info(Some(address), state);
        // Messages waiting for it go first, then newer ones may follow the route.
        match first {
            Owner::Session(s) => self.flush(id, s, actions),
            Owner::Heard(e) => {
                if self.waiting.contains_key(id)
                    && let Route::Dial { addr, .. } = &route
                {
                    actions.push(Action::Dial {
                        addr: *addr,
                        endpoint: e,
                    });
                }
            }
        }
        // Withheld while older messages for it wait (with the redelivery handler, or to be
        // offered again): newer ones must not pass them.
        actions.push(self.route_action(id));
        actions.push(Action::Publish(Event::PeerDiscovered(info)));
    }

    /// `id` changed somewhere: if its owner no longer claims it, it leaves (or goes to
    /// another claimant); if it has no owner, one may be elected. What waits for it and
    /// nothing reaches goes to the redelivery handler.
    fn reconsider(&mut self, id: &AgentId, actions: &mut Vec<Action<M>>) {
        self.reassign(id, actions);
        if !self.owner.contains_key(id) {
            // Messages its endpoint refused while it still announced the agent.
            self.hand_off(id, actions);
        }
    }

    /// The owner part of [`Node::reconsider`]: a session `id` moves to takes what waits for
    /// it first.
    fn reassign(&mut self, id: &AgentId, actions: &mut Vec<Action<M>>) {
        if let Some(owner) = self.owner.get(id).copied() {
            let claimants = self.claimants(id);
            let still = claimants.iter().any(|(o, ..)| *o == owner);
            // The same endpoint, reached another way now (known through peer exchange, then
            // linked): the route moves, the agent never left.
            let endpoint = match owner {
                Owner::Heard(e) => Some(e),
                Owner::Session(s) => self.peers.get(&s).map(|p| p.endpoint),
            };
            let moved = claimants
                .iter()
                .find(|(o, e, _)| Some(*e) == endpoint && *o != owner)
                .map(|(o, ..)| *o);
            if !still {
                self.recheck.remove(id);
            }
            if let (false, Some(to)) = (still, moved) {
                self.owner.insert(id.clone(), to);
                if let Owner::Session(s) = to {
                    self.flush(id, s, actions);
                }
                actions.push(self.route_action(id));
                return;
            }
            if !still {
                tracing::debug!(agent = %id, ?owner, "its endpoint no longer announces the agent");
                self.owner.remove(id);
                // Another claimant may take it over at once (a restarted process): its route
                // then replaces the old one directly, for a route withdrawn meanwhile would
                // fail the sends made while what waits for the agent moves over.
                let mut next = Vec::new();
                self.elect(id, &mut next);
                if !self.owner.contains_key(id) {
                    actions.push(Action::Route {
                        agent: id.clone(),
                        to: None,
                    });
                }
                actions.push(Action::Publish(Event::PeerLeft(id.clone())));
                actions.append(&mut next);
                return;
            }
        }
        self.elect(id, actions);
    }

    // ----- messages waiting for a way -----

    /// Queues a session's unsettled messages behind what already waits for their agents
    /// (see [`Node::place_orphans`]); the agents they are for. While the node shuts down they
    /// fail instead.
    fn wait(&mut self, orphans: Vec<Orphan<M>>, actions: &mut Vec<Action<M>>) -> Vec<AgentId> {
        let mut touched: Vec<AgentId> = Vec::new();
        if orphans.is_empty() {
            return touched;
        }
        if self.closing {
            actions.push(Action::Settled(
                orphans.into_iter().map(Orphan::expired).collect(),
            ));
            return touched;
        }
        for msg in orphans {
            let to = msg.meta.to.clone();
            if !touched.contains(&to) {
                touched.push(to.clone());
            }
            self.waiting.entry(to).or_default().push_back(msg);
        }
        touched
    }

    /// Unsettled messages of a session that lost its link, or that its peer refused because
    /// their agent is not there: each goes to the session that reaches its agent now (if it
    /// may: what may have been taken goes to the same principal only), or waits. A refused
    /// message goes back to its session when its membership says the agent came back, or
    /// [`DISPLACED_RECHECK`] later; one of a session replaced by a newer one with the same
    /// endpoint waits as long for the newer one to announce its agent before it goes to the
    /// redelivery handler.
    fn place_orphans(
        &mut self,
        touched: Vec<AgentId>,
        how: Orphaned,
        actions: &mut Vec<Action<M>>,
    ) {
        for to in touched {
            match how {
                // Its agent is known only by hearsay (or not at all) while the newer session
                // with the same endpoint has not announced it yet: give that one time first.
                Orphaned::Lost {
                    replaced: true,
                    now,
                } if !self.reached_directly(&to) => {
                    self.recheck
                        .entry(to.clone())
                        .or_insert(now + DISPLACED_RECHECK);
                }
                Orphaned::Refused { by: s, now }
                    if self.owner.get(&to) == Some(&Owner::Session(s)) =>
                {
                    // No route until then: newer messages must not pass these.
                    self.recheck
                        .entry(to.clone())
                        .or_insert(now + DISPLACED_RECHECK);
                    actions.push(Action::Route {
                        agent: to,
                        to: None,
                    });
                }
                _ => self.place(&to, actions),
            }
        }
    }

    /// Whether a linked session of this node announces `to`.
    fn reached_directly(&self, to: &AgentId) -> bool {
        matches!(self.owner.get(to), Some(Owner::Session(s)) if self.peers.get(s).is_some_and(|p| p.linked))
    }

    /// Sends what waits for `to` where it can go now: into the session that owns it, or to
    /// the redelivery handler (and a dial, if it is known elsewhere).
    fn place(&mut self, to: &AgentId, actions: &mut Vec<Action<M>>) {
        match self.owner.get(to).copied() {
            Some(Owner::Session(s)) if self.peers.get(&s).is_some_and(|p| p.linked) => {
                self.flush(to, s, actions);
                if self.waiting.contains_key(to) {
                    self.hand_off(to, actions);
                }
            }
            Some(Owner::Heard(e)) => {
                if let Some(Route::Dial { addr, .. }) = self.route_of(to) {
                    actions.push(Action::Dial { addr, endpoint: e });
                }
                self.hand_off(to, actions);
            }
            _ => self.hand_off(to, actions),
        }
    }

    fn hand_off(&mut self, to: &AgentId, actions: &mut Vec<Action<M>>) {
        if !self.handler && !self.owner.contains_key(to) {
            self.fail_displaced(to, actions);
        }
        if self.handler && self.waiting.contains_key(to) && self.handing_off.insert(to.clone()) {
            actions.push(Action::HandOff(to.clone()));
            if self.owner.contains_key(to) {
                // Newer messages must not pass what the handler carries.
                actions.push(self.route_action(to));
            }
        }
    }

    /// Messages for `to` that an endpoint refused because the agent had left, and that
    /// nothing else could deliver (no endpoint announces it, no redelivery handler): they
    /// fail now (`ReceiverStopped`) rather than at their deadline.
    fn fail_displaced(&mut self, to: &AgentId, actions: &mut Vec<Action<M>>) {
        let Some(q) = self.waiting.remove(to) else {
            return;
        };
        let (gone, kept): (VecDeque<_>, VecDeque<_>) =
            q.into_iter().partition(|m| m.displaced && !m.in_doubt);
        if !kept.is_empty() {
            self.waiting.insert(to.clone(), kept);
        }
        if !gone.is_empty() {
            actions.push(Action::Settled(
                gone.into_iter().map(Orphan::expired).collect(),
            ));
        }
    }

    /// Moves what waits for `to` into session `s`, in order, if it may go there.
    fn flush(&mut self, to: &AgentId, s: SessionId, actions: &mut Vec<Action<M>>) {
        if self.handing_off.contains(to) {
            return;
        }
        let Some(peer) = self.peers.get(&s) else {
            return;
        };
        let Some(queue) = self.waiting.remove(to) else {
            return;
        };
        let (mut go, mut stay, mut late) = (Vec::new(), VecDeque::new(), Vec::new());
        for msg in queue {
            if self.overtaken(&msg, Some(peer.endpoint)) {
                late.push(msg.expired());
            } else if msg.may_go_to(peer.endpoint, &peer.trust) {
                go.push(msg);
            } else {
                stay.push_back(msg);
            }
        }
        if !stay.is_empty() {
            tracing::debug!(agent = %to, n = stay.len(), "messages in doubt wait for their own principal");
            self.waiting.insert(to.clone(), stay);
        }
        if !late.is_empty() {
            tracing::debug!(agent = %to, n = late.len(), "ordered messages overtaken by newer ones of their flow fail");
            actions.push(Action::Settled(late));
        }
        if !go.is_empty() {
            actions.push(Action::Session(s, SessionInput::Redeliver(go)));
        }
        if self.recheck.remove(to).is_some() {
            // They went first; newer messages may follow.
            actions.push(self.route_action(to));
        }
    }

    /// Whether an ordered `msg` would arrive after a newer message of its flow: one given to
    /// the redelivery handler, or one a session carried to `to` (any endpoint but the one
    /// `msg` itself went to, when the way is the handler's: it may reach any of them).
    fn overtaken(&self, msg: &Orphan<M>, to: Option<EndpointId>) -> bool {
        if !msg.meta.ordered {
            return false;
        }
        let flow = msg.flow();
        let newer = |t: &Instant| *t > msg.accepted;
        if self.handed.get(&flow).is_some_and(newer) {
            return true;
        }
        match to {
            Some(e) => self.marks.get(&(e, flow)).is_some_and(newer),
            None => {
                let origin = msg.origin.as_ref().map(|(e, _)| *e);
                self.marks
                    .iter()
                    .any(|((e, f), t)| *f == flow && Some(*e) != origin && newer(t))
            }
        }
    }

    /// Messages a session could not take (it ended before this node heard): they wait, and
    /// go where they can once the node hears of its end, in the order they were accepted
    /// among what already waits.
    pub fn requeue(&mut self, orphans: Vec<Orphan<M>>) {
        for msg in orphans {
            let q = self.waiting.entry(msg.meta.to.clone()).or_default();
            let at = q.partition_point(|m| m.accepted <= msg.accepted);
            q.insert(at, msg);
        }
    }

    /// The oldest message waiting for `to`, for the redelivery handler; `None` when there
    /// is none, or when a session reaches `to` again (what waits then goes there: see the
    /// actions of [`Node::hand_off_ended`]). Ordered messages a newer one of their flow
    /// went before fail on the way (into `late`), as they would in a session.
    pub fn take_orphan(&mut self, to: &AgentId, late: &mut Vec<Settled<M>>) -> Option<Orphan<M>> {
        if matches!(self.owner.get(to), Some(Owner::Session(s)) if self.peers.get(s).is_some_and(|p| p.linked))
        {
            return None;
        }
        loop {
            let q = self.waiting.get_mut(to)?;
            let msg = q.pop_front();
            if q.is_empty() {
                self.waiting.remove(to);
            }
            let msg = msg?;
            if self.overtaken(&msg, None) {
                late.push(msg.expired());
                continue;
            }
            if msg.meta.ordered {
                let t = self.handed.entry(msg.flow()).or_insert(msg.accepted);
                *t = (*t).max(msg.accepted);
            }
            return Some(msg);
        }
    }

    /// The redelivery handler could not deliver `msg`: it waits again, first in line.
    pub fn give_back(&mut self, msg: Orphan<M>) {
        self.waiting
            .entry(msg.meta.to.clone())
            .or_default()
            .push_front(msg);
    }

    /// The handoff for `to` ended: what still waits goes where it can. If no endpoint
    /// announces `to` either, what an endpoint refused because `to` had left fails now
    /// (`ReceiverStopped`), as it would without a handler, rather than at its deadline.
    pub fn hand_off_ended(&mut self, to: &AgentId) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        self.handing_off.remove(to);
        match self.owner.get(to).copied() {
            Some(Owner::Session(s)) => {
                self.flush(to, s, &mut actions);
                // The route was withheld while the handler had what waited.
                actions.push(self.route_action(to));
            }
            Some(Owner::Heard(_)) => actions.push(self.route_action(to)),
            None => self.fail_displaced(to, &mut actions),
        }
        actions
    }

    /// What is kept with each message waiting here (diagnostics for tests).
    #[doc(hidden)]
    pub fn waiting_contexts(&self) -> Vec<&M> {
        self.waiting.values().flatten().map(|m| &m.ctx).collect()
    }

    /// Whether messages for `to` are with the redelivery handler now.
    pub fn handing_off(&self, to: &AgentId) -> bool {
        self.handing_off.contains(to)
    }

    /// Whether a message of the flow `from`, `to`, `channel` waits here for a way (or may be
    /// with the redelivery handler).
    pub fn has_flow(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        self.handing_off.contains(to)
            || self.waiting.get(to).is_some_and(|q| {
                q.iter()
                    .any(|m| &m.meta.from == from && &m.meta.channel == channel)
            })
    }

    /// When [`Node::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.config.delivery_deadline;
        self.waiting
            .values()
            .flatten()
            .map(|m| m.due(deadline))
            .chain(self.recheck.values().copied())
            .min()
    }

    /// Fails what waited past its deadline; offers refused messages to their agent's
    /// endpoint again.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action<M>> {
        let deadline = self.config.delivery_deadline;
        let mut actions = Vec::new();
        let due: Vec<AgentId> = self
            .recheck
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(a, _)| a.clone())
            .collect();
        for to in due {
            self.place(&to, &mut actions);
            if self.recheck.remove(&to).is_some() {
                actions.push(self.route_action(&to));
            }
        }
        // A mark older than the deadline outlived every message it could order.
        self.handed.retain(|_, t| *t + deadline > now);
        let mut failed = Vec::new();
        self.waiting.retain(|_, q| {
            // In order (see `requeue`); every one is looked at all the same.
            let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(q)
                .into_iter()
                .partition(|m| m.due(deadline) <= now);
            failed.extend(gone.into_iter().map(|m| m.timed_out(now)));
            *q = kept;
            !q.is_empty()
        });
        if !failed.is_empty() {
            tracing::info!(n = failed.len(), "messages not delivered by their deadline");
            actions.push(Action::Settled(failed));
        }
        actions
    }

    /// Peer endpoints lost without a goodbye within `memory` of `now` that did not come
    /// back.
    pub fn unreachable(&self, now: Instant, memory: Duration) -> usize {
        self.lost
            .values()
            .filter(|t| now.saturating_duration_since(**t) < memory)
            .count()
    }

    /// Sessions with a link now, with the endpoint at their far end.
    pub fn linked_sessions(&self) -> Vec<(SessionId, EndpointId)> {
        self.linked().map(|(s, p)| (s, p.endpoint)).collect()
    }

    /// Every session, linked or not.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.peers.keys().copied().collect()
    }

    /// Stops: every session ends, and what waits fails.
    pub fn shutdown(&mut self) -> Vec<Action<M>> {
        self.closing = true;
        let mut actions: Vec<Action<M>> = self
            .peers
            .keys()
            .map(|s| Action::Session(*s, SessionInput::End(Ended::Shutdown)))
            .collect();
        let failed: Vec<Settled<M>> = std::mem::take(&mut self.waiting)
            .into_values()
            .flat_map(|q| q.into_iter().map(Orphan::expired))
            .collect();
        if !failed.is_empty() {
            actions.push(Action::Settled(failed));
        }
        actions
    }
}

/// What to tell others about `p`'s endpoint, if it listens somewhere.
fn relayed(p: &Peer) -> Option<Relayed> {
    Some(Relayed::Endpoint {
        endpoint: p.endpoint,
        listen: p.listen?,
        generation: p.generation,
        agents: p.agents.values().map(|r| (**r).clone()).collect(),
    })
}
