//! The endpoint: sockets, connections to other endpoints, membership and redelivery.
//!
//! Membership lives in one [`Registry`] under one lock, together with each connection's
//! control queue and the redelivery queue. Registry steps return actions, which are applied
//! before the lock is released: a control frame is queued for a connection in the same
//! critical section that decided it, so that no attach can slip between a hello's snapshot
//! and the connection's registration, and messages waiting for an agent go out before any
//! newer send can be routed to it. Nothing under the lock waits: queues are bounded and
//! pushed without blocking, and I/O happens in the connections' tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use s2n_quic::client::Connect;
use s2n_quic::connection::Connection;
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::provider::limits::Limits;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::QuicConfig;
use aqe_core::plumbing::{FrameCodec, InboxSender};
use aqe_core::plumbing::{LocalAgent, LocalDelivery};
use aqe_core::{
    AgentId, BoxError, ChannelName, ENDPOINT_AGENT_TYPE, Error, Event, PeerInfo, PeerState,
    Redeliver, Registration, Result, SecurityFailure,
};

use crate::conn::{self, CONTROL_QUEUE, Conn};
use crate::link::{self, StatsSubscriber};
use crate::outbox::{self, Pending, Redelivery};
use crate::registry::{Action, ConnKey, PeerHello, Policy, Refusal, Registry, Route};
use crate::tls::Material;
use crate::wire::{Control, FrameReader, Hello, PROTOCOL_VERSION, close};

/// Bootstrap dials back off up to this long between attempts.
const MAX_REDIAL: Duration = Duration::from_secs(5);
/// How often deadlines of messages waiting for redelivery are checked.
const SWEEP: Duration = Duration::from_millis(200);
/// How long a peer endpoint lost without a goodbye counts as unreachable in health reports,
/// unless it comes back first.
const UNREACHABLE_MEMORY: Duration = Duration::from_secs(60);

/// The largest registration (channels, capabilities, metadata) an agent may announce, encoded.
const MAX_REGISTRATION: usize = 64 * 1024;

/// Room for an envelope's fields other than its payload, in a frame limit.
const ENVELOPE_OVERHEAD: usize = 64 * 1024;

/// What a stream carries, for the largest frame accepted on it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Frames {
    /// A hello, before the peer is authenticated.
    Hello,
    /// Control frames, and the preamble of every other stream.
    Control,
    /// The request lane.
    Lane,
    /// Envelopes, stream chunks and large requests: the largest channel of any local agent.
    Data,
}

/// Admits connection attempts: beyond `max_handshakes` in flight an attempt must first prove
/// its address (a Retry), beyond twice that it is dropped; beyond `max_connections` it is
/// refused.
struct Admission {
    max_handshakes: usize,
    max_connections: usize,
}

impl s2n_quic::provider::endpoint_limits::Limiter for Admission {
    fn on_connection_attempt(
        &mut self,
        attempt: &s2n_quic::provider::endpoint_limits::ConnectionAttempt<'_>,
    ) -> s2n_quic::provider::endpoint_limits::Outcome {
        use s2n_quic::provider::endpoint_limits::Outcome;
        if attempt.connection_count >= self.max_connections {
            Outcome::close()
        } else if attempt.inflight_handshakes >= 2 * self.max_handshakes {
            Outcome::drop()
        } else if attempt.inflight_handshakes >= self.max_handshakes {
            Outcome::retry()
        } else {
            Outcome::allow()
        }
    }
}

/// A connection as the endpoint holds it: its control queue from the start of its
/// handshake, the connection itself once established.
struct Link {
    control: mpsc::Sender<Control>,
    conn: Option<Arc<Conn>>,
}

/// What is guarded by the endpoint's one lock.
struct State {
    registry: Registry,
    links: HashMap<ConnKey, Link>,
    redelivery: Redelivery,
}

pub(crate) struct Shared {
    pub(crate) config: QuicConfig,
    pub(crate) id: u64,
    pub(crate) listen: SocketAddr,
    pub(crate) codec: FrameCodec,
    client: Mutex<Option<s2n_quic::Client>>,
    state: Mutex<State>,
    /// The local agents' inboxes and counters, for the paths that deliver to them.
    locals: DashMap<AgentId, Arc<LocalAgent>>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    closed: AtomicBool,
    /// Delivery between agents of this endpoint.
    pub(crate) local_delivery: LocalDelivery,
    redeliver: Mutex<Option<Arc<dyn Redeliver>>>,
    /// Signalled whenever a handoff to the redelivery handler ends.
    handoffs: Notify,
    /// Signalled whenever reliable messages settle (acknowledged, failed, orphaned, handed
    /// on): what [`Shared::flow_settled`] waits for.
    pub(crate) progress: Notify,
    /// Bounds the dials under way.
    dials: tokio::sync::Semaphore,
    /// One dial per address at a time: a second caller waits for the first's outcome.
    dial_locks: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// Nonces of this endpoint's dials in progress, to tell a connection to itself from a
    /// peer presenting this endpoint's own certificate.
    own_nonces: Mutex<std::collections::HashSet<u64>>,
    /// The largest channel message size of any local agent (only grows).
    max_message: std::sync::atomic::AtomicUsize,
}

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(aqe_core::MessageId::next().0);
    h.finish()
}

fn setup_error(what: &'static str) -> impl Fn(BoxError) -> Error {
    move |e| Error::Configuration {
        file: None,
        field: what.to_owned(),
        message: e.to_string(),
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| setup_error("host")(e.into()))?
        .next()
        .ok_or_else(|| Error::Configuration {
            file: None,
            field: "host".into(),
            message: format!("{host} resolves to nothing"),
        })
}

