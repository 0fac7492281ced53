//! The endpoint: sockets, connections to other endpoints, and who is where.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use s2n_quic::client::Connect;
use s2n_quic::connection::Connection;
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::provider::limits::Limits;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::{
    AgentId, BoxError, Error, Event, FrameCodec, InboxSender, PeerInfo, PeerState, QuicConfig,
    Registration, Result, SecurityFailure, StatsRecorder,
};

use crate::conn::{self, Conn};
use crate::link::{self, StatsSubscriber};
use crate::tls::Material;
use crate::wire::{Control, FrameReader, Hello, PROTOCOL_VERSION, close};

/// How long a connection that lost a simultaneous-dial tie stays open so that what was sent
/// on it before both sides agreed still arrives.
const RETIRE_GRACE: Duration = Duration::from_secs(1);
/// Bootstrap dials back off up to this long between attempts.
const MAX_REDIAL: Duration = Duration::from_secs(5);

/// An agent hosted by this endpoint.
pub(crate) struct Local {
    pub(crate) reg: Registration,
    pub(crate) inbox: InboxSender,
    pub(crate) stats: Arc<StatsRecorder>,
}

/// An agent hosted by another endpoint.
#[derive(Clone)]
pub(crate) struct Remote {
    pub(crate) reg: Registration,
    pub(crate) endpoint: u64,
}

pub(crate) struct Shared {
    pub(crate) config: QuicConfig,
    pub(crate) id: u64,
    pub(crate) listen: SocketAddr,
    pub(crate) codec: FrameCodec,
    client: Mutex<Option<s2n_quic::Client>>,
    pub(crate) locals: DashMap<AgentId, Arc<Local>>,
    pub(crate) remotes: DashMap<AgentId, Remote>,
    /// The connection in use to each remote endpoint, by endpoint id.
    pub(crate) conns: DashMap<u64, Arc<Conn>>,
    /// Remote endpoints by listen address.
    by_addr: DashMap<SocketAddr, u64>,
    /// Dials under way.
    dialing: DashMap<SocketAddr, ()>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    closed: AtomicBool,
}

