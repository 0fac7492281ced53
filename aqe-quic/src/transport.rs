//! [`QuicTransport`]: the [`Transport`] trait over QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use aqe_core::{
    AgentId, BroadcastReport, Channel, Delivered, Delivery, Envelope, Error, Event, Inbound,
    InboxSender, PeerInfo, PeerState, QuicConfig, Recipient, Registration, RemoteErrorKind, Result,
    RttStats, SendFailure, Stats, StreamHeader, StreamSink, Transport, TransportKind,
};

use crate::endpoint::{Local, Shared};
use crate::stream::QuicSink;
use crate::wire::Control;

/// A QUIC endpoint hosting any number of agents: one UDP socket to accept on (and one to
/// dial from), one connection per remote endpoint carrying the traffic of every agent on
/// both sides. Cloning gives another handle to the same endpoint.
///
/// # Examples
/// ```no_run
/// # async fn run() -> aqe_core::Result<()> {
/// use aqe_core::{QuicConfig, Transport};
/// let a = aqe_quic::QuicTransport::bind(QuicConfig::default()).await?;
/// let b = aqe_quic::QuicTransport::bind(QuicConfig::default()).await?;
/// b.connect(a.local_addr()).await?; // TLS 1.3 handshake, then the aqe hello
/// assert_eq!(a.kind(), aqe_core::TransportKind::Quic);
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
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest round-trip time seen.
    pub min_rtt: Duration,
    /// Congestion window, in bytes.
    pub congestion_window: u64,
    /// Packets sent on the connection.
    pub packets_sent: u64,
    /// Packets declared lost.
    pub packets_lost: u64,
}

enum Target {
    Here(Arc<Local>),
    There(Arc<crate::conn::Conn>),
}

impl QuicTransport {
    /// Opens an endpoint as `config` says: listens on `host:port` (port 0 picks one, see
    /// [`QuicTransport::local_addr`]), loads or generates certificates, and starts dialing
    /// the bootstrap peers in the background.
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid options or an address that cannot be bound;
    /// [`Error::Security`] when certificates cannot be loaded.
    pub async fn bind(config: QuicConfig) -> Result<Self> {
        Ok(Self {
            shared: Shared::bind(config).await?,
        })
    }