impl Shared {
    /// Opens the endpoint's sockets and starts accepting connections.
    pub(crate) async fn bind(config: QuicConfig) -> Result<Arc<Self>> {
        config.validate()?;
        if config.enable_0rtt {
            tracing::warn!(
                "enable0RTT: s2n-quic does not support 0-RTT early data; connections use full 1-RTT handshakes"
            );
        }
        let material = Material::new(&config.security).await?;
        let bind = resolve(&config.host, config.port).await?;
        let streams = u64::from(config.max_concurrent_streams);
        let limits = || -> std::result::Result<Limits, BoxError> {
            Ok(Limits::new()
                .with_max_idle_timeout(config.idle_timeout)?
                .with_max_handshake_duration(config.connection_timeout)?
                .with_max_open_remote_bidirectional_streams(streams)?
                .with_max_open_remote_unidirectional_streams(streams)?
                // What this side may open is bounded by what the peer allows; s2n-quic's own
                // default (100) would cap it below that.
                .with_max_open_local_bidirectional_streams(streams)?
                .with_max_open_local_unidirectional_streams(streams)?
                .with_active_connection_migration(config.enable_migration)?)
        };
        let dgrams = || -> std::result::Result<datagram::Endpoint, BoxError> {
            Ok(datagram::Endpoint::builder()
                .with_send_capacity(1024)?
                .with_recv_capacity(1024)?
                .build()?)
        };
        let io = |addr: SocketAddr| -> std::result::Result<s2n_quic::provider::io::tokio::Provider, BoxError> {
            Ok(s2n_quic::provider::io::tokio::Builder::default()
                .with_receive_address(addr)?
                .with_internal_recv_buffer_size(config.limits.socket_buffer as usize)?
                .build()?)
        };
        let (rejections, rejected) = mpsc::channel(64);
        let server = s2n_quic::Server::builder()
            .with_tls(material.server()?)
            .map_err(|e| setup_error("security")(e.into()))?
            .with_io(io(bind).map_err(setup_error("host"))?)
            .map_err(|e| setup_error("host")(e.into()))?
            .with_limits(limits().map_err(setup_error("limits"))?)
            .map_err(|e| setup_error("limits")(e.into()))?
            .with_endpoint_limits(Admission {
                max_handshakes: config.limits.max_handshakes as usize,
                max_connections: config.limits.max_connections as usize,
            })
            .map_err(|e| setup_error("limits")(e.into()))?
            // s2n-quic's own events go to tracing too, off unless asked for
            // (`RUST_LOG=s2n_quic=debug`): the per-packet view beside aqe's spans.
            .with_event((
                StatsSubscriber {
                    rejections: rejections.clone(),
                },
                s2n_quic::provider::event::tracing::Subscriber::default(),
            ))
            .map_err(|e| setup_error("events")(e.into()))?
            .with_datagram(dgrams().map_err(setup_error("datagrams"))?)
            .map_err(|e| setup_error("datagrams")(e.into()))?
            .start()
            .map_err(|e| setup_error("port")(e.into()))?;
        let listen = server
            .local_addr()
            .map_err(|e| setup_error("port")(e.into()))?;
        let client_bind: SocketAddr = if bind.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| setup_error("host")(e.into()))?;
        let client = s2n_quic::Client::builder()
            .with_tls(material.client()?)
            .map_err(|e| setup_error("security")(e.into()))?
            .with_io(io(client_bind).map_err(setup_error("host"))?)
            .map_err(|e| setup_error("host")(e.into()))?
            .with_limits(limits().map_err(setup_error("limits"))?)
            .map_err(|e| setup_error("limits")(e.into()))?
            .with_event((
                StatsSubscriber { rejections },
                s2n_quic::provider::event::tracing::Subscriber::default(),
            ))
            .map_err(|e| setup_error("events")(e.into()))?
            .with_datagram(dgrams().map_err(setup_error("datagrams"))?)
            .map_err(|e| setup_error("datagrams")(e.into()))?
            .start()
            .map_err(|e| setup_error("host")(e.into()))?;
        let (events, _) = broadcast::channel(1024);
        // The endpoint's id is its certificate's: a peer that verified the certificate knows
        // the id is not made up.
        let id = material.identity;
        let policy = Policy {
            exchange: config.peer_exchange,
            agents_per_peer: config.limits.agents_per_peer as usize,
            endpoints_per_peer: config.limits.endpoints_per_peer as usize,
        };
        if config.peer_exchange == crate::PeerExchange::All {
            tracing::warn!(
                "peerExchange \"all\": this endpoint takes any peer's word about other endpoints, authenticated or not"
            );
        }
        let dials = tokio::sync::Semaphore::new(config.limits.concurrent_dials as usize);
        let local_delivery = LocalDelivery::new(events.clone(), config.send_timeout, 64);
        let shared = Arc::new(Shared {
            config,
            id,
            listen,
            codec: FrameCodec::default(),
            client: Mutex::new(Some(client)),
            state: Mutex::new(State {
                registry: Registry::new(id, policy),
                links: HashMap::new(),
                redelivery: Redelivery::default(),
            }),
            locals: DashMap::new(),
            events,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closed: AtomicBool::new(false),
            local_delivery,
            redeliver: Mutex::new(None),
            handoffs: Notify::new(),
            progress: Notify::new(),
            dials,
            dial_locks: Mutex::new(HashMap::new()),
            own_nonces: Mutex::new(std::collections::HashSet::new()),
            max_message: std::sync::atomic::AtomicUsize::new(aqe_core::DEFAULT_MAX_MESSAGE_SIZE),
        });
        tracing::info!(%listen, endpoint = format_args!("{:016x}", shared.id), "QUIC endpoint listening");
        // The endpoint's own tasks, and the connections they make, log under its span.
        let span = tracing::info_span!(
            "endpoint",
            id = %format_args!("{:016x}", shared.id),
            %listen
        );
        shared
            .tasks
            .spawn(accept_loop(shared.clone(), server).instrument(span.clone()));
        shared
            .tasks
            .spawn(announce_rejections(shared.clone(), rejected).instrument(span.clone()));
        shared
            .tasks
            .spawn(sweep_deadlines(shared.clone()).instrument(span.clone()));
        for peer in shared.config.bootstrap_peers.clone() {
            shared
                .tasks
                .spawn(bootstrap(shared.clone(), peer).instrument(span.clone()));
        }
        Ok(shared)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `agent` is hosted here or has a route (a connection, or an address to dial).
    pub(crate) fn can_reach(&self, agent: &AgentId) -> bool {
        self.live().is_ok()
            && (self.local(agent).is_some() || self.lock().registry.route(agent).is_some())
    }