fn random_id() -> u64 {
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
                .with_active_connection_migration(config.enable_migration)?)
        };
        let dgrams = || -> std::result::Result<datagram::Endpoint, BoxError> {
            Ok(datagram::Endpoint::builder()
                .with_send_capacity(1024)?
                .with_recv_capacity(1024)?
                .build()?)
        };
        let (rejections, rejected) = mpsc::channel(64);
        let server = s2n_quic::Server::builder()
            .with_tls(material.server()?)
            .map_err(|e| setup_error("security")(e.into()))?
            .with_io(bind)
            .map_err(|e| setup_error("host")(e.into()))?
            .with_limits(limits().map_err(setup_error("limits"))?)
            .map_err(|e| setup_error("limits")(e.into()))?
            .with_event(StatsSubscriber {
                rejections: rejections.clone(),
            })
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
            .with_io(client_bind)
            .map_err(|e| setup_error("host")(e.into()))?
            .with_limits(limits().map_err(setup_error("limits"))?)
            .map_err(|e| setup_error("limits")(e.into()))?
            .with_event(StatsSubscriber { rejections })
            .map_err(|e| setup_error("events")(e.into()))?
            .with_datagram(dgrams().map_err(setup_error("datagrams"))?)
            .map_err(|e| setup_error("datagrams")(e.into()))?
            .start()
            .map_err(|e| setup_error("host")(e.into()))?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            config,
            id: random_id(),
            listen,
            codec: FrameCodec::default(),
            client: Mutex::new(Some(client)),
            locals: DashMap::new(),
            remotes: DashMap::new(),
            conns: DashMap::new(),
            by_addr: DashMap::new(),
            dialing: DashMap::new(),
            events,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closed: AtomicBool::new(false),
        });
        tracing::info!(%listen, endpoint = format_args!("{:016x}", shared.id), "QUIC endpoint listening");
        shared.tasks.spawn(accept_loop(shared.clone(), server));
        shared
            .tasks
            .spawn(announce_rejections(shared.clone(), rejected));
        for peer in shared.config.bootstrap_peers.clone() {
            shared.tasks.spawn(bootstrap(shared.clone(), peer));
        }
        Ok(shared)
    }

    pub(crate) fn live(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    pub(crate) fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// The connection to the endpoint hosting `agent`, with the agent's registration.
    pub(crate) fn route(&self, agent: &AgentId) -> Option<(Remote, Arc<Conn>)> {
        let remote = self.remotes.get(agent)?.value().clone();
        let conn = self.conns.get(&remote.endpoint)?.value().clone();
        Some((remote, conn))
    }

    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            endpoint: self.id,
            listen: self.listen,
            token: self.token(),
            agents: self.locals.iter().map(|l| l.reg.clone()).collect(),
            known: self.conns.iter().map(|c| c.listen).collect(),
        }
    }

    fn token(&self) -> Option<String> {
        let sec = &self.config.security;
        sec.enable_token_auth
            .then(|| sec.token.as_ref().map(|t| t.expose().to_owned()))
            .flatten()
    }

    /// Checks a peer's hello; the close code to use if it fails.
    fn check(&self, hello: &Hello) -> std::result::Result<(), (u32, Error)> {
        if hello.version != PROTOCOL_VERSION {
            let e = Error::UnsupportedVersion {
                found: hello.version,
                supported: PROTOCOL_VERSION,
            };
            return Err((close::VERSION_MISMATCH, e));
        }
        if hello.endpoint == self.id {
            return Err((
                close::SELF_CONNECTION,
                Error::Protocol {
                    detail: "connection to self",
                },
            ));
        }
        let security = |kind| Error::Security { kind, source: None };
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

    /// Connects to the endpoint at `addr` (if not connected already) and exchanges hellos.
    /// Shutdown interrupts it.
    pub(crate) async fn connect(self: &Arc<Self>, addr: SocketAddr) -> Result<()> {
        tokio::select! {
            r = self.dial(addr) => r,
            () = self.shutdown.cancelled() => Err(Error::Shutdown),
        }
    }

    async fn dial(self: &Arc<Self>, addr: SocketAddr) -> Result<()> {
        self.live()?;
        if addr == self.listen || self.connected_to(addr) {
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
                    addr,
                    after: timeout,
                });
            }
            Ok(Err(e)) => return Err(connection_error(addr, timeout, e)),
            Ok(Ok(c)) => c,
        };
        let _ = connection.keep_alive(true);
        let exchange = async {
            let stream = connection
                .open_bidirectional_stream()
                .await
                .map_err(|e| connection_error(addr, timeout, e))?;
            let (recv, mut send) = stream.split();
            let hello = self.codec.encode_to_bytes(&self.hello())?;
            send.send(hello)
                .await
                .map_err(|e| stream_connection_error(addr, timeout, e))?;
            let mut reader = FrameReader::new(recv, self.codec);
            match reader.next::<Hello>().await {
                Ok(Some(h)) => Ok((h, reader, send)),
                Ok(None) => Err(Error::Protocol {
                    detail: "the peer ended the control stream before its hello",
                }),
                Err(Error::Stream { .. }) => Err(closed_reason(&connection, addr, timeout)),
                Err(e) => Err(e),
            }
        };
        let (peer_hello, reader, send) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                connection.close(close::HELLO_TIMEOUT.into());
                return Err(Error::ConnectionTimeout {
                    addr,
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                connection.close(close::PROTOCOL_VIOLATION.into());
                return Err(e);
            }
            Ok(Ok(x)) => x,
        };
        if let Err((code, e)) = self.check(&peer_hello) {
            connection.close(code.into());
            return Err(e);
        }
        self.register(connection, reader, send, peer_hello, self.id);
        Ok(())
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
            let mut reader = FrameReader::new(recv, self.codec);
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
        if let Err((code, e)) = self.check(&peer_hello) {
            tracing::warn!(?addr, error = %e, "connection refused");
            if let (Error::Security { kind, .. }, Some(addr)) = (&e, addr) {
                self.publish(Event::SecurityRejected { addr, kind: *kind });
            }
            connection.close(code.into());
            return;
        }
        let ours = match self.codec.encode_to_bytes(&self.hello()) {
            Ok(b) => b,
            Err(e) => return tracing::error!(error = %e, "cannot encode hello"),
        };
        if send.send(ours).await.is_err() {
            return;
        }
        let initiator = peer_hello.endpoint;
        self.register(connection, reader, send, peer_hello, initiator);
    }

    /// Records a connection that passed the hello, learns the peer's agents and peers, and
    /// starts serving it.
    fn register(
        self: &Arc<Self>,
        connection: Connection,
        control_rx: FrameReader,
        control_tx: s2n_quic::stream::SendStream,
        mut hello: Hello,
        initiator: u64,
    ) {
        // A peer listening on every interface announces an unspecified address; others reach
        // it at the address this connection comes from, on the announced port.
        if hello.listen.ip().is_unspecified()
            && let Ok(seen) = connection.remote_addr()
        {
            hello.listen.set_ip(seen.ip());
        }
        let (handle, acceptor) = connection.split();
        let conn = Arc::new(Conn::new(
            hello.endpoint,
            hello.listen,
            initiator,
            handle,
            control_tx,
        ));
        // One connection per endpoint pair: when both dialed, keep the one dialed by the
        // endpoint with the smaller id, on both sides alike.
        let retired = match self.conns.entry(hello.endpoint) {
            dashmap::Entry::Vacant(v) => {
                v.insert(conn.clone());
                None
            }
            dashmap::Entry::Occupied(mut o) => {
                if conn.initiator < o.get().initiator {
                    Some(o.insert(conn.clone()))
                } else {
                    Some(conn.clone())
                }
            }
        };
        if let Some(loser) = retired {
            tracing::debug!(peer = %hello.listen, "duplicate connection retired");
            let token = self.shutdown.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(RETIRE_GRACE) => {}
                    () = token.cancelled() => {}
                }
                loser.handle.close(close::DUPLICATE.into());
            });
        }
        self.by_addr.insert(hello.listen, hello.endpoint);
        self.publish(Event::ConnectionEstablished { addr: hello.listen });
        for reg in hello.agents {
            self.remote_joined(reg, hello.endpoint);
        }
        // Peer exchange: dial what the peer knows, tell the others about the peer.
        for addr in hello.known {
            self.dial_in_background(addr);
        }
        let others: Vec<Arc<Conn>> = self
            .conns
            .iter()
            .filter(|c| c.endpoint != hello.endpoint)
            .map(|c| c.value().clone())
            .collect();
        let news = Control::Peers(vec![hello.listen]);
        let me = self.clone();
        self.tasks.spawn(async move {
            for c in others {
                let _ = c.control(&me.codec, &news).await;
            }
        });
        self.tasks
            .spawn(conn::drive(self.clone(), conn, control_rx, acceptor));
    }

    pub(crate) fn remote_joined(&self, reg: Registration, endpoint: u64) {
        let info = self.peer_info_remote(&reg, endpoint);
        let id = reg.id.clone();
        if self.locals.contains_key(&id) {
            tracing::warn!(agent = %id, "a remote endpoint announces an agent of the same id as a local one; ignored");
            return;
        }
        let fresh = self.remotes.insert(id, Remote { reg, endpoint }).is_none();
        if fresh {
            self.publish(Event::PeerDiscovered(info));
        }
    }

    pub(crate) fn remote_left(&self, id: &AgentId, endpoint: u64) {
        if self
            .remotes
            .remove_if(id, |_, r| r.endpoint == endpoint)
            .is_some()
        {
            self.publish(Event::PeerLeft(id.clone()));
        }
    }

    /// Forgets a connection that ended; if it was the one in use, its agents are gone too.
    pub(crate) fn connection_ended(&self, conn: &Arc<Conn>, reason: String) {
        let current = self
            .conns
            .remove_if(&conn.endpoint, |_, c| Arc::ptr_eq(c, conn))
            .is_some();
        if !current {
            return;
        }
        self.by_addr
            .remove_if(&conn.listen, |_, e| *e == conn.endpoint);
        let gone: Vec<AgentId> = self
            .remotes
            .iter()
            .filter(|r| r.endpoint == conn.endpoint)
            .map(|r| r.key().clone())
            .collect();
        for id in gone {
            self.remote_left(&id, conn.endpoint);
        }
        tracing::info!(peer = %conn.listen, %reason, "connection lost");
        self.publish(Event::ConnectionLost {
            addr: conn.listen,
            reason,
        });
    }

    pub(crate) fn dial_in_background(self: &Arc<Self>, addr: SocketAddr) {
        if addr == self.listen
            || self.by_addr.contains_key(&addr)
            || self.dialing.insert(addr, ()).is_some()
        {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = me.connect(addr).await {
                tracing::debug!(%addr, error = %e, "peer exchange dial failed");
                me.publish(Event::TransportError {
                    transport: aqe_core::TransportKind::Quic,
                    message: format!("dial {addr}: {e}"),
                });
            }
            me.dialing.remove(&addr);
        });
    }

    fn peer_info_remote(&self, reg: &Registration, endpoint: u64) -> PeerInfo {
        let conn = self.conns.get(&endpoint).map(|c| c.value().clone());
        let mut info = reg.peer_info(conn.as_ref().map(|c| c.listen), PeerState::Connected);
        info.rtt = conn
            .map(|c| c.link().read().smoothed_rtt)
            .filter(|d| !d.is_zero());
        info
    }

    pub(crate) fn peers(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .locals
            .iter()
            .map(|l| l.reg.peer_info(Some(self.listen), PeerState::Connected))
            .collect();
        out.extend(
            self.remotes
                .iter()
                .map(|r| self.peer_info_remote(&r.reg, r.endpoint)),
        );
        out
    }

    /// Tells every connected endpoint.
    pub(crate) async fn tell_all(&self, msg: &Control) {
        let conns: Vec<Arc<Conn>> = self.conns.iter().map(|c| c.value().clone()).collect();
        for c in conns {
            if let Err(e) = c.control(&self.codec, msg).await {
                tracing::debug!(peer = %c.listen, error = %e, "control message not sent");
            }
        }
    }

    pub(crate) async fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.cancel();
        let conns: Vec<Arc<Conn>> = self.conns.iter().map(|c| c.value().clone()).collect();
        for c in &conns {
            c.handle.close(close::NORMAL.into());
        }
        let locals: Vec<AgentId> = self.locals.iter().map(|l| l.key().clone()).collect();
        for id in locals {
            self.locals.remove(&id);
            self.publish(Event::PeerLeft(id));
        }
        let remotes: Vec<AgentId> = self.remotes.iter().map(|r| r.key().clone()).collect();
        for id in remotes {
            self.remotes.remove(&id);
            self.publish(Event::PeerLeft(id));
        }
        self.conns.clear();
        self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Whether a connection to the endpoint listening at `addr` is up.
    fn connected_to(&self, addr: SocketAddr) -> bool {
        self.by_addr
            .get(&addr)
            .is_some_and(|e| self.conns.contains_key(&*e))
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

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

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
                    shared.publish(Event::SecurityRejected { addr, kind });
                }
                None => return,
            },
        }
    }
}

