//! The QUIC endpoint as a wire: its sockets, the connections it dials and accepts, the
//! hellos that open sessions on them, and its bootstrap peers. Everything between
//! endpoints once a session exists is the host's (`aqe-link`) and the session layer's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use s2n_quic::client::Connect;
use s2n_quic::connection::Connection;
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::provider::limits::Limits as S2nLimits;
use tokio::sync::mpsc;
use tracing::Instrument;

use aqe_core::{Address, BoxError, Error, Event, Result, SecurityFailure, TransportKind};
use aqe_link::{Host, Opening, SessionHandle, WeakHost, Wire, fresh_incarnation};
use aqe_session::{EndpointId, Hello, HelloRefusal, Rank, check_hello};

use crate::QuicConfig;
use crate::conn::{self, ENVELOPE_OVERHEAD, Limits, LinkRef, QuicLink};
use crate::link::{self, StatsSubscriber};
use crate::tls::Material;
use crate::wire::{FrameCodec, FrameReader, LARGE, MAX_DATAGRAM, close};

/// Bootstrap dials back off up to this long between attempts.
const MAX_REDIAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for dialed connections to finish closing.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

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

/// The QUIC wire of one endpoint.
pub(crate) struct Endpoint {
    this: std::sync::Weak<Endpoint>,
    pub(crate) config: QuicConfig,
    pub(crate) me: EndpointId,
    pub(crate) listen: SocketAddr,
    client: Mutex<Option<s2n_quic::Client>>,
    host: OnceLock<WeakHost>,
    /// Bounds the dials under way.
    dials: tokio::sync::Semaphore,
    /// One dial per address at a time: a second caller waits for the first's outcome.
    dial_locks: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
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

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(aqe_core::MessageId::next().0);
    h.finish()
}

/// The security refusal a hello check stands for, as the close code that tells the peer and
/// the error the local caller gets.
fn refusal(r: HelloRefusal) -> (u32, Error) {
    let security = |kind| Error::Security { kind, source: None };
    match r {
        HelloRefusal::Version { found } => (
            close::VERSION_MISMATCH,
            Error::UnsupportedVersion {
                found,
                supported: aqe_session::SESSION_VERSION,
            },
        ),
        HelloRefusal::SelfLink => (
            close::SELF_CONNECTION,
            Error::Protocol {
                detail: "connection to self",
            },
        ),
        HelloRefusal::IdentityMismatch => (
            close::IDENTITY_MISMATCH,
            security(SecurityFailure::IdentityMismatch),
        ),
        HelloRefusal::TokenMissing => (
            close::TOKEN_MISSING,
            security(SecurityFailure::TokenMissing),
        ),
        HelloRefusal::TokenRejected => (
            close::TOKEN_REJECTED,
            security(SecurityFailure::TokenRejected),
        ),
    }
}

