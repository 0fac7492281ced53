use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::broadcast;

use aqe_core::{
    AgentId, BroadcastReport, Delivery, Envelope, Error, Event, Inbound, InboxSender, PeerInfo,
    PeerState, Registration, RemoteErrorKind, Result, Stats, StatsRecorder, StreamHeader,
    StreamSink, Transport, TransportKind,
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

struct Member {
    reg: Registration,
    inbox: InboxSender,
    stats: Arc<StatsRecorder>,
}

struct Inner {
    config: BusConfig,
    members: DashMap<AgentId, Arc<Member>>,
    events: broadcast::Sender<Event>,
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
    /// A bus with the default configuration.
    pub fn new() -> Self {
        Self::with_config(BusConfig::default())
    }

    /// A bus with the given configuration.
    pub fn with_config(config: BusConfig) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                config,
                members: DashMap::new(),
                events,
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
    fn member(&self, id: &AgentId) -> Result<Arc<Member>> {
        self.inner
            .members
            .get(id)
            .map(|m| m.value().clone())
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
    ) -> Result<(Arc<Member>, aqe_core::Channel, Arc<Member>)> {
        self.live()?;
        let sender = self.member(from)?;
        let ch = sender.reg.check_outgoing(channel, len)?.clone();
        let receiver = self.member(to)?;
        if !receiver.reg.has_channel(channel) {
            return Err(Error::ChannelNotFound {
                channel: channel.clone(),
                agent: to.clone(),
            });
        }
        Ok((sender, ch, receiver))
    }

    fn delivery(&self, reliable: bool) -> Delivery {
        if reliable {
            Delivery::Reliable(self.inner.config.send_timeout)
        } else {
            Delivery::Unreliable
        }
    }

    async fn deliver(
        &self,
        sender: &Member,
        receiver: &Member,
        envelope: Envelope,
        reliable: bool,
    ) -> Result<()> {
        let len = envelope.payload.len();
        match receiver.inbox.room(self.delivery(reliable)).await? {
            Some(permit) => {
                sender.stats.sent(len);
                receiver.stats.received(len);
                permit.send(Inbound::Message(envelope));
            }
            None => sender.stats.dropped(),
        }
        Ok(())
    }

    fn publish(&self, event: Event) {
        // No subscriber is not an error: events are for whoever listens.
        let _ = self.inner.events.send(event);
    }
}

#[async_trait]
impl Transport for EventBus {
    fn kind(&self) -> TransportKind {
        TransportKind::EventBus
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.live()?;
        agent.validate()?;
        let info = agent.peer_info(None, PeerState::Connected);
        match self.inner.members.entry(agent.id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(Error::Configuration {
                    file: None,
                    field: "id".to_owned(),
                    message: format!("agent {} is already attached to this bus", agent.id),
                });
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Arc::new(Member {
                    reg: agent,
                    inbox,
                    stats: Arc::default(),
                }));
            }
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
        let to = Self::target_of(&envelope)?;
        let (sender, channel, receiver) = self.route(
            &envelope.from,
            &to,
            &envelope.channel,
            envelope.payload.len(),
        )?;
        self.deliver(&sender, &receiver, envelope, channel.reliable)
            .await
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let to = Self::target_of(&envelope)?;
        let (sender, _channel, receiver) = self.route(
            &envelope.from,
            &to,
            &envelope.channel,
            envelope.payload.len(),
        )?;
        let started = Instant::now();
        let len = envelope.payload.len();
        let (responder, answer) =
            aqe_core::local::responder(envelope.from.clone(), receiver.stats.clone());
        let exchange = async {
            // Requests are always reliable: waiting for room counts against the timeout.
            let item = Inbound::Request {
                envelope,
                responder,
            };
            let permit = receiver.inbox.reserve(timeout).await?;
            sender.stats.sent(len);
            receiver.stats.received(len);
            permit.send(item);
            answer.await.map_err(|_| Error::Remote {
                agent: to.clone(),
                kind: RemoteErrorKind::Dropped,
                message: "the request was dropped without an answer".to_owned(),
            })
        };
        let response = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(Error::SendFailed {
                reason: aqe_core::SendFailure::QueueFull(_),
                ..
            }))
            | Err(_) => {
                return Err(Error::Timeout {
                    after: timeout,
                    attempts: 1,
                });
            }
            Ok(Err(e)) => return Err(e),
        };
        sender.stats.received(response.payload.len());
        sender.stats.rtt_sample(started.elapsed());
        Ok(response)
    }

    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        self.live()?;
        let sender = self.member(&envelope.from)?;
        let channel = sender
            .reg
            .check_broadcast(&envelope.channel, envelope.payload.len())?
            .clone();
        let deliveries = targets.iter().map(|to| {
            // Each copy names the peer it is for; its kind still says it was a broadcast.
            let mut envelope = envelope.clone();
            envelope.to = aqe_core::Recipient::Agent(to.clone());
            let sender = sender.clone();
            let channel = &channel;
            async move {
                let outcome = async {
                    let receiver = self.member(to)?;
                    if !receiver.reg.has_channel(&channel.name) {
                        return Err(Error::ChannelNotFound {
                            channel: channel.name.clone(),
                            agent: to.clone(),
                        });
                    }
                    self.deliver(&sender, &receiver, envelope, channel.reliable)
                        .await
                }
                .await;
                (to.clone(), outcome)
            }
        });
        Ok(BroadcastReport::from_outcomes(
            futures::future::join_all(deliveries).await,
        ))
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let (sender, channel, receiver) =
            self.route(&header.from, &header.to, &header.options.channel, 0)?;
        let limits = aqe_core::local::LocalStreamLimits {
            max_chunk: channel.max_message_size,
            capacity: self.inner.config.stream_capacity,
            send_timeout: self.inner.config.send_timeout,
        };
        let (sink, incoming) =
            aqe_core::local::stream(header, limits, sender.stats.clone(), receiver.stats.clone());
        let _ = receiver
            .inbox
            .deliver(
                Inbound::Stream(incoming),
                Delivery::Reliable(self.inner.config.send_timeout),
            )
            .await?;
        Ok(Box::new(sink))
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.inner
            .members
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
        let ids: Vec<AgentId> = self.inner.members.iter().map(|m| m.key().clone()).collect();
        for id in ids {
            if self.inner.members.remove(&id).is_some() {
                self.publish(Event::PeerLeft(id));
            }
        }
    }
}