/// Keeps dialing a bootstrap peer until connected, backing off, until shutdown.
async fn bootstrap(shared: Arc<Shared>, peer: String) {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let addr = tokio::net::lookup_host(peer.as_str())
                .await
                .map_err(|e| Error::ConnectionFailed {
                    addr: shared.listen,
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
                    transport: aqe_core::TransportKind::Quic,
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
            detail: "the peer does not speak this protocol version (aqe/1)",
        };
    }
    match e {
        s2n_quic::connection::Error::MaxHandshakeDurationExceeded { .. }
        | s2n_quic::connection::Error::IdleTimerExpired { .. } => Error::ConnectionTimeout {
            addr,
            after: timeout,
        },
        e => Error::ConnectionFailed {
            addr,
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
            addr,
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
            addr,
            source: "the peer closed the control stream".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config() -> QuicConfig {
        QuicConfig {
            enabled: true,
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
            ..shared.hello()
        };
        assert!(shared.check(&good).is_ok());
        let (code, err) = shared
            .check(&Hello {
                version: 9,
                ..good.clone()
            })
            .expect_err("version");
        assert_eq!(code, close::VERSION_MISMATCH);
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    found: 9,
                    supported: 1
                }
            ),
            "{err}"
        );
        let (code, _) = shared
            .check(&Hello {
                endpoint: shared.id,
                ..good.clone()
            })
            .expect_err("self");
        assert_eq!(code, close::SELF_CONNECTION);
        let (code, err) = shared
            .check(&Hello {
                token: Some("t0k3N".into()),
                ..good.clone()
            })
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
            .check(&Hello {
                token: None,
                ..good
            })
            .expect_err("no token");
        assert_eq!(code, close::TOKEN_MISSING);
        shared.shutdown().await;
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