impl Endpoint {
    /// Opens the endpoint's sockets and starts its host and its tasks.
    pub(crate) async fn bind(config: QuicConfig) -> Result<(Arc<Self>, Host)> {
        config.validate()?;
        let host_config = config.host()?;
        if config.enable_0rtt {
            tracing::warn!(
                "enable0RTT: s2n-quic does not support 0-RTT early data; connections use full 1-RTT handshakes"
            );
        }
        if config.peer_exchange == crate::PeerExchange::All {
            tracing::warn!(
                "peerExchange \"all\": this endpoint takes any peer's word about other endpoints, authenticated or not"
            );
        }
        let material = Material::new(&config.security).await?;
        let bind = resolve(&config.host, config.port).await?;
        let streams = u64::from(config.max_concurrent_streams);
        let window = u64::from(config.limits.connection_window);
        let limits = || -> std::result::Result<S2nLimits, BoxError> {
            Ok(S2nLimits::new()
                .with_max_idle_timeout(config.idle_timeout)?
                .with_max_handshake_duration(config.connection_timeout)?
                .with_max_open_remote_bidirectional_streams(streams)?
                .with_max_open_remote_unidirectional_streams(streams)?
                // What this side may open is bounded by what the peer allows; s2n-quic's own
                // default (100) would cap it below that.
                .with_max_open_local_bidirectional_streams(streams)?
                .with_max_open_local_unidirectional_streams(streams)?
                .with_active_connection_migration(config.enable_migration)?
                .with_data_window(window)?
                .with_bidirectional_local_data_window(window)?
                .with_bidirectional_remote_data_window(window)?
                .with_unidirectional_data_window(window)?
                .with_max_send_buffer_size(config.limits.stream_send_buffer)?)
        };
        let dgrams = || -> std::result::Result<datagram::Endpoint, BoxError> {
            Ok(datagram::Endpoint::builder()
                .with_send_capacity(crate::conn::DATAGRAM_QUEUE)?
                .with_recv_capacity(crate::conn::DATAGRAM_QUEUE)?
                .build()?)
        };
        let io = |addr: SocketAddr| -> std::result::Result<s2n_quic::provider::io::tokio::Provider, BoxError> {
            Ok(s2n_quic::provider::io::tokio::Builder::default()
                .with_receive_address(addr)?
                .with_internal_recv_buffer_size(config.limits.socket_buffer as usize)?
                // The kernel's buffer holds a peer's whole window in flight, with its overhead
                // per packet: at its default (208 KiB) a burst overflowed it while this
                // endpoint was busy, and QUIC took the drops for congestion.
                .with_recv_buffer_size((config.limits.connection_window as usize).saturating_mul(2))?
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
            // s2n-quic's own events go to tracing too, off unless asked for.
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
        // The endpoint's key is its certificate's: a peer that verified the certificate
        // knows the key is not made up. The incarnation tells this process from others
        // holding the same certificate.
        let me = EndpointId::new(material.identity, fresh_incarnation());
        let dials = tokio::sync::Semaphore::new(config.limits.concurrent_dials as usize);
        let endpoint = Arc::new_cyclic(|this| Endpoint {
            this: this.clone(),
            config,
            me,
            listen,
            client: Mutex::new(Some(client)),
            host: OnceLock::new(),
            dials,
            dial_locks: Mutex::new(HashMap::new()),
        });
        let host = Host::new(me, listen.into(), endpoint.clone(), host_config);
        let _ = endpoint.host.set(host.downgrade());
        host.start();
        tracing::info!(%listen, endpoint = %me, "QUIC endpoint listening");
        let span = tracing::info_span!("endpoint", id = %me, %listen);
        host.tasks()
            .spawn(accept_loop(endpoint.clone(), host.clone(), server).instrument(span.clone()));
        host.tasks()
            .spawn(announce_rejections(host.clone(), rejected).instrument(span.clone()));
        for peer in endpoint.config.bootstrap_peers.clone() {
            host.tasks()
                .spawn(bootstrap(endpoint.clone(), host.clone(), peer).instrument(span.clone()));
        }
        Ok((endpoint, host))
    }

    fn host(&self) -> Option<Host> {
        self.host.get().and_then(WeakHost::upgrade)
    }

    fn token(&self) -> Option<String> {
        let sec = &self.config.security;
        sec.enable_token_auth
            .then(|| sec.token.as_ref().map(|t| t.expose().to_owned()))
            .flatten()
    }

    /// How large the frames a connection accepts may be.
    fn limits(&self) -> Limits {
        Limits {
            control: self.config.limits.control_frame as usize,
            small: LARGE + ENVELOPE_OVERHEAD,
            session_bytes: self.config.limits.session_bytes,
        }
    }

    /// The live session whose peer listens at `addr`, if there is one.
    fn session_at(host: &Host, addr: SocketAddr) -> Option<SessionHandle> {
        let addr = Address::from(addr);
        host.sessions()
            .into_iter()
            .find(|s| host.address_of(s) == addr)
    }

    /// Connects to the endpoint at `addr` (unless a session with the endpoint listening
    /// there lives), within the connection timeout and the bound on dials; one dial per
    /// address at a time.
    pub(crate) async fn connect(self: &Arc<Self>, host: &Host, addr: SocketAddr) -> Result<()> {
        if addr == self.listen || Self::session_at(host, addr).is_some() {
            return Ok(());
        }
        let lock = self
            .dial_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_default()
            .clone();
        let outcome = async {
            let _one = lock.lock().await;
            if Self::session_at(host, addr).is_some() {
                return Ok(());
            }
            let _slot = self.dials.acquire().await.map_err(|_| Error::Shutdown)?;
            let stop = host.stopping();
            let dialed = tokio::select! {
                r = self.dial(host, addr) => r,
                () = stop.cancelled() => Err(Error::Shutdown),
            };
            match dialed {
                // The peer dialed this endpoint at the same time and kept its own connection:
                // the session comes over that one.
                Err(e) if is_duplicate(&e) => self.await_session(host, addr, e).await,
                r => r,
            }
        }
        .await;
        let mut locks = self.dial_locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.get(&addr).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(&addr);
        }
        outcome
    }

    /// Waits (at most the connection timeout) for the session with the endpoint at `addr`
    /// that a connection it dialed carries; `e` if none comes.
    async fn await_session(&self, host: &Host, addr: SocketAddr, e: Error) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.connection_timeout;
        while tokio::time::Instant::now() < deadline {
            if Self::session_at(host, addr).is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(e)
    }

    async fn dial(self: &Arc<Self>, host: &Host, addr: SocketAddr) -> Result<()> {
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Shutdown)?;
        let timeout = self.config.connection_timeout;
        // The name the listener's certificate must carry: the address dialed, or serverName.
        let name = if self.config.security.check_address {
            addr.ip().to_string()
        } else {
            self.config.security.server_name.clone()
        };
        let connect = Connect::new(addr).with_server_name(name.as_str());
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
        let ours = host.hello(nonce, Some(self.listen), self.token());
        let exchange = async {
            let stream = connection
                .open_bidirectional_stream()
                .await
                .map_err(|e| connection_error(addr, timeout, e))?;
            let (recv, mut send) = stream.split();
            let hello = FrameCodec::default().encode_to_bytes(&ours)?;
            send.send(hello)
                .await
                .map_err(|e| stream_connection_error(addr, timeout, e))?;
            let mut reader = FrameReader::new(
                recv,
                FrameCodec::new(self.config.limits.hello_frame as usize),
            );
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
        let (mut hello, reader, send) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                connection.close(close::HELLO_TIMEOUT.into());
                return Err(Error::ConnectionTimeout {
                    addr: addr.into(),
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                connection.close(close::PROTOCOL_VIOLATION.into());
                return Err(e);
            }
            Ok(Ok(x)) => x,
        };
        // The listener's certificate was verified: its key is known.
        let verified = link::of(&connection.handle()).peer_identity();
        let trust = match check_hello(&hello, self.me, self.token().as_deref(), verified) {
            Ok(t) => t,
            Err(r) => {
                let (code, e) = refusal(r);
                connection.close(code.into());
                return Err(e);
            }
        };
        if hello.nonce != nonce {
            connection.close(close::PROTOCOL_VIOLATION.into());
            return Err(Error::Protocol {
                detail: "the listener's hello does not echo the nonce",
            });
        }
        let rank = Rank {
            initiator: self.me,
            nonce,
        };
        self.establish(host, connection, &mut hello, rank, trust, reader, send)
            .await;
        Ok(())
    }

    /// Opens the session of a connection whose hellos passed, and serves it.
    #[allow(clippy::too_many_arguments)]
    async fn establish(
        &self,
        host: &Host,
        connection: Connection,
        hello: &mut Hello,
        rank: Rank,
        trust: aqe_session::Trust,
        mut control: FrameReader,
        send: s2n_quic::stream::SendStream,
    ) {
        // A peer's listen address is taken with the IP its connection comes from (the port
        // from its hello): nobody can point this endpoint, or its peers, at an IP the peer
        // does not send from. An address is only where to dial, never who someone is.
        let seen = connection.remote_addr().ok();
        let listen = match (hello.listen, seen) {
            (Some(mut l), Some(seen)) => {
                l.set_ip(seen.ip());
                l
            }
            (None, Some(seen)) => seen,
            (Some(l), None) => l,
            (None, None) => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        hello.listen = Some(listen);
        let limits = self.limits();
        control.set_limit(FrameCodec::new(limits.control));
        let (handle, acceptor) = connection.split();
        let link = QuicLink::new(
            handle,
            listen,
            send,
            host,
            self.config.send_timeout,
            hello.endpoint,
        );
        let opening = Opening {
            hello: hello.clone(),
            rank,
            trust,
            link: Arc::new(LinkRef(link.clone())),
        };
        match host.open(opening).await {
            Some(session) => {
                tracing::debug!(peer = %hello.endpoint, %listen, authenticated = trust.authenticated, "session opened");
                host.tasks().spawn(conn::serve(
                    host.clone(),
                    session,
                    link,
                    control,
                    acceptor,
                    limits,
                ));
            }
            None => {
                // A session of smaller rank with that endpoint lives: this one is not kept.
                link.close_with(close::DUPLICATE);
            }
        }
    }

    /// Serves a connection a peer opened: its hello first, nothing before it passes.
    async fn accepted(self: Arc<Self>, host: Host, mut connection: Connection) {
        let addr = connection.remote_addr().ok();
        let timeout = self.config.connection_timeout;
        let _ = connection.keep_alive(true);
        let hello_limit = FrameCodec::new(self.config.limits.hello_frame as usize);
        let exchange = async {
            let stream = connection
                .accept_bidirectional_stream()
                .await
                .ok()
                .flatten()?;
            let (recv, send) = stream.split();
            let mut reader = FrameReader::new(recv, hello_limit);
            let hello = reader.next::<Hello>().await.ok().flatten()?;
            Some((hello, reader, send))
        };
        let (mut hello, reader, mut send) = match tokio::time::timeout(timeout, exchange).await {
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
        let trust = match check_hello(&hello, self.me, self.token().as_deref(), verified) {
            Ok(t) => t,
            Err(r) => {
                let (code, e) = refusal(r);
                tracing::warn!(?addr, error = %e, "connection refused");
                if let (Error::Security { kind, .. }, Some(addr)) = (&e, addr) {
                    host.publish(Event::SecurityRejected {
                        addr: addr.into(),
                        kind: *kind,
                    });
                }
                connection.close(code.into());
                return;
            }
        };
        let ours = host.hello(hello.nonce, Some(self.listen), self.token());
        let sent = match FrameCodec::default().encode_to_bytes(&ours) {
            Ok(b) => tokio::time::timeout(timeout, send.send(b)).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a hello");
                return;
            }
        };
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let rank = Rank {
            initiator: hello.endpoint,
            nonce: hello.nonce,
        };
        self.establish(&host, connection, &mut hello, rank, trust, reader, send)
            .await;
    }
}

#[async_trait]
impl Wire for Endpoint {
    fn kind(&self) -> TransportKind {
        crate::QuicTransport::KIND
    }

    fn dial(&self, addr: SocketAddr, endpoint: EndpointId) {
        let Some(host) = self.host() else {
            return;
        };
        let Some(me) = self.this.upgrade() else {
            return;
        };
        let h = host.clone();
        host.tasks().spawn(async move {
            if let Err(e) = me.connect(&h, addr).await {
                tracing::debug!(%addr, peer = %endpoint, error = %e, "a dial for messages waiting failed");
            }
        });
    }

    fn max_datagram(&self) -> Option<usize> {
        Some(MAX_DATAGRAM)
    }

    fn listen(&self) -> Option<SocketAddr> {
        Some(self.listen)
    }

    async fn shutdown(&self) {
        // The connections this endpoint dialed close once their CONNECTION_CLOSE is out: a
        // process that exits right after shutdown still tells its peers it left. Bounded:
        // a peer that vanished is not waited for.
        let client = self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut client) = client {
            let _ = tokio::time::timeout(CLOSE_GRACE, client.wait_idle()).await;
        }
    }
}

async fn accept_loop(endpoint: Arc<Endpoint>, host: Host, mut server: s2n_quic::Server) {
    let stop = host.stopping();
    loop {
        let connection = tokio::select! {
            () = stop.cancelled() => return,
            c = server.accept() => match c {
                Some(c) => c,
                None => return,
            },
        };
        host.tasks()
            .spawn(endpoint.clone().accepted(host.clone(), connection));
    }
}

async fn announce_rejections(
    host: Host,
    mut rejected: mpsc::Receiver<(SocketAddr, SecurityFailure)>,
) {
    let stop = host.stopping();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = rejected.recv() => match r {
                Some((addr, kind)) => {
                    tracing::warn!(%addr, %kind, "connection failed a security check");
                    host.publish(Event::SecurityRejected { addr: addr.into(), kind });
                }
                None => return,
            },
        }
    }
}