    /// Whether a reliable message of the flow `from`, `to`, `channel` awaits acknowledgement
    /// here, on any connection or for redelivery.
    pub(crate) fn flow_pending(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        let state = self.lock();
        state.redelivery.has_flow(from, to, channel)
            || state
                .links
                .values()
                .filter_map(|l| l.conn.as_ref())
                .any(|c| c.outbox.has_flow(from, to, channel))
    }

    /// Resolves once nothing of the flow awaits acknowledgement here.
    pub(crate) async fn flow_settled(
        &self,
        from: &AgentId,
        to: &AgentId,
        channel: &ChannelName,
    ) -> Result<()> {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            self.live()?;
            if !self.flow_pending(from, to, channel) {
                return Ok(());
            }
            tokio::select! {
                () = progress => {}
                () = self.shutdown.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    pub(crate) fn live(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    /// A codec accepting the largest frame a stream of this kind may carry.
    pub(crate) fn frame_limit(&self, frames: Frames) -> FrameCodec {
        let limits = &self.config.limits;
        FrameCodec::new(match frames {
            Frames::Hello => limits.hello_frame as usize,
            Frames::Control => limits.control_frame as usize,
            Frames::Lane => crate::lane::LANE_MAX_PAYLOAD + ENVELOPE_OVERHEAD,
            Frames::Data => self.max_message.load(Ordering::Relaxed) + ENVELOPE_OVERHEAD,
        })
    }

    pub(crate) fn publish(&self, event: Event) {
        // Endpoints' introspection agents are infrastructure, not members of the fleet.
        match &event {
            Event::PeerDiscovered(p) if p.agent_type.as_str() == ENDPOINT_AGENT_TYPE => return,
            Event::PeerLeft(id) if crate::introspect::is_endpoint_agent(id) => return,
            _ => {}
        }
        let _ = self.events.send(event);
    }

    // ----- membership -----

    /// Performs what a registry step decided. Runs under the lock and never waits.
    fn apply(self: &Arc<Self>, state: &mut State, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(key, control) => {
                    if let Some(link) = state.links.get(&key)
                        && let Err(mpsc::error::TrySendError::Full(_)) =
                            link.control.try_send(control)
                    {
                        tracing::warn!("a peer does not read its control stream; closing");
                        if let Some(c) = &link.conn {
                            c.close(close::UNRESPONSIVE);
                        }
                    }
                }
                Action::Publish(event) => self.publish(event),
                Action::Known { agent, addr } => {
                    // Messages wait for it: connect, and they go out when it is reachable.
                    if state.redelivery.has(&agent) {
                        self.spawn_dial(addr);
                    }
                }
                Action::Retire { conn, code, drain } => {
                    if let Some(c) = state.links.get(&conn).and_then(|l| l.conn.as_ref()) {
                        c.retire(code, drain);
                    }
                }
                Action::Orphaned(key) => {
                    if let Some(conn) = state.links.remove(&key).and_then(|l| l.conn) {
                        let orphans = conn.outbox.close();
                        if !orphans.is_empty() {
                            tracing::debug!(peer = %conn.listen, n = orphans.len(), "unacknowledged messages orphaned");
                        }
                        for to in state.redelivery.add(orphans) {
                            self.redeliver_now(state, &to);
                        }
                        self.progress.notify_waiters();
                    }
                }
                Action::HandOver(key) => {
                    if let Some(conn) = state.links.get(&key).and_then(|l| l.conn.clone()) {
                        for to in state.redelivery.add(conn.outbox.hand_over()) {
                            self.redeliver_now(state, &to);
                        }
                    }
                }
                Action::Reachable { agent, conn } => self.flush(state, &agent, conn),
            }
        }
    }

    /// Sends what waits for `to` over the connection it is reachable on now, or hands it to
    /// the redelivery handler, if either is possible.
    fn redeliver_now(self: &Arc<Self>, state: &mut State, to: &AgentId) {
        match state.registry.route(to) {
            Some(Route::Direct(key, ..)) => self.flush(state, to, key),
            Some(Route::Dial(addr, _)) => {
                // Reachable by dialing: hand it to the fallback meanwhile if there is one,
                // and dial; whichever comes first delivers what waits.
                self.hand_off(state, to);
                self.spawn_dial(addr);
            }
            None => self.hand_off(state, to),
        }
    }

    /// Pushes everything waiting for `to` into connection `key`, in order, ahead of anything
    /// newer (this runs under the lock that routing takes).
    fn flush(self: &Arc<Self>, state: &mut State, to: &AgentId, key: ConnKey) {
        if state.redelivery.handing_off(to) || !state.redelivery.has(to) {
            return;
        }
        let Some(conn) = state.links.get(&key).and_then(|l| l.conn.clone()) else {
            return;
        };
        let waiting = state.redelivery.take(to);
        tracing::debug!(agent = %to, n = waiting.len(), peer = %conn.listen, "redelivering");
        let mut back = Vec::new();
        for p in waiting {
            let p = match p.redelivered() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot re-encode a message");
                    continue;
                }
            };
            if let Err(p) = conn.enqueue(self, p, false) {
                back.push(p);
            }
        }
        state.redelivery.add(back);
    }

    /// Starts handing what waits for `to` to the redelivery handler, if one is registered
    /// and no handoff for `to` runs yet.
    fn hand_off(self: &Arc<Self>, state: &mut State, to: &AgentId) {
        let Some(handler) = self
            .redeliver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        if !state.redelivery.has(to) || !state.redelivery.start_handoff(to) {
            return;
        }
        self.tasks
            .spawn(hand_over(self.clone(), handler, to.clone()));
    }

    pub(crate) fn set_redelivery(self: &Arc<Self>, handler: Arc<dyn Redeliver>) {
        *self.redeliver.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// A membership frame from connection `key`.
    pub(crate) fn on_control(self: &Arc<Self>, key: ConnKey, control: Control) {
        let mut state = self.lock();
        let actions = state.registry.on_control(key, control);
        self.apply(&mut state, actions);
    }

    /// Hosts a local agent and announces it to every connection.
    pub(crate) fn attach(self: &Arc<Self>, reg: Registration, inbox: InboxSender) -> Result<()> {
        self.live()?;
        reg.validate()?;
        let size = aqe_core::encode(&reg)?.len();
        if size > MAX_REGISTRATION {
            return Err(Error::Configuration {
                file: None,
                field: "registration".to_owned(),
                message: format!(
                    "agent {} announces {size} bytes of registration (channels, capabilities, metadata); at most {MAX_REGISTRATION} travel to peers",
                    reg.id
                ),
            });
        }
        let info = reg.peer_info(Some(self.listen.into()), PeerState::Connected);
        let mut state = self.lock();
        let Some(actions) = state.registry.attach(reg.clone()) else {
            return Err(Error::Configuration {
                file: None,
                field: "id".to_owned(),
                message: format!("agent {} is already attached to this endpoint", reg.id),
            });
        };
        let largest = reg
            .channels
            .iter()
            .map(|c| c.max_message_size)
            .max()
            .unwrap_or(0);
        self.max_message.fetch_max(largest, Ordering::Relaxed);
        self.locals
            .insert(reg.id.clone(), Arc::new(LocalAgent::new(reg, inbox)));
        self.publish(Event::PeerDiscovered(info));
        self.apply(&mut state, actions);
        Ok(())
    }

    /// Stops hosting a local agent and announces it.
    pub(crate) fn detach(self: &Arc<Self>, id: &AgentId) -> Result<()> {
        let mut state = self.lock();
        let Some(actions) = state.registry.detach(id) else {
            return Err(Error::PeerNotFound { peer: id.clone() });
        };
        self.locals.remove(id);
        self.publish(Event::PeerLeft(id.clone()));
        self.apply(&mut state, actions);
        Ok(())
    }

    /// The agents this endpoint hosts.
    pub(crate) fn local_agents(&self) -> Vec<Arc<LocalAgent>> {
        self.locals.iter().map(|l| l.value().clone()).collect()
    }

    /// How many agents this endpoint hosts.
    pub(crate) fn local_count(&self) -> usize {
        self.locals.len()
    }

    pub(crate) fn local(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.locals.get(id).map(|l| l.value().clone())
    }

    /// Whether connection `from_endpoint` may carry messages from agent `from`: not if that
    /// id is hosted here or routed to another endpoint. (An id not known yet is accepted: its
    /// announcement may still be on the way on the control stream.)
    pub(crate) fn may_send_from(&self, from: &AgentId, from_endpoint: u64) -> bool {
        if self.locals.contains_key(from) {
            return false;
        }
        self.lock()
            .registry
            .owner_of(from)
            .is_none_or(|e| e == from_endpoint)
    }

    /// The connection to the endpoint hosting remote agent `to`, which must listen on
    /// `channel`; an endpoint known through peer exchange is dialed first (within `wait`).
    ///
    /// # Errors
    /// [`Error::PeerNotFound`], [`Error::ChannelNotFound`] naming `to`, or why the dial
    /// failed.
    pub(crate) async fn route(
        self: &Arc<Self>,
        to: &AgentId,
        channel: &ChannelName,
        wait: Duration,
    ) -> Result<Arc<Conn>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let dial = {
                let state = self.lock();
                let Some(route) = state.registry.route(to) else {
                    return Err(Error::PeerNotFound { peer: to.clone() });
                };
                if !route.registration().has_channel(channel) {
                    return Err(Error::ChannelNotFound {
                        channel: channel.clone(),
                        agent: to.clone(),
                    });
                }
                match route {
                    Route::Direct(key, ..) => {
                        return state
                            .links
                            .get(&key)
                            .and_then(|l| l.conn.clone())
                            .ok_or_else(|| Error::PeerNotFound { peer: to.clone() });
                    }
                    Route::Dial(addr, _) => addr,
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.reach(dial, left).await?;
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::ConnectionTimeout {
                    addr: dial.into(),
                    after: wait,
                });
            }
        }
    }

    /// Connects to the endpoint at `addr` unless connected already, within `wait` and the
    /// bound on dials under way; one dial per address at a time.
    async fn reach(self: &Arc<Self>, addr: SocketAddr, wait: Duration) -> Result<()> {
        let attempt = async {
            let lock = self
                .dial_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(addr)
                .or_default()
                .clone();
            let _one = lock.lock().await;
            if self.connected_to(addr) {
                return Ok(());
            }
            let _slot = self.dials.acquire().await.map_err(|_| Error::Shutdown)?;
            self.connect(addr).await
        };
        let outcome =
            tokio::time::timeout(wait, attempt)
                .await
                .unwrap_or(Err(Error::ConnectionTimeout {
                    addr: addr.into(),
                    after: wait,
                }));
        let mut locks = self.dial_locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.get(&addr).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(&addr);
        }
        outcome
    }

    /// Waits (at most `wait`) while messages for `to` are being handed to the redelivery
    /// handler, so that a send falling back after this returns goes out after them.
    pub(crate) async fn await_handoff(&self, to: &AgentId, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            loop {
                let notified = self.handoffs.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.lock().redelivery.handing_off(to) {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// Closes connection `key` with `code`, if it is still there.
    pub(crate) fn close_conn(&self, key: ConnKey, code: u32) {
        if let Some(c) = self.lock().links.get(&key).and_then(|l| l.conn.clone()) {
            c.close(code);
        }
    }

    /// A connection ended: membership, and what it held unacknowledged, follow.
    pub(crate) fn connection_ended(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        clean: bool,
        reason: String,
    ) {
        let mut state = self.lock();
        let actions = state
            .registry
            .on_connection_lost(conn.key, clean, reason, Instant::now());
        self.apply(&mut state, actions);
        // A connection the registry no longer knew about still hands over what it held.
        self.apply(&mut state, vec![Action::Orphaned(conn.key)]);
    }

    // ----- connections -----

    fn hello(&self, nonce: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            endpoint: self.id,
            nonce,
            listen: self.listen,
            token: self.token(),
            window: self.config.window,
        }
    }

    fn token(&self) -> Option<String> {
        let sec = &self.config.security;
        sec.enable_token_auth
            .then(|| sec.token.as_ref().map(|t| t.expose().to_owned()))
            .flatten()
    }

    /// Checks a peer's hello; the close code to use if it fails. `verified` is the id the
    /// peer's certificate gives, when the handshake verified one (always for a listener this
    /// endpoint dialed; for a dialer only with mutual TLS).
    fn check(&self, hello: &Hello, verified: Option<u64>) -> std::result::Result<(), (u32, Error)> {
        if hello.version != PROTOCOL_VERSION {
            let e = Error::UnsupportedVersion {
                found: hello.version,
                supported: PROTOCOL_VERSION,
            };
            return Err((close::VERSION_MISMATCH, e));
        }
        let security = |kind| Error::Security { kind, source: None };
        if hello.endpoint == self.id {
            let own_dial = self
                .own_nonces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&hello.nonce);
            return Err(if own_dial || verified.is_none() {
                (
                    close::SELF_CONNECTION,
                    Error::Protocol {
                        detail: "connection to self",
                    },
                )
            } else {
                (
                    close::SHARED_CERTIFICATE,
                    security(SecurityFailure::SharedCertificate),
                )
            });
        }
        if let Some(id) = verified
            && id != hello.endpoint
        {
            return Err((
                close::IDENTITY_MISMATCH,
                security(SecurityFailure::IdentityMismatch),
            ));
        }
        match (self.token(), &hello.token) {
            (None, _) => Ok(()),
            (Some(_), None) => Err((
                close::TOKEN_MISSING,
                security(SecurityFailure::TokenMissing),
            )),
            (Some(ours), Some(theirs)) if !constant_time_eq(ours.as_bytes(), theirs.as_bytes()) => {
                Err((
                    close::TOKEN_REJECTED,
                    security(SecurityFailure::TokenRejected),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether a peer that passed [`Shared::check`] proved who it is: by the token, or by a
    /// certificate this endpoint verified.
    fn authenticated(&self, verified: Option<u64>) -> bool {
        self.token().is_some() || verified.is_some()
    }

    /// Connects to the endpoint at `addr` (if not connected already) and exchanges hellos.
    /// Shutdown interrupts it.
    pub(crate) async fn connect(self: &Arc<Self>, addr: SocketAddr) -> Result<()> {
        tokio::select! {
            r = self.dial(addr) => r,
            () = self.shutdown.cancelled() => Err(Error::Shutdown),
        }
    }

    /// Dials `addr` in the background (within the bound on dials), to deliver what waits.
    fn spawn_dial(self: &Arc<Self>, addr: SocketAddr) {
        if addr == self.listen || self.shutdown.is_cancelled() {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            let wait = me.config.connection_timeout * 2;
            if let Err(e) = me.reach(addr, wait).await {
                tracing::debug!(%addr, error = %e, "dial to deliver waiting messages failed");
            }
        });
    }

    async fn dial(self: &Arc<Self>, addr: SocketAddr) -> Result<()> {
        self.live()?;
        if addr == self.listen || self.lock().registry.connected_to(addr) {
            return Ok(());
        }
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Shutdown)?;
        let timeout = self.config.connection_timeout;
        let connect =
            Connect::new(addr).with_server_name(self.config.security.server_name.as_str());
        let mut connection = match tokio::time::timeout(timeout, client.connect(connect)).await {
            Err(_) => {
                return Err(Error::ConnectionTimeout {
                    addr: addr.into(),
                    after: timeout,
                });
            }
            Ok(Err(e)) => return Err(connection_error(addr, timeout, e)),
            Ok(Ok(c)) => c,
        };
        let _ = connection.keep_alive(true);
        let nonce = random_u64();
        self.own_nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce);
        let outcome = self.exchange_as_dialer(addr, connection, nonce).await;
        self.own_nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        outcome
    }

    async fn exchange_as_dialer(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut connection: Connection,
        nonce: u64,
    ) -> Result<()> {
        let timeout = self.config.connection_timeout;
        let (key, rx) = self.begin();
        let exchange = async {
            let stream = connection
                .open_bidirectional_stream()
                .await
                .map_err(|e| connection_error(addr, timeout, e))?;
            let (recv, mut send) = stream.split();
            let ours = self.hello(nonce);
            let hello = self.codec.encode_to_bytes(&ours)?;
            send.send(hello)
                .await
                .map_err(|e| stream_connection_error(addr, timeout, e))?;
            let mut reader = FrameReader::new(recv, self.frame_limit(Frames::Hello));
            match reader.next::<Hello>().await {
                Ok(Some(h)) => Ok((h, reader, send)),
                Ok(None) => Err(Error::Protocol {
                    detail: "the peer ended the control stream before its hello",
                }),
                Err(Error::Stream { .. } | Error::ConnectionLost { .. }) => {
                    Err(closed_reason(&connection, addr, timeout))
                }
                Err(e) => Err(e),
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        let (peer_hello, reader, send) = match outcome {
            Err(_) => {
                self.abort(key);
                connection.close(close::HELLO_TIMEOUT.into());
                return Err(Error::ConnectionTimeout {
                    addr: addr.into(),
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                self.abort(key);
                connection.close(close::PROTOCOL_VIOLATION.into());
                return Err(e);
            }
            Ok(Ok(x)) => x,
        };
        // The listener's certificate was verified: its id is known.
        let verified = link::of(&connection.handle()).peer_identity();
        if let Err((code, e)) = self.check(&peer_hello, verified) {
            self.abort(key);
            connection.close(code.into());
            return Err(e);
        }
        let authenticated = self.authenticated(verified);
        self.establish(
            key,
            rx,
            connection,
            reader,
            send,
            peer_hello,
            (self.id, nonce),
            authenticated,
        )
    }

    /// Registers a connection starting its handshake: its key, and its control queue's
    /// receiving end with this endpoint's membership snapshot queued first. Done in one step
    /// under the lock, so that every membership change after the snapshot is queued after it.
    fn begin(&self) -> (ConnKey, mpsc::Receiver<Control>) {
        let mut state = self.lock();
        let (key, generation, agents) = state.registry.begin();
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        for frame in self.snapshot_frames(generation, agents) {
            // A fresh queue: room for the snapshot's few frames.
            let _ = tx.try_send(frame);
        }
        state.links.insert(
            key,
            Link {
                control: tx,
                conn: None,
            },
        );
        (key, rx)
    }

    /// A membership snapshot as control frames, each within the control frame limit.
    fn snapshot_frames(&self, generation: u64, agents: Vec<Registration>) -> Vec<Control> {
        let budget = self.config.limits.control_frame as usize / 2;
        let mut frames = Vec::new();
        let (mut chunk, mut size) = (Vec::new(), 0);
        for reg in agents {
            let len = aqe_core::encode(&reg).map(|b| b.len()).unwrap_or(budget);
            if !chunk.is_empty() && size + len > budget {
                frames.push(Control::Snapshot {
                    generation,
                    agents: std::mem::take(&mut chunk),
                    last: false,
                });
                size = 0;
            }
            size += len;
            chunk.push(reg);
        }
        frames.push(Control::Snapshot {
            generation,
            agents: chunk,
            last: true,
        });
        frames
    }

    fn abort(&self, key: ConnKey) {
        let mut state = self.lock();
        state.registry.abort(key);
        state.links.remove(&key);
    }

    /// Serves a connection a peer opened: hello first, nothing else before it checks.
    async fn accepted(self: Arc<Self>, mut connection: Connection) {
        let addr = connection.remote_addr().ok();
        let timeout = self.config.connection_timeout;
        let _ = connection.keep_alive(true);
        let exchange = async {
            let stream = connection
                .accept_bidirectional_stream()
                .await
                .ok()
                .flatten()?;
            let (recv, send) = stream.split();
            let mut reader = FrameReader::new(recv, self.frame_limit(Frames::Hello));
            let hello = reader.next::<Hello>().await.ok().flatten()?;
            Some((hello, reader, send))
        };
        let (peer_hello, reader, mut send) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                connection.close(close::PROTOCOL_VIOLATION.into());
                return;
            }
            Err(_) => {
                connection.close(close::HELLO_TIMEOUT.into());
                return;
            }
        };
        // A dialer's certificate is known only with mutual TLS.
        let verified = link::of(&connection.handle()).peer_identity();
        if let Err((code, e)) = self.check(&peer_hello, verified) {
            tracing::warn!(?addr, error = %e, "connection refused");
            if let (Error::Security { kind, .. }, Some(addr)) = (&e, addr) {
                self.publish(Event::SecurityRejected {
                    addr: addr.into(),
                    kind: *kind,
                });
            }
            connection.close(code.into());
            return;
        }
        let (key, rx) = self.begin();
        let ours = self.hello(peer_hello.nonce);
        let sent = match self.codec.encode_to_bytes(&ours) {
            Ok(b) => tokio::time::timeout(timeout, send.send(b)).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode hello");
                self.abort(key);
                return;
            }
        };
        if !matches!(sent, Ok(Ok(()))) {
            self.abort(key);
            return;
        }
        let rank = (peer_hello.endpoint, peer_hello.nonce);
        let authenticated = self.authenticated(verified);
        if let Err(e) = self.establish(
            key,
            rx,
            connection,
            reader,
            send,
            peer_hello,
            rank,
            authenticated,
        ) {
            tracing::debug!(?addr, error = %e, "connection not established");
        }
    }

    /// Records a connection that passed the hello exchange, learns the peer's agents and
    /// peers, and starts serving it.
    #[allow(clippy::too_many_arguments)]
    fn establish(
        self: &Arc<Self>,
        key: ConnKey,
        control_queue: mpsc::Receiver<Control>,
        connection: Connection,
        control_rx: FrameReader,
        control_tx: s2n_quic::stream::SendStream,
        mut hello: Hello,
        rank: (u64, u64),
        authenticated: bool,
    ) -> Result<()> {
        // A peer's listen address is taken with the IP its connection comes from (the port
        // from its hello): nobody can point this endpoint, or its peers, at an IP the peer
        // does not send from.
        if let Ok(seen) = connection.remote_addr() {
            hello.listen.set_ip(seen.ip());
        }
        let mut control_rx = control_rx;
        control_rx.set_limit(self.frame_limit(Frames::Control));
        let (handle, acceptor) = connection.split();
        let window = hello.window.min(self.config.window).max(1) as usize;
        let mut state = self.lock();
        let Some(link) = state.links.get_mut(&key) else {
            handle.close(close::NORMAL.into());
            return Err(Error::Shutdown);
        };
        let conn = Arc::new(Conn::new(
            key,
            hello.endpoint,
            hello.listen,
            handle,
            link.control.clone(),
            window,
        ));
        link.conn = Some(conn.clone());
        let peer = PeerHello {
            endpoint: hello.endpoint,
            listen: hello.listen,
            rank,
            authenticated,
        };
        match state.registry.on_hello(key, peer) {
            Ok(actions) => self.apply(&mut state, actions),
            Err(refusal) => {
                state.links.remove(&key);
                drop(state);
                let code = match refusal {
                    Refusal::SelfConnection => close::SELF_CONNECTION,
                    Refusal::Unknown => close::NORMAL,
                };
                conn.close(code);
                return Err(Error::Protocol {
                    detail: "connection refused by membership",
                });
            }
        }
        drop(state);
        let span = conn.span.clone();
        tracing::debug!(parent: &span, authenticated, "connection established");
        self.tasks.spawn(
            conn::write_control(self.clone(), conn.clone(), control_tx, control_queue)
                .instrument(span.clone()),
        );
        self.tasks
            .spawn(conn::drive(self.clone(), conn, control_rx, acceptor).instrument(span));
        Ok(())
    }

    // ----- views -----

    fn peer_info_remote(
        reg: &Registration,
        listen: SocketAddr,
        conn: Option<&Arc<Conn>>,
    ) -> PeerInfo {
        let state = if conn.is_some() {
            PeerState::Connected
        } else {
            PeerState::Known
        };
        let mut info = reg.peer_info(Some(listen.into()), state);
        info.rtt = conn
            .map(|c| c.link().read())
            .filter(|r| r.rtt_samples > 0)
            .map(|r| r.smoothed_rtt);
        info
    }

    pub(crate) fn peers(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .locals
            .iter()
            .map(|l| {
                l.reg
                    .peer_info(Some(self.listen.into()), PeerState::Connected)
            })
            .collect();
        let state = self.lock();
        out.extend(state.registry.remote_agents().map(|(reg, listen, key)| {
            let conn = key
                .and_then(|k| state.links.get(&k))
                .and_then(|l| l.conn.as_ref());
            Self::peer_info_remote(reg, listen, conn)
        }));
        // Endpoints' introspection agents are infrastructure: see `endpoint_agents`.
        out.retain(|p| p.agent_type.as_str() != ENDPOINT_AGENT_TYPE);
        out
    }

    /// The introspection agents of the endpoints this one knows.
    pub(crate) fn endpoint_agents(&self) -> Vec<AgentId> {
        let state = self.lock();
        let mut out: Vec<AgentId> = state
            .registry
            .remote_agents()
            .filter(|(reg, _, _)| reg.agent_type.as_str() == ENDPOINT_AGENT_TYPE)
            .map(|(reg, _, _)| reg.id.clone())
            .collect();
        out.sort();
        out
    }

    /// The connections in use, with their peer's listen address.
    pub(crate) fn conns(&self) -> Vec<Arc<Conn>> {
        let state = self.lock();
        state
            .registry
            .active_conns()
            .filter_map(|(key, _)| state.links.get(&key).and_then(|l| l.conn.clone()))
            .collect()
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.lock().registry.active_conns().count()
    }

    /// Peer endpoints lost without a goodbye, recently.
    pub(crate) fn unreachable(&self) -> usize {
        self.lock()
            .registry
            .unreachable(Instant::now(), UNREACHABLE_MEMORY)
    }

    /// Whether a connection to the endpoint listening at `addr` is up.
    fn connected_to(&self, addr: SocketAddr) -> bool {
        self.lock().registry.connected_to(addr)
    }

    /// Waits while the endpoint at `addr` stays connected. `true` when the connection ended,
    /// `false` on shutdown or when no connection to that address is known (the peer
    /// announced another address: there is nothing to watch).
    async fn watch_connection(&self, addr: SocketAddr) -> bool {
        let mut events = self.events.subscribe();
        if !self.connected_to(addr) {
            return false;
        }
        while self.connected_to(addr) {
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                e = events.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = e {
                        return false;
                    }
                }
            }
        }
        !self.shutdown.is_cancelled()
    }

    pub(crate) async fn shutdown(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (conns, left) = {
            let mut state = self.lock();
            let actions = state.registry.clear();
            let conns: Vec<Arc<Conn>> = state
                .links
                .values()
                .filter_map(|l| l.conn.clone())
                .collect();
            // Everything still unacknowledged or waiting fails: nobody will deliver it now.
            let mut left: Vec<Pending> = state.redelivery.drain();
            for c in &conns {
                left.extend(c.outbox.close());
            }
            state.links.clear();
            for a in actions {
                if let Action::Publish(e) = a {
                    self.publish(e);
                }
            }
            (conns, left)
        };
        // Goodbye first (the close code says so), then the tasks stop: a control stream
        // ended by a stopping task before the goodbye would read as a lost peer.
        for c in &conns {
            c.close(close::NORMAL);
        }
        self.shutdown.cancel();
        outbox::failed(&self.events, left, outbox::orphan_reason);
        self.locals.clear();
        let client = self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.tasks.close();
        self.tasks.wait().await;
        // The connections this endpoint dialed close once their CONNECTION_CLOSE is out: a
        // process that exits right after shutdown still tells its peers it left (they would
        // otherwise count it lost). Bounded: a peer that vanished is not waited for.
        if let Some(mut client) = client {
            let _ = tokio::time::timeout(CLOSE_GRACE, client.wait_idle()).await;
        }
    }
}

/// How long shutdown waits for dialed connections to finish closing.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn accept_loop(shared: Arc<Shared>, mut server: s2n_quic::Server) {
    loop {
        let connection = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            c = server.accept() => match c {
                Some(c) => c,
                None => return,
            },
        };
        shared.tasks.spawn(shared.clone().accepted(connection));
    }
}

