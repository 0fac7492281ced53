use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use aqe_core::plumbing::{InboxSender, LocalAgent, LocalAgents, LocalDelivery};
use aqe_core::{
    AgentId, Envelope, Error, Event, PeerInfo, PeerState, Registration, Result, Stats,
    StreamHeader, StreamSink, Transport, TransportKind,
};

/// Tunables of the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How long a reliable send waits for room in a full inbox or stream. Default 5 s.
    pub send_timeout: Duration,
    /// Chunks a stream buffers before the writer waits (reliable) or drops (unreliable).
    /// Default 64.
    pub stream_capacity: usize,
    /// Events buffered per subscriber; a slower subscriber misses the oldest. Default 1024.
    pub event_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            send_timeout: Duration::from_secs(5),
            stream_capacity: 64,
            event_capacity: 1024,
        }
    }
}

/// The in-process event bus. Cloning gives another handle to the same bus.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    members: LocalAgents,
    events: broadcast::Sender<Event>,
    delivery: LocalDelivery,
    closed: AtomicBool,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("members", &self.inner.members.len())
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// How the bus names itself in events and logs.
    pub const KIND: TransportKind = TransportKind::new("event bus");

    /// A bus with the default configuration.
    pub fn new() -> Self {
        Self::with_config(BusConfig::default())
    }

    /// A bus with the given configuration.
    pub fn with_config(config: BusConfig) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let delivery =
            LocalDelivery::new(events.clone(), config.send_timeout, config.stream_capacity);
        Self {
            inner: Arc::new(Inner {
                members: LocalAgents::default(),
                events,
                delivery,
                closed: AtomicBool::new(false),
            }),
        }
    }

    fn live(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    /// The member of that id; the map guard is released before returning.
    fn member(&self, id: &AgentId) -> Result<Arc<LocalAgent>> {
        self.inner
            .members
            .get(id)
            .ok_or_else(|| Error::PeerNotFound { peer: id.clone() })
    }

    fn target_of(envelope: &Envelope) -> Result<AgentId> {
        envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })
    }

    /// Resolves sender, channel and receiver of a unicast operation on `channel`.
    fn route(
        &self,
        from: &AgentId,
        to: &AgentId,
        channel: &aqe_core::ChannelName,
        len: usize,
    ) -> Result<(Arc<LocalAgent>, aqe_core::Channel, Arc<LocalAgent>)> {
        self.live()?;
        let sender = self.member(from)?;
        let ch = sender.reg.check_outgoing(channel, len)?.clone();
        let receiver = self.member(to)?;
        receiver.listens(channel)?;
        Ok((sender, ch, receiver))
    }

    /// Sender, channel and receiver of a unicast envelope.
    fn route_envelope(
        &self,
        envelope: &Envelope,
    ) -> Result<(Arc<LocalAgent>, aqe_core::Channel, Arc<LocalAgent>)> {
        let to = Self::target_of(envelope)?;
        self.route(
            &envelope.from,
            &to,
            &envelope.channel,
            envelope.payload.len(),
        )
    }

    async fn send_as(&self, envelope: Envelope, confirm: bool) -> Result<()> {
        let (sender, channel, receiver) = self.route_envelope(&envelope)?;
        self.inner
            .delivery
            .send(&sender, &receiver, envelope, &channel, confirm)
            .await
    }

    fn publish(&self, event: Event) {
        // No subscriber is not an error: events are for whoever listens.
        let _ = self.inner.events.send(event);
    }
}

#[async_trait]
impl Transport for EventBus {
    fn kind(&self) -> TransportKind {
        Self::KIND
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.live()?;
        agent.validate()?;
        let info = agent.peer_info(None, PeerState::Connected);
        let id = agent.id.clone();
        if !self.inner.members.insert(Arc::new(LocalAgent::new(agent, {
            inbox.tell_drops(self.inner.events.clone());
            inbox
        }))) {
            return Err(Error::Configuration {
                file: None,
                field: "id".to_owned(),
                message: format!("agent {id} is already attached to this bus"),
            });
        }
        tracing::debug!(agent = %info.id, "agent joined the bus");
        self.publish(Event::PeerDiscovered(info));
        Ok(())
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        self.inner
            .members
            .remove(agent)
            .ok_or_else(|| Error::PeerNotFound {
                peer: agent.clone(),
            })?;
        tracing::debug!(agent = %agent, "agent left the bus");
        self.publish(Event::PeerLeft(agent.clone()));
        Ok(())
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, false).await
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, true).await
    }

    async fn send_many(&self, mut envelopes: Vec<Envelope>) -> Result<()> {
        aqe_core::plumbing::check_batch(&envelopes)?;
        let Some(first) = envelopes.first() else {
            return Ok(());
        };
        let (sender, channel, receiver) =
            self.route(&first.from, &Self::target_of(first)?, &first.channel, 0)?;
        // Everything before the first message too large goes; that one fails as its `send`
        // would.
        let refusal = envelopes.iter().enumerate().find_map(|(at, e)| {
            channel
                .check_size(e.payload.len())
                .err()
                .map(|err| (at, err))
        });
        if let Some((at, _)) = &refusal {
            envelopes.truncate(*at);
        }
        let accepted = envelopes.len();
        self.inner
            .delivery
            .send_many(&sender, &receiver, envelopes, &channel)
            .await?;
        match refusal {
            Some((_, err)) => Err(err.after_accepted(accepted)),
            None => Ok(()),
        }
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let (sender, _channel, receiver) = self.route_envelope(&envelope)?;
        self.inner
            .delivery
            .request(&sender, &receiver, envelope, timeout)
            .await
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let (sender, channel, receiver) =
            self.route(&header.from, &header.to, &header.options.channel, 0)?;
        let sink = self
            .inner
            .delivery
            .open_stream(&sender, &receiver, header, &channel)
            .await?;
        Ok(Box::new(sink))
    }

    fn can_reach(&self, agent: &AgentId) -> bool {
        self.inner.members.contains(agent)
    }

    fn registration(&self, agent: &AgentId) -> Result<Registration> {
        self.live()?;
        Ok(self.member(agent)?.reg.clone())
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.inner
            .members
            .all()
            .iter()
            .map(|m| {
                let mut info = m.reg.peer_info(None, PeerState::Connected);
                if let Some(t) = m.stats.snapshot().last_activity {
                    info.last_activity = t.to_system_time();
                }
                info
            })
            .collect()
    }

    fn agents_on(&self, channel: &aqe_core::ChannelName) -> Vec<AgentId> {
        self.inner
            .members
            .all()
            .iter()
            .filter(|m| m.reg.has_channel(channel))
            .map(|m| m.reg.id.clone())
            .collect()
    }

    fn stats(&self, agent: &AgentId) -> Stats {
        self.inner
            .members
            .get(agent)
            .map(|m| m.stats.snapshot())
            .unwrap_or_default()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for id in self.inner.members.clear() {
            self.publish(Event::PeerLeft(id));
        }
    }
}
