//! The [`Transport`] over NATS.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use aqe_core::plumbing::{InboxSender, LocalAgent};
use aqe_core::{
    Address, AgentId, BroadcastReport, Channel, Envelope, Error, Event, PeerInfo, Redeliver,
    Registration, Result, Stats, StreamHeader, StreamSink, Transport, TransportKind,
};

use crate::NatsConfig;
use crate::endpoint::Shared;
use crate::stream::NatsSink;
use crate::wire::{Ep, Frame};

/// An endpoint on a NATS server, hosting any number of agents: agents of every endpoint of
/// the same fleet on the same server (or cluster) reach each other through it, over TCP,
/// from any host.
///
/// Delivery follows the channel's contract as on QUIC: a reliable message is numbered in its
/// flow, acknowledged by the receiver's endpoint, sent again when the acknowledgement does
/// not come, delivered in order and once, and confirmed when its agent took it; it ends
/// taken or reported in [`Event::DeliveryFailed`]. An unreliable one is published once: at
/// most once, as NATS itself delivers. Membership comes from presence announcements on the
/// fleet's subject; an endpoint silent for the liveness timeout is gone, with its agents.
/// PROTOCOL.md gives the subjects and frames.
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
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("endpoint", &self.shared.me)
            .field("fleet", &self.shared.config.fleet)
            .finish_non_exhaustive()
    }
}

/// Where a message goes.
enum Target {
    Here(Arc<LocalAgent>),
    There(Ep),
}

impl NatsTransport {
    /// How NATS names itself in events and logs.
    pub const KIND: TransportKind = TransportKind::new("NATS");