async fn announce_rejections(
    shared: Arc<Shared>,
    mut rejected: mpsc::Receiver<(SocketAddr, SecurityFailure)>,
) {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = rejected.recv() => match r {
                Some((addr, kind)) => {
                    tracing::warn!(%addr, %kind, "connection failed a security check");
                    shared.publish(Event::SecurityRejected { addr: addr.into(), kind });
                }
                None => return,
            },
        }
    }
}

/// Reports failed what waited for redelivery past its deadline.
async fn sweep_deadlines(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = shared
            .lock()
            .redelivery
            .expired(Instant::now(), shared.config.delivery_deadline);
        if !expired.is_empty() {
            tracing::info!(
                n = expired.len(),
                "messages not delivered by their deadline"
            );
            outbox::failed(&shared.events, expired, outbox::orphan_reason);
            shared.progress.notify_waiters();
        }
    }
}

/// Hands what waits for `to` to the redelivery handler, oldest first, until it is all
/// delivered, the handler cannot deliver, or `to` became reachable again here (the rest then
/// goes over that connection).
async fn hand_over(shared: Arc<Shared>, handler: Arc<dyn Redeliver>, to: AgentId) {
    loop {
        let next = {
            let mut state = shared.lock();
            if state.registry.route(&to).is_some() {
                state.redelivery.end_handoff(&to);
                shared.redeliver_now(&mut state, &to);
                None
            } else {
                match state.redelivery.pop(&to) {
                    Some(p) => Some(p),
                    None => {
                        state.redelivery.end_handoff(&to);
                        None
                    }
                }
            }
        };
        let Some(p) = next else { break };
        let p = match p.redelivered() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot re-encode a message");
                continue;
            }
        };
        let attempt = tokio::select! {
            () = shared.shutdown.cancelled() => Err(Error::Shutdown),
            r = handler.redeliver(p.envelope.clone()) => r,
        };
        match attempt {
            Ok(()) => outbox::delivered(p),
            Err(e) => {
                tracing::debug!(agent = %to, error = %e, "redelivery handler cannot deliver; waiting for a connection");
                let mut state = shared.lock();
                state.redelivery.unpop(p);
                state.redelivery.end_handoff(&to);
                break;
            }
        }
    }
    shared.handoffs.notify_waiters();
    shared.progress.notify_waiters();
}

