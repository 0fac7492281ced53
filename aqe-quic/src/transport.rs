//! [`QuicTransport`]: the [`Transport`] trait over QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, oneshot};

use aqe_core::plumbing::LocalAgent;
use aqe_core::plumbing::{Delivered, InboxSender};
use aqe_core::{
    AgentId, Channel, Envelope, Error, Event, PeerInfo, Redeliver, Registration, Result, RttStats,
    Stats, StreamHeader, StreamSink, Transport, TransportKind,
};

use crate::conn::Conn;
use crate::endpoint::Shared;
use crate::outbox::{Lane, Pending};
use crate::stream::QuicSink;

/// A QUIC endpoint hosting any number of agents: one UDP socket to accept on (and one to
/// dial from), one connection per remote endpoint carrying the traffic of every agent on
/// both sides. Cloning gives another handle to the same endpoint.
///
/// Reliable messages are acknowledged end to end: `Ok` from [`Transport::send`] means the
/// message is accepted, and it then ends either taken by its receiving agent or reported in
/// [`Event::DeliveryFailed`]. A connection that ends with messages unacknowledged (its peer
/// died, the network failed) hands them on: to the same agent over its next connection, or
/// to the redelivery handler a fallback registered, within the delivery deadline.
///
/// # Examples
/// ```no_run
/// # async fn run() -> aqe_core::Result<()> {
/// use aqe_core::Transport;
/// use aqe_quic::{QuicConfig, QuicTransport};
/// let a = aqe_quic::QuicTransport::bind(QuicConfig::default()).await?;
/// let b = aqe_quic::QuicTransport::bind(QuicConfig::default()).await?;
/// b.connect(a.local_addr()).await?; // TLS 1.3 handshake, then the aqe hello
/// assert_eq!(a.kind(), QuicTransport::KIND);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QuicTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("listen", &self.shared.listen)
            .field("connections", &self.shared.connection_count())
            .finish_non_exhaustive()
    }
}

/// One connection's figures, from s2n-quic's recovery and packet events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkInfo {
    /// Where the remote endpoint listens.
    pub addr: SocketAddr,
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

/// How many times a send routes again when its connection ends under it.
const ROUTE_ATTEMPTS: usize = 4;

enum Target {
    Here(Arc<LocalAgent>),
    There(Arc<Conn>),
}

impl QuicTransport {
    /// How QUIC names itself in events and logs.
    pub const KIND: TransportKind = TransportKind::new("QUIC");

    /// Opens an endpoint as `config` says: listens on `host:port` (port 0 picks one, see
    /// [`QuicTransport::local_addr`]), loads or generates certificates, and starts dialing
    /// the bootstrap peers in the background.
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid options or an address that cannot be bound;
    /// [`Error::Security`] when certificates cannot be loaded.
    pub async fn bind(config: crate::QuicConfig) -> Result<Self> {
        let t = Self {
            shared: Shared::bind(config).await?,
        };
        if let Err(e) = crate::introspect::start(&t).await {
            t.shutdown().await;
            return Err(e);
        }
        Ok(t)
    }

    pub(crate) fn shared_arc(&self) -> &Arc<Shared> {
        &self.shared
    }

    #[cfg(test)]
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    #[cfg(feature = "testing")]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The options this endpoint was started with.
    pub fn config(&self) -> &crate::QuicConfig {
        &self.shared.config
    }