    /// Connects to one of `config.servers` and joins the fleet `config.fleet`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid options or an unreadable credentials file;
    /// [`Error::ConnectionFailed`] when no server can be reached (or refuses the
    /// credentials), naming the servers.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        Ok(Self {
            shared: Shared::connect(config).await?,
        })
    }

    /// The servers this endpoint was given.
    pub fn server(&self) -> &Address {
        &self.shared.server
    }

    /// This endpoint's name in the fleet (a random number chosen at start).
    pub fn endpoint_id(&self) -> String {
        self.shared.me.to_string()
    }

    /// Other endpoints of the fleet known now.
    pub fn endpoints(&self) -> usize {
        crate::endpoint::lock(&self.shared.membership).endpoints()
    }

    fn sender(&self, id: &AgentId) -> Result<Arc<LocalAgent>> {
        self.shared.live()?;
        self.shared
            .local(id)
            .ok_or_else(|| Error::PeerNotFound { peer: id.clone() })
    }

    /// Where `to` is, checking that it listens on `channel`.
    fn target(&self, to: &AgentId, channel: &Channel) -> Result<Target> {
        if let Some(local) = self.shared.local(to) {
            local.listens(&channel.name)?;
            return Ok(Target::Here(local));
        }
        let m = crate::endpoint::lock(&self.shared.membership);
        let (ep, reg) = m
            .lookup(to)
            .ok_or_else(|| Error::PeerNotFound { peer: to.clone() })?;
        if !reg.has_channel(&channel.name) {
            return Err(Error::ChannelNotFound {
                channel: channel.name.clone(),
                agent: to.clone(),
            });
        }
        Ok(Target::There(ep))
    }

    /// The sender, its channel (checked for this payload) and the target.
    fn route(&self, envelope: &Envelope) -> Result<(Arc<LocalAgent>, Channel, Target)> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_outgoing(&envelope.channel, envelope.payload.len())?
            .clone();
        let to = envelope.target().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        let target = self.target(to, &channel)?;
        Ok((sender, channel, target))
    }

    async fn send_as(&self, envelope: Envelope, confirm: bool) -> Result<()> {
        let (sender, channel, target) = self.route(&envelope)?;
        match target {
            Target::Here(to) => {
                self.shared
                    .local_delivery
                    .send(&sender, &to, envelope, &channel, confirm)
                    .await
            }
            Target::There(ep) if channel.reliable => {
                self.shared
                    .send_reliable(&sender, ep, envelope, confirm)
                    .await
            }
            Target::There(ep) => {
                if confirm {
                    return Err(Error::Unsupported {
                        operation: "a confirmed send on an unreliable channel (nothing is acknowledged there)",
                    });
                }
                let len = envelope.payload.len();
                let to = envelope
                    .target()
                    .cloned()
                    .unwrap_or_else(|| envelope.from.clone());
                let frame = Frame::Datagram {
                    to: ep,
                    from: self.shared.me,
                    envelope,
                };
                let bytes = self.shared.encode_checked(&frame, len)?;
                self.shared
                    .publish(self.shared.subjects.agent(&to), bytes)
                    .await;
                sender.stats.sent(len);
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn kind(&self) -> TransportKind {
        Self::KIND
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.shared.attach(agent, inbox).await
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        self.shared.detach(agent).await
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, false).await
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, true).await
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let (sender, _channel, target) = self.route(&envelope)?;
        match target {
            Target::Here(to) => {
                self.shared
                    .local_delivery
                    .request(&sender, &to, envelope, timeout)
                    .await
            }
            Target::There(ep) => self.shared.request(&sender, ep, envelope, timeout).await,
        }
    }

    /// One publication on the fleet's broadcast subject carries the message to every
    /// remote target (each endpoint delivers to the targets it hosts); local targets get
    /// it directly.
    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_broadcast(&envelope.channel, envelope.payload.len())?
            .clone();
        let probe = Frame::Broadcast {
            from: self.shared.me,
            envelope: envelope.clone(),
            targets: Vec::new(),
        };
        self.shared.encode_checked(&probe, envelope.payload.len())?;
        let mut outcomes = Vec::with_capacity(targets.len());
        let mut remote = Vec::new();
        let mut local = Vec::new();
        for to in targets {
            match self.target(to, &channel) {
                Ok(Target::Here(agent)) => local.push(agent),
                Ok(Target::There(ep)) => remote.push((to.clone(), ep)),
                Err(e) => outcomes.push((to.clone(), Err(e))),
            }
        }
        let locals = local.into_iter().map(|to| {
            let mut copy = envelope.clone();
            copy.to = aqe_core::Recipient::Agent(to.reg.id.clone());
            let (sender, channel) = (&sender, &channel);
            async move {
                let r = self
                    .shared
                    .local_delivery
                    .send(sender, &to, copy, channel, false)
                    .await;
                (to.reg.id.clone(), r)
            }
        });
        let (here, there) = futures::join!(
            futures::future::join_all(locals),
            self.shared.broadcast(&sender, &channel, envelope, remote)
        );
        outcomes.extend(here);
        outcomes.extend(there);
        Ok(BroadcastReport::from_outcomes(outcomes))
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let sender = self.sender(&header.from)?;
        let channel = sender
            .reg
            .check_outgoing(&header.options.channel, 0)?
            .clone();
        match self.target(&header.to, &channel)? {
            Target::Here(to) => Ok(Box::new(
                self.shared
                    .local_delivery
                    .open_stream(&sender, &to, header, &channel)
                    .await?,
            )),
            Target::There(ep) => Ok(Box::new(
                NatsSink::open(
                    self.shared.clone(),
                    header,
                    ep,
                    channel.max_message_size,
                    sender.stats.clone(),
                )
                .await?,
            )),
        }
    }

    fn can_reach(&self, agent: &AgentId) -> bool {
        self.shared.live().is_ok()
            && (self.shared.locals.contains_key(agent)
                || crate::endpoint::lock(&self.shared.membership)
                    .lookup(agent)
                    .is_some())
    }

    async fn flush(
        &self,
        from: &AgentId,
        to: &AgentId,
        channel: &aqe_core::ChannelName,
    ) -> Result<()> {
        let key = crate::flows::FlowKey {
            from: from.clone(),
            to: to.clone(),
            channel: channel.clone(),
        };
        self.shared.flush(&key).await
    }

    fn registration(&self, agent: &AgentId) -> Result<Registration> {
        Ok(self.sender(agent)?.reg.clone())
    }

    fn peers(&self) -> Vec<PeerInfo> {
        if self.shared.live().is_err() {
            return Vec::new();
        }
        self.shared.peers()
    }

    fn stats(&self, agent: &AgentId) -> Stats {
        self.shared
            .local(agent)
            .map(|l| l.stats.snapshot())
            .unwrap_or_default()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn set_redelivery(&self, redeliver: Arc<dyn Redeliver>) {
        self.shared.set_redelivery(redeliver);
    }

    async fn shutdown(&self) {
        self.shared.close().await;
    }
}