/// Keeps dialing a bootstrap peer until connected, backing off, until shutdown.
async fn bootstrap(shared: Arc<Shared>, peer: String) {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let addr = tokio::net::lookup_host(peer.as_str())
                .await
                .map_err(|e| Error::ConnectionFailed {
                    addr: shared.listen.into(),
                    source: e.into(),
                })?
                .next()
                .ok_or(Error::Protocol {
                    detail: "bootstrap peer resolves to nothing",
                })?;
            shared.connect(addr).await.map(|()| addr)
        };
        match attempt.await {
            Ok(addr) => {
                delay = Duration::from_millis(100);
                // Stay connected: when the connection ends, dial again.
                if !shared.watch_connection(addr).await {
                    return;
                }
                tracing::info!(%peer, "connection to bootstrap peer lost; reconnecting");
                continue;
            }
            Err(Error::Shutdown) => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bootstrap peer not reached; retrying in {delay:?}");
                shared.publish(Event::TransportError {
                    transport: crate::QuicTransport::KIND,
                    message: format!("bootstrap {peer}: {e}"),
                });
            }
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_REDIAL);
    }
}

/// Maps a connection error to ours, recognising security failures and timeouts.
pub(crate) fn connection_error(
    addr: SocketAddr,
    timeout: Duration,
    e: s2n_quic::connection::Error,
) -> Error {
    if let Some(kind) = link::security_failure(&e) {
        return Error::Security {
            kind,
            source: Some(Box::new(e)),
        };
    }
    if let s2n_quic::connection::Error::Application { error, .. } = e
        && u64::from(error) == u64::from(close::VERSION_MISMATCH)
    {
        return Error::Protocol {
            detail: "the peer does not speak this protocol version (aqe/3)",
        };
    }
    match e {
        s2n_quic::connection::Error::MaxHandshakeDurationExceeded { .. }
        | s2n_quic::connection::Error::IdleTimerExpired { .. } => Error::ConnectionTimeout {
            addr: addr.into(),
            after: timeout,
        },
        e => Error::ConnectionFailed {
            addr: addr.into(),
            source: Box::new(e),
        },
    }
}