    /// Where this endpoint accepts connections.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Connects to the endpoint at `addr`, unless already connected: QUIC handshake (TLS 1.3,
    /// ALPN `aqe/3`), then hellos (version, token, agents, known peers). Peers it knows are
    /// dialed in turn.
    ///
    /// # Errors
    /// [`Error::ConnectionTimeout`], [`Error::ConnectionFailed`], [`Error::Security`] for an
    /// untrusted certificate or a rejected token, [`Error::Protocol`] for a peer speaking
    /// another version, [`Error::Shutdown`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<()> {
        self.shared.connect(addr).await
    }

    /// Statistics of each connection to a remote endpoint, as QUIC measures them.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.shared
            .conns()
            .iter()
            .map(|c| {
                let r = c.link().read();
                LinkInfo {
                    addr: c.listen,
                    rtt: r.rtt(),
                    smoothed_rtt: if r.rtt_samples > 0 {
                        r.smoothed_rtt
                    } else {
                        Duration::ZERO
                    },
                    congestion_window: r.cwnd,
                    packets_sent: r.packets_sent,
                    packets_lost: r.packets_lost,
                }
            })
            .collect()
    }

    /// The introspection agents of the other endpoints this one knows (one per endpoint; id
    /// `aqe.endpoint.<endpoint id>`, listening on `coordination`): each answers any request
    /// with an [`aqe_core::EndpointReport`] in JSON. Every endpoint hosts one; they are left
    /// out of [`Transport::peers`] and of membership events.
    pub fn endpoint_agents(&self) -> Vec<AgentId> {
        self.shared.endpoint_agents()
    }

    /// How many remote endpoints this endpoint is connected to.
    pub fn connections(&self) -> usize {
        self.shared.connection_count()
    }

    fn sender(&self, id: &AgentId) -> Result<Arc<LocalAgent>> {
        self.shared.live()?;
        self.shared
            .local(id)
            .ok_or_else(|| Error::PeerNotFound { peer: id.clone() })
    }

    /// Where `to` is, checking that it listens on `channel`; an endpoint known only through
    /// peer exchange is connected to first, within `wait`.
    async fn target(
        &self,
        to: &AgentId,
        channel: &aqe_core::ChannelName,
        wait: Duration,
    ) -> Result<Target> {
        if let Some(local) = self.shared.local(to) {
            local.listens(channel)?;
            return Ok(Target::Here(local));
        }
        self.shared
            .route(to, channel, wait)
            .await
            .map(Target::There)
    }

    /// Sends one envelope to one agent as its channel says, and counts it. With `confirm`,
    /// resolves once the receiver took it.
    async fn deliver(
        &self,
        sender: &Arc<LocalAgent>,
        channel: &Channel,
        to: &AgentId,
        envelope: Envelope,
        confirm: bool,
    ) -> Result<()> {
        let send_timeout = self.shared.config.send_timeout;
        let deadline = tokio::time::Instant::now() + send_timeout;
        let mut envelope = envelope;
        // A connection can end or be retired between routing and enqueueing (its peer is
        // then reachable over another, or not at all): route again rather than fail.
        for _ in 0..ROUTE_ATTEMPTS {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let conn = match self.target(to, &channel.name, wait).await {
                Ok(Target::Here(local)) => {
                    return self
                        .shared
                        .local_delivery
                        .send(sender, &local, envelope, channel, confirm)
                        .await;
                }
                Ok(Target::There(conn)) => conn,
                Err(e @ Error::PeerNotFound { .. }) => {
                    // Messages accepted for this agent before its connection ended may be on
                    // their way through the fallback: whatever falls back after this error
                    // goes out after them.
                    self.shared.await_handoff(to, send_timeout).await;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if !channel.reliable {
                return self.send_unreliable(sender, &conn, envelope, confirm);
            }
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            match conn
                .outbox
                .admit(to, wait, || conn.lost("the connection ended"))
                .await
            {
                Ok(()) => {}
                Err(Error::ConnectionLost { .. }) => continue,
                Err(Error::SendFailed {
                    to,
                    reason: aqe_core::SendFailure::QueueFull(_),
                }) => {
                    return Err(Error::SendFailed {
                        to,
                        reason: aqe_core::SendFailure::QueueFull(send_timeout),
                    });
                }
                Err(e) => return Err(e),
            }
            let pending = match self.pending(sender, channel, envelope, confirm) {
                Ok(p) => p,
                Err(e) => {
                    conn.outbox.release(to);
                    return Err(e);
                }
            };
            let (pending, confirmed) = pending;
            let len = pending.envelope.payload.len();
            sender.stats.accepted();
            match conn.enqueue(&self.shared, pending, true) {
                Ok(()) => {
                    sender.stats.sent(len);
                    return match confirmed {
                        None => Ok(()),
                        Some(rx) => self.await_confirmation(rx).await,
                    };
                }
                Err(p) => {
                    sender.stats.unaccepted();
                    envelope = p.envelope;
                }
            }
        }
        Err(Error::PeerNotFound { peer: to.clone() })
    }

    /// Unreliable: one datagram, never waiting; a full queue drops it and counts the drop.
    fn send_unreliable(
        &self,
        sender: &LocalAgent,
        conn: &Conn,
        envelope: Envelope,
        confirm: bool,
    ) -> Result<()> {
        if confirm {
            return Err(Error::Unsupported {
                operation: "a confirmed send on an unreliable channel (nothing is acknowledged there)",
            });
        }
        let len = envelope.payload.len();
        match conn.send_datagram(self.shared.codec.encode_to_bytes(&envelope)?)? {
            Delivered::Queued | Delivered::Duplicate => sender.stats.sent(len),
            Delivered::Dropped => sender.stats.dropped(),
        }
        Ok(())
    }

    /// A reliable message ready to be enqueued, and the receiver of its confirmation.
    fn pending(
        &self,
        sender: &LocalAgent,
        channel: &Channel,
        envelope: Envelope,
        confirm: bool,
    ) -> Result<(Pending, Option<oneshot::Receiver<Result<()>>>)> {
        let body = aqe_core::encode(&envelope)?;
        let (done, confirmed) = if confirm {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let lane = if channel.ordered {
            Lane::Ordered(channel.name.clone())
        } else {
            Lane::Unordered
        };
        let pending = Pending {
            envelope,
            body,
            lane,
            accepted: Instant::now(),
            in_doubt: false,
            seq: 0,
            written: None,
            stats: sender.stats.clone(),
            confirm: done,
        };
        Ok((pending, confirmed))
    }

    /// Waits for a confirmed message's receipt. Every accepted message is settled by its
    /// deadline at the latest (acknowledged, reported unprocessed, or failed once redelivery
    /// gave up); a receiver that holds it longer in its handler makes this time out, the
    /// message still on its way.
    async fn await_confirmation(&self, confirmed: oneshot::Receiver<Result<()>>) -> Result<()> {
        let wait = self.shared.config.delivery_deadline + self.shared.config.send_timeout;
        match tokio::time::timeout(wait, confirmed).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout {
                after: wait,
                attempts: 1,
            }),
        }
    }

    async fn send_as(&self, envelope: Envelope, confirm: bool) -> Result<()> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_outgoing(&envelope.channel, envelope.payload.len())?
            .clone();
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        self.deliver(&sender, &channel, &to, envelope, confirm)
            .await
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn kind(&self) -> TransportKind {
        Self::KIND
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.shared.attach(agent, inbox)
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        self.shared.detach(agent)
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, false).await
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, true).await
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let sender = self.sender(&envelope.from)?;
        let len = envelope.payload.len();
        sender.reg.check_outgoing(&envelope.channel, len)?;
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a request needs exactly one recipient",
        })?;
        match self.target(&to, &envelope.channel, timeout).await? {
            Target::Here(local) => {
                self.shared
                    .local_delivery
                    .request(&sender, &local, envelope, timeout)
                    .await
            }
            Target::There(conn) => {
                let started = Instant::now();
                let response = conn.request(&self.shared, envelope, timeout).await?;
                sender.stats.sent(len);
                sender.stats.received(response.payload.len());
                sender.stats.rtt_sample(started.elapsed());
                Ok(response)
            }
        }
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let sender = self.sender(&header.from)?;
        let channel = sender
            .reg
            .check_outgoing(&header.options.channel, 0)?
            .clone();
        let send_timeout = self.shared.config.send_timeout;
        match self.target(&header.to, &channel.name, send_timeout).await? {
            Target::Here(local) => {
                let sink = self
                    .shared
                    .local_delivery
                    .open_stream(&sender, &local, header, &channel)
                    .await?;
                Ok(Box::new(sink))
            }
            Target::There(conn) => {
                let send = tokio::time::timeout(
                    send_timeout,
                    conn.open_stream(&self.shared.codec, &header),
                )
                .await
                .map_err(|_| Error::SendFailed {
                    to: header.to.clone(),
                    reason: aqe_core::SendFailure::QueueFull(send_timeout),
                })??;
                Ok(Box::new(QuicSink::new(
                    &header,
                    send,
                    self.shared.codec,
                    channel.max_message_size,
                    sender,
                    send_timeout,
                )))
            }
        }
    }

    fn can_reach(&self, agent: &AgentId) -> bool {
        self.shared.can_reach(agent)
    }

    async fn flush(
        &self,
        from: &AgentId,
        to: &AgentId,
        channel: &aqe_core::ChannelName,
    ) -> Result<()> {
        self.shared.flow_settled(from, to, channel).await
    }

    fn registration(&self, agent: &AgentId) -> Result<Registration> {
        Ok(self.sender(agent)?.reg.clone())
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.shared.peers()
    }

    /// The agent's message counters (bytes are payload bytes), with the QUIC figures of the
    /// endpoint's connections: RTT (real samples of every connection, combined), loss
    /// (packets lost over packets sent), congestion window (the largest), and the peer
    /// endpoints lost without a goodbye that have not come back.
    fn stats(&self, agent: &AgentId) -> Stats {
        let mut stats = self
            .shared
            .local(agent)
            .map(|l| l.stats.snapshot())
            .unwrap_or_default();
        let links: Vec<_> = self
            .shared
            .conns()
            .iter()
            .map(|c| c.link().read())
            .collect();
        let rtt = links
            .iter()
            .fold(RttStats::default(), |acc, l| acc.merge(l.rtt()));
        if rtt.samples > 0 {
            stats.rtt = rtt;
        }
        let (sent, lost) = links
            .iter()
            .fold((0, 0), |(s, l), r| (s + r.packets_sent, l + r.packets_lost));
        if sent > 0 {
            stats.packet_loss = stats.packet_loss.max(lost as f64 / sent as f64);
        }
        stats.congestion_window = links.iter().map(|l| l.cwnd).max().filter(|c| *c > 0);
        stats.unreachable_peers = self.shared.unreachable() as u64;
        stats
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn set_redelivery(&self, redeliver: Arc<dyn Redeliver>) {
        self.shared.set_redelivery(redeliver);
    }

    async fn shutdown(&self) {
        self.shared.shutdown().await;
    }
}