/// Keeps a session with a bootstrap peer: dials it until connected, backing off, and again
/// whenever its session ends, until shutdown.
async fn bootstrap(endpoint: Arc<Endpoint>, host: Host, peer: String) {
    let stop = host.stopping();
    // Whether the peer was lost (or never reached): its return is worth saying.
    let mut missing = false;
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let addr = tokio::net::lookup_host(peer.as_str())
                .await
                .map_err(|e| Error::ConnectionFailed {
                    addr: endpoint.listen.into(),
                    source: e.into(),
                })?
                .next()
                .ok_or(Error::Protocol {
                    detail: "bootstrap peer resolves to nothing",
                })?;
            endpoint.connect(&host, addr).await.map(|()| addr)
        };
        match attempt.await {
            Ok(addr) => {
                delay = Duration::from_millis(100);
                if std::mem::take(&mut missing) {
                    tracing::info!(%peer, %addr, "connected to the bootstrap peer again");
                }
                // Stay connected: when the session ends, dial again.
                let mut events = aqe_core::Transport::subscribe(&host);
                while Endpoint::session_at(&host, addr).is_some() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = events.recv() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                tracing::info!(%peer, "session with bootstrap peer ended; reconnecting");
                missing = true;
                continue;
            }
            Err(Error::Shutdown) => return,
            Err(e) => {
                missing = true;
                tracing::warn!(%peer, error = %e, "bootstrap peer not reached; retrying in {delay:?}");
                host.publish(Event::TransportError {
                    transport: crate::QuicTransport::KIND,
                    message: format!("bootstrap {peer}: {e}"),
                });
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_REDIAL);
    }
}

/// Whether a dial ended because the peer kept another connection of the same pair.
fn is_duplicate(e: &Error) -> bool {
    let Error::ConnectionFailed { source, .. } = e else {
        return false;
    };
    matches!(
        source.downcast_ref::<s2n_quic::connection::Error>(),
        Some(s2n_quic::connection::Error::Application { error, .. })
            if u64::from(*error) == u64::from(close::DUPLICATE)
    )
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
            detail: "the peer does not speak this protocol version (aqe/4)",
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
