//! [`NatsTransport`]: the [`Transport`](aqe_core::Transport) of a NATS endpoint.

use std::sync::Arc;

use aqe_core::{Address, Result, TransportKind};
use aqe_link::Host;
use aqe_session::EndpointId;

use crate::NatsConfig;
use crate::endpoint::NatsWire;

/// An endpoint on a NATS server, hosting any number of agents: agents of every endpoint of
/// the same fleet on the same server (or cluster) reach each other through it, over TCP,
/// from any host. Cloning gives another handle to the same endpoint.
///
/// Each pair of endpoints keeps one session (aqe-session's, as over QUIC), its frames
/// published on the receiving endpoint's subject in batches. A reliable message is numbered,
/// acknowledged, sent again when the acknowledgement does not come (NATS itself delivers at
/// most once), handed to its agent once and in order, and confirmed when taken; it ends
/// taken or reported in [`Event::DeliveryFailed`](aqe_core::Event::DeliveryFailed) by its delivery deadline. An unreliable
/// one is published once. Endpoints hear each other's heartbeats on the fleet's presence
/// subject; one silent for the liveness timeout is gone, with its agents. PROTOCOL.md gives
/// the subjects and packets.
///
/// # Examples
/// ```no_run
/// # async fn run() -> aqe_core::Result<()> {
/// use aqe_nats::{NatsConfig, NatsTransport};
/// let config = NatsConfig {
///     servers: vec!["nats://10.0.0.5:4222".into()],
///     fleet: "qe".into(),
///     ..NatsConfig::default()
/// };
/// let endpoint = NatsTransport::connect(config).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsTransport {
    host: Host,
    wire: Arc<NatsWire>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("endpoint", &self.wire.me)
            .field("fleet", &self.wire.config.fleet)
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// How NATS names itself in events and logs.
    pub const KIND: TransportKind = TransportKind::new("NATS");

    /// Connects to one of `config.servers` and joins the fleet `config.fleet`.
    ///
    /// # Errors
    /// [`aqe_core::Error::Configuration`] for invalid options or an unreadable credentials
    /// file; [`aqe_core::Error::ConnectionFailed`] when no server can be reached (or refuses
    /// the credentials), naming the servers.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let (wire, host) = NatsWire::connect(config, false).await?;
        Ok(Self { host, wire })
    }

    /// As [`NatsTransport::connect`], for a long-running process: returns at once even when
    /// no server answers yet (a warning says so), and connects when one does, as it
    /// reconnects after losing one.
    ///
    /// # Errors
    /// [`aqe_core::Error::Configuration`] for invalid options or an unreadable credentials
    /// file.
    pub async fn connect_in_background(config: NatsConfig) -> Result<Self> {
        let (wire, host) = NatsWire::connect(config, true).await?;
        Ok(Self { host, wire })
    }

    /// The servers this endpoint was given.
    pub fn server(&self) -> &Address {
        &self.wire.server
    }

    /// This endpoint: a random key chosen at start and its process's incarnation.
    pub fn endpoint(&self) -> EndpointId {
        self.wire.me
    }

    /// This endpoint's name in the fleet (32 hex digits, as in its subject).
    pub fn endpoint_id(&self) -> String {
        self.wire.me.to_string()
    }

    /// Other endpoints of the fleet this one has a session with now.
    pub fn endpoints(&self) -> usize {
        self.host.connections()
    }

    /// The introspection ids (`aqe.endpoint.<id>`) of the endpoints this one has a session
    /// with: what `aqe stats`, `health` and `top` ask.
    pub fn endpoint_agents(&self) -> Vec<aqe_core::AgentId> {
        self.host.endpoint_agents()
    }
}

aqe_link::transport_via_host!(NatsTransport, host);