    /// Where this endpoint accepts connections.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Connects to the endpoint at `addr`, unless already connected: QUIC handshake (TLS 1.3,
    /// ALPN `aqe/1`), then hellos (version, token, agents, known peers). Peers it knows are
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
            .conns
            .iter()
            .map(|c| {
                let r = c.link().read();
                LinkInfo {
                    addr: c.listen,
                    rtt: r.smoothed_rtt,
                    min_rtt: r.min_rtt,
                    congestion_window: r.cwnd,
                    packets_sent: r.packets_sent,
                    packets_lost: r.packets_lost,
                }
            })
            .collect()
    }

    /// How many remote endpoints this endpoint is connected to.
    pub fn connections(&self) -> usize {
        self.shared.connection_count()
    }

    fn sender(&self, id: &AgentId) -> Result<Arc<Local>> {
        self.shared.live()?;
        self.shared
            .locals
            .get(id)
            .map(|l| l.value().clone())
            .ok_or_else(|| Error::PeerNotFound { peer: id.clone() })
    }

    /// Where `to` is, checking that it listens on `channel`.
    fn target(&self, to: &AgentId, channel: &aqe_core::ChannelName) -> Result<Target> {
        let missing = || Error::ChannelNotFound {
            channel: channel.clone(),
            agent: to.clone(),
        };
        if let Some(local) = self.shared.locals.get(to).map(|l| l.value().clone()) {
            return if local.reg.has_channel(channel) {
                Ok(Target::Here(local))
            } else {
                Err(missing())
            };
        }
        let (remote, conn) = self
            .shared
            .route(to)
            .ok_or_else(|| Error::PeerNotFound { peer: to.clone() })?;
        if remote.reg.has_channel(channel) {
            Ok(Target::There(conn))
        } else {
            Err(missing())
        }
    }

    /// Sends one envelope to one agent as its channel says, and counts it.
    async fn deliver(
        &self,
        sender: &Local,
        channel: &Channel,
        to: &AgentId,
        envelope: Envelope,
    ) -> Result<()> {
        let send_timeout = self.shared.config.send_timeout;
        let len = envelope.payload.len();
        let outcome = match self.target(to, &channel.name)? {
            Target::Here(local) => {
                let delivery = if channel.reliable {
                    Delivery::Reliable(send_timeout)
                } else {
                    Delivery::Unreliable
                };
                match local.inbox.room(delivery).await? {
                    Some(permit) => {
                        local.stats.received(len);
                        permit.send(Inbound::Message(envelope));
                        Delivered::Queued
                    }
                    None => Delivered::Dropped,
                }
            }
            Target::There(conn) if !channel.reliable => {
                conn.send_datagram(self.shared.codec.encode_to_bytes(&envelope)?)?
            }
            Target::There(conn) => {
                let codec = &self.shared.codec;
                let send = async {
                    if channel.ordered {
                        conn.send_ordered(codec, &channel.name, codec.encode_to_bytes(&envelope)?)
                            .await
                    } else {
                        conn.send_message(codec, &envelope).await
                    }
                };
                tokio::time::timeout(send_timeout, send)
                    .await
                    .map_err(|_| Error::SendFailed {
                        to: to.clone(),
                        reason: SendFailure::QueueFull(send_timeout),
                    })??;
                Delivered::Queued
            }
        };
        match outcome {
            Delivered::Queued => sender.stats.sent(len),
            Delivered::Dropped => sender.stats.dropped(),
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.shared.live()?;
        agent.validate()?;
        let info = agent.peer_info(Some(self.shared.listen), PeerState::Connected);
        match self.shared.locals.entry(agent.id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(Error::Configuration {
                    file: None,
                    field: "id".to_owned(),
                    message: format!("agent {} is already attached to this endpoint", agent.id),
                });
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Arc::new(Local {
                    reg: agent.clone(),
                    inbox,
                    stats: Arc::default(),
                }));
            }
        }
        self.shared.publish(Event::PeerDiscovered(info));
        self.shared.tell_all(&Control::Joined(agent)).await;
        Ok(())
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        self.shared
            .locals
            .remove(agent)
            .ok_or_else(|| Error::PeerNotFound {
                peer: agent.clone(),
            })?;
        self.shared.publish(Event::PeerLeft(agent.clone()));
        self.shared.tell_all(&Control::Left(agent.clone())).await;
        Ok(())
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_outgoing(&envelope.channel, envelope.payload.len())?
            .clone();
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        self.deliver(&sender, &channel, &to, envelope).await
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let sender = self.sender(&envelope.from)?;
        let len = envelope.payload.len();
        sender.reg.check_outgoing(&envelope.channel, len)?;
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a request needs exactly one recipient",
        })?;
        let started = Instant::now();
        let response = match self.target(&to, &envelope.channel)? {
            Target::Here(local) => {
                let (responder, answer) =
                    aqe_core::local::responder(envelope.from.clone(), local.stats.clone());
                let exchange = async {
                    let permit = local.inbox.reserve(timeout).await?;
                    local.stats.received(len);
                    permit.send(Inbound::Request {
                        envelope,
                        responder,
                    });
                    answer.await.map_err(|_| Error::Remote {
                        agent: to.clone(),
                        kind: RemoteErrorKind::Dropped,
                        message: "the request was dropped without an answer".to_owned(),
                    })
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(Err(Error::SendFailed {
                        reason: SendFailure::QueueFull(_),
                        ..
                    }))
                    | Err(_) => {
                        return Err(Error::Timeout {
                            after: timeout,
                            attempts: 1,
                        });
                    }
                    Ok(r) => r?,
                }
            }
            Target::There(conn) => conn.request(&self.shared, envelope, timeout).await?,
        };
        sender.stats.sent(len);
        sender.stats.received(response.payload.len());
        sender.stats.rtt_sample(started.elapsed());
        Ok(response)
    }

    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_broadcast(&envelope.channel, envelope.payload.len())?
            .clone();
        let sends = targets.iter().map(|to| {
            // Each copy names the peer it is for; its kind still says it was a broadcast.
            let mut copy = envelope.clone();
            copy.to = Recipient::Agent(to.clone());
            let (sender, channel) = (&sender, &channel);
            async move { (to.clone(), self.deliver(sender, channel, to, copy).await) }
        });
        Ok(BroadcastReport::from_outcomes(
            futures::future::join_all(sends).await,
        ))
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let sender = self.sender(&header.from)?;
        let channel = sender
            .reg
            .check_outgoing(&header.options.channel, 0)?
            .clone();
        let send_timeout = self.shared.config.send_timeout;
        match self.target(&header.to, &channel.name)? {
            Target::Here(local) => {
                let limits = aqe_core::local::LocalStreamLimits {
                    max_chunk: channel.max_message_size,
                    capacity: 64,
                    send_timeout,
                };
                let (sink, incoming) = aqe_core::local::stream(
                    header,
                    limits,
                    sender.stats.clone(),
                    local.stats.clone(),
                );
                let _ = local
                    .inbox
                    .deliver(Inbound::Stream(incoming), Delivery::Reliable(send_timeout))
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
                    reason: SendFailure::QueueFull(send_timeout),
                })??;
                Ok(Box::new(QuicSink::new(
                    header.id,
                    send,
                    self.shared.codec,
                    channel.max_message_size,
                    sender,
                )))
            }
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.shared.peers()
    }

    /// The agent's message counters (bytes are payload bytes), with the QUIC figures of the
    /// endpoint's connections: RTT (smoothed per connection; min and max over all), loss
    /// (packets lost over packets sent) and congestion window (the largest).
    fn stats(&self, agent: &AgentId) -> Stats {
        let mut stats = self
            .shared
            .locals
            .get(agent)
            .map(|l| l.stats.snapshot())
            .unwrap_or_default();
        let links: Vec<_> = self.shared.conns.iter().map(|c| c.link().read()).collect();
        let measured: Vec<_> = links.iter().filter(|l| !l.smoothed_rtt.is_zero()).collect();
        if !measured.is_empty() {
            let n = measured.len() as u32;
            stats.rtt = RttStats {
                samples: u64::from(n),
                current: measured
                    .iter()
                    .map(|l| l.latest_rtt)
                    .max()
                    .unwrap_or_default(),
                min: measured.iter().map(|l| l.min_rtt).min().unwrap_or_default(),
                max: measured
                    .iter()
                    .map(|l| l.max_rtt.max(l.smoothed_rtt))
                    .max()
                    .unwrap_or_default(),
                average: measured.iter().map(|l| l.smoothed_rtt).sum::<Duration>() / n,
            };
        }
        let (sent, lost) = links
            .iter()
            .fold((0, 0), |(s, l), r| (s + r.packets_sent, l + r.packets_lost));
        if sent > 0 {
            stats.packet_loss = stats.packet_loss.max(lost as f64 / sent as f64);
        }
        stats.congestion_window = links.iter().map(|l| l.cwnd).max().filter(|c| *c > 0);
        stats
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    async fn shutdown(&self) {
        self.shared.shutdown().await;
    }
}
