//! [`QuicTransport`]: the [`Transport`](aqe_core::Transport) of a QUIC endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aqe_core::{AgentId, Result, RttStats, TransportKind};
use aqe_link::Host;
use aqe_session::EndpointId;

use crate::endpoint::Endpoint;

/// A QUIC endpoint hosting any number of agents: one UDP socket to accept on (and one to
/// dial from), one session per remote endpoint (over one connection) carrying the traffic
/// of every agent on both sides. Cloning gives another handle to the same endpoint.
///
/// Reliable messages are acknowledged end to end: `Ok` from [`Transport::send`](aqe_core::Transport::send) means the
/// message is accepted, and it then ends either taken by its receiving agent or reported in
/// [`Event::DeliveryFailed`](aqe_core::Event::DeliveryFailed), by its delivery deadline.
///
/// # Examples
/// ```no_run
/// # async fn run() -> aqe_core::Result<()> {
/// use aqe_core::Transport;
/// use aqe_quic::{QuicConfig, QuicTransport};
/// let a = QuicTransport::bind(QuicConfig::default()).await?;
/// let b = QuicTransport::bind(QuicConfig::default()).await?;
/// b.connect(a.local_addr()).await?; // TLS 1.3 handshake, then the hellos
/// assert_eq!(a.kind(), QuicTransport::KIND);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QuicTransport {
    host: Host,
    endpoint: Arc<Endpoint>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("endpoint", &self.endpoint.me)
            .field("listen", &self.endpoint.listen)
            .field("connections", &self.host.connections())
            .finish_non_exhaustive()
    }
}

/// One connection's figures, from s2n-quic's recovery and packet events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkInfo {
    /// Where the remote endpoint listens.
    pub addr: SocketAddr,
    /// The remote endpoint.
    pub endpoint: EndpointId,
    /// Round-trip times measured on the connection (real samples only).
    pub rtt: RttStats,
    /// Smoothed round-trip time, as QUIC's loss recovery estimates it (zero before the
    /// first sample).
    pub smoothed_rtt: Duration,
    /// Congestion window, in bytes.
    pub congestion_window: u64,
    /// Packets sent on the connection.
    pub packets_sent: u64,
    /// Packets declared lost.
    pub packets_lost: u64,
}

impl QuicTransport {
    /// How QUIC names itself in events and logs.
    pub const KIND: TransportKind = TransportKind::new("QUIC");

    /// Opens an endpoint as `config` says: listens on `host:port` (port 0 picks one, see
    /// [`QuicTransport::local_addr`]), loads or generates certificates, and starts dialing
    /// the bootstrap peers in the background.
    ///
    /// # Errors
    /// [`aqe_core::Error::Configuration`] for invalid options or an address that cannot be
    /// bound; [`aqe_core::Error::Security`] when certificates cannot be loaded.
    pub async fn bind(config: crate::QuicConfig) -> Result<Self> {
        let (endpoint, host) = Endpoint::bind(config).await?;
        Ok(Self { host, endpoint })
    }

    /// The options this endpoint was started with.
    pub fn config(&self) -> &crate::QuicConfig {
        &self.endpoint.config
    }

    /// Where this endpoint accepts connections.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.listen
    }

    /// This endpoint: its certificate's key and its process's incarnation.
    pub fn endpoint(&self) -> EndpointId {
        self.endpoint.me
    }

    /// Connects to the endpoint at `addr`, unless a session with it lives: QUIC handshake
    /// (TLS 1.3, ALPN `aqe/4`), then the hellos. The session's membership follows.
    ///
    /// # Errors
    /// [`aqe_core::Error::ConnectionTimeout`], [`aqe_core::Error::ConnectionFailed`],
    /// [`aqe_core::Error::Security`] for an untrusted certificate, a rejected token or a key
    /// the certificate does not give, [`aqe_core::Error::Protocol`] for a peer speaking
    /// another version, [`aqe_core::Error::Shutdown`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<()> {
        self.endpoint.connect(&self.host, addr).await
    }

    /// Statistics of each live connection to a remote endpoint, as QUIC measures them.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.host
            .sessions()
            .iter()
            .filter_map(|s| {
                let f = self.host.figures(s)?;
                Some(LinkInfo {
                    addr: self.host.address_of(s).socket()?,
                    endpoint: s.peer(),
                    rtt: f.rtt,
                    smoothed_rtt: f.smoothed_rtt,
                    congestion_window: f.congestion_window,
                    packets_sent: f.packets_sent,
                    packets_lost: f.packets_lost,
                })
            })
            .collect()
    }

    /// The ids a request for each connected endpoint's report goes to
    /// (`aqe.endpoint.<endpoint>`): the endpoint answers with an
    /// [`aqe_core::EndpointReport`] in JSON, to the peers its configuration allows. They
    /// are no agents: they are in no membership.
    pub fn endpoint_agents(&self) -> Vec<AgentId> {
        self.host.endpoint_agents()
    }

    /// How many remote endpoints this endpoint has a live session with.
    pub fn connections(&self) -> usize {
        self.host.connections()
    }

    /// Payload bytes the endpoint holds for its peers now, out of `limits.endpointBytes`:
    /// unsettled messages, parked frames, requests in hand, partial frames.
    pub fn held_bytes(&self) -> u64 {
        self.host.budgets().held.used()
    }

    #[cfg(feature = "testing")]
    pub(crate) fn host(&self) -> &Host {
        &self.host
    }
}

aqe_link::transport_via_host!(QuicTransport, host);