fn stream_connection_error(
    addr: SocketAddr,
    timeout: Duration,
    e: s2n_quic::stream::Error,
) -> Error {
    match e {
        s2n_quic::stream::Error::ConnectionError { error, .. } => {
            connection_error(addr, timeout, error)
        }
        e => Error::ConnectionFailed {
            addr: addr.into(),
            source: Box::new(e),
        },
    }
}

/// Why a connection whose control stream broke is gone.
fn closed_reason(connection: &Connection, addr: SocketAddr, timeout: Duration) -> Error {
    // Opening a stream on a closed connection yields the connection's error.
    let mut handle = connection.handle();
    match futures::FutureExt::now_or_never(handle.open_send_stream()) {
        Some(Err(e)) => connection_error(addr, timeout, e),
        _ => Error::ConnectionFailed {
            addr: addr.into(),
            source: "the peer closed the control stream".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config() -> QuicConfig {
        QuicConfig {
            host: "127.0.0.1".into(),
            ..QuicConfig::default()
        }
    }

    #[tokio::test]
    async fn hellos_are_checked_for_version_self_and_token() {
        let mut config = local_config();
        config.security.enable_token_auth = true;
        config.security.token = Some(aqe_core::Token::new("t0k3n"));
        let shared = Shared::bind(config).await.expect("bind");
        let good = Hello {
            endpoint: shared.id ^ 1,
            ..shared.hello(0)
        };
        assert!(shared.check(&good, None).is_ok());
        assert!(
            shared.check(&good, Some(shared.id ^ 1)).is_ok(),
            "verified and matching"
        );
        let (code, err) = shared
            .check(&good, Some(shared.id ^ 2))
            .expect_err("claimed id");
        assert_eq!(code, close::IDENTITY_MISMATCH);
        assert!(matches!(
            err,
            Error::Security {
                kind: SecurityFailure::IdentityMismatch,
                ..
            }
        ));
        let (code, _) = shared
            .check(
                &Hello {
                    endpoint: shared.id,
                    ..good.clone()
                },
                Some(shared.id),
            )
            .expect_err("another endpoint with our certificate");
        assert_eq!(code, close::SHARED_CERTIFICATE);
        let (code, err) = shared
            .check(
                &Hello {
                    version: 9,
                    ..good.clone()
                },
                None,
            )
            .expect_err("version");
        assert_eq!(code, close::VERSION_MISMATCH);
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    found: 9,
                    supported: PROTOCOL_VERSION
                }
            ),
            "{err}"
        );
        let (code, _) = shared
            .check(
                &Hello {
                    endpoint: shared.id,
                    ..good.clone()
                },
                None,
            )
            .expect_err("self");
        assert_eq!(code, close::SELF_CONNECTION);
        let (code, err) = shared
            .check(
                &Hello {
                    token: Some("t0k3N".into()),
                    ..good.clone()
                },
                None,
            )
            .expect_err("token");
        assert_eq!(code, close::TOKEN_REJECTED);
        assert!(matches!(
            err,
            Error::Security {
                kind: SecurityFailure::TokenRejected,
                ..
            }
        ));
        let (code, _) = shared
            .check(
                &Hello {
                    token: None,
                    ..good
                },
                None,
            )
            .expect_err("no token");
        assert_eq!(code, close::TOKEN_MISSING);
        shared.shutdown().await;
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc", b"abd"));
    }
}
