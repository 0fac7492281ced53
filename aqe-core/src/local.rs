//! In-process delivery, shared by every transport: the event bus is made of it, and a
//! network transport uses it between agents it hosts side by side. One implementation of
//! "put this in that agent's inbox" means one behaviour for priorities, backpressure,
//! receipts and failure reports, whatever the transport.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::plumbing::{
    AckOnce, AckSink, Delivered, Delivery, InboxPermits, InboxSender, Respond, StatsRecorder,
    StreamSource,
};
use crate::{
    AgentId, Channel, ChannelName, DeliveryFailure, Envelope, Error, Event, Inbound,
    IncomingStream, MessageId, Receipt, Registration, RemoteErrorKind, Responder, Result,
    SendFailure, SlowConsumer, StreamChunk, StreamFailure, StreamHeader, StreamId, StreamSink,
};

/// A full inbox that a sender does not wait for.
fn full(to: &LocalAgent) -> Error {
    Error::SendFailed {
        to: to.reg.id.clone(),
        reason: SendFailure::QueueFull(Duration::ZERO),
    }
}

/// An agent hosted by a transport in this process: what it declared, where its messages go,
/// and its counters.
#[derive(Debug)]
pub struct LocalAgent {
    /// What it declared when it attached.
    pub reg: Registration,
    /// Its inbox.
    pub inbox: InboxSender,
    /// Its counters on this transport.
    pub stats: Arc<StatsRecorder>,
}

/// The agents a transport hosts, by id: read on every delivery, written on attach and
/// detach. One table for every transport (the bus, and every wire's host).
#[derive(Debug, Default)]
pub struct LocalAgents {
    agents: std::sync::RwLock<crate::plumbing::FastMap<AgentId, Arc<LocalAgent>>>,
}

impl LocalAgents {
    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, crate::plumbing::FastMap<AgentId, Arc<LocalAgent>>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, crate::plumbing::FastMap<AgentId, Arc<LocalAgent>>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent `id`, if hosted.
    pub fn get(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.read().get(id).cloned()
    }

    /// Whether `id` is hosted.
    pub fn contains(&self, id: &AgentId) -> bool {
        self.read().contains_key(id)
    }

    /// Whether `id` is hosted and listens on `channel`.
    pub fn admits(&self, id: &AgentId, channel: &crate::ChannelName) -> bool {
        self.read()
            .get(id)
            .is_some_and(|a| a.reg.has_channel(channel))
    }

    /// Hosts `agent` unless its id is taken; `false` when it is.
    pub fn insert(&self, agent: Arc<LocalAgent>) -> bool {
        match self.write().entry(agent.reg.id.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(agent);
                true
            }
        }
    }

    /// Stops hosting `id`.
    pub fn remove(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.write().remove(id)
    }

    /// Every hosted agent, by id.
    pub fn all(&self) -> Vec<Arc<LocalAgent>> {
        let mut v: Vec<Arc<LocalAgent>> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.reg.id.cmp(&b.reg.id));
        v
    }

    /// Stops hosting every agent; their ids, by id.
    pub fn clear(&self) -> Vec<AgentId> {
        let mut ids: Vec<AgentId> = self.write().drain().map(|(k, _)| k).collect();
        ids.sort();
        ids
    }

    /// How many are hosted.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

impl LocalAgent {
    /// A freshly attached agent with zeroed counters; its inbox applies its channels'
    /// slow-consumer policies.
    pub fn new(reg: Registration, inbox: InboxSender) -> Self {
        inbox.set_slow_consumers(&reg.channels);
        Self {
            reg,
            inbox,
            stats: Arc::default(),
        }
    }

    /// Checks that this agent, as a receiver, listens on `channel`.
    ///
    /// # Errors
    /// [`Error::ChannelNotFound`] naming this agent.
    pub fn listens(&self, channel: &ChannelName) -> Result<()> {
        if self.reg.has_channel(channel) {
            Ok(())
        } else {
            Err(Error::ChannelNotFound {
                channel: channel.clone(),
                agent: self.reg.id.clone(),
            })
        }
    }
}

/// Delivers between agents of one process, reporting failures on a transport's event channel.
#[derive(Debug, Clone)]
pub struct LocalDelivery {
    events: broadcast::Sender<Event>,
    send_timeout: Duration,
    stream_capacity: usize,
}

impl LocalDelivery {
    /// Deliveries that wait up to `send_timeout` for room and report on `events`; streams
    /// buffer `stream_capacity` chunks.
    pub fn new(
        events: broadcast::Sender<Event>,
        send_timeout: Duration,
        stream_capacity: usize,
    ) -> Self {
        Self {
            events,
            send_timeout,
            stream_capacity: stream_capacity.max(1),
        }
    }

    /// Puts a one-way message in `to`'s inbox as `channel`'s contract says: a reliable one
    /// waits for room (up to the send timeout) and carries a receipt; an unreliable one is
    /// dropped and counted when the inbox is full. With `confirm`, resolves once `to` has
    /// taken the message.
    ///
    /// # Errors
    /// [`Error::SendFailed`] (receiver full for the whole send timeout, or gone),
    /// [`Error::DeliveryFailed`] (confirmed: the receiver stopped before taking it),
    /// [`Error::Unsupported`] for a confirmed send on an unreliable channel.
    pub async fn send(
        &self,
        from: &LocalAgent,
        to: &LocalAgent,
        envelope: Envelope,
        channel: &Channel,
        confirm: bool,
    ) -> Result<()> {
        let len = envelope.payload.len();
        if !channel.reliable {
            if confirm {
                return Err(unconfirmable());
            }
            match to.inbox.try_reserve()? {
                Some(permit) => {
                    let _ =
                        permit.send_counted(Inbound::message(envelope), || to.stats.received(len));
                    from.stats.sent(len);
                }
                None => from.stats.dropped(),
            }
            return Ok(());
        }
        let policy = Self::slow_consumer(channel, to);
        let permit = match policy {
            // A full inbox decides by its policy; a sender that does not wait fails at once.
            Some(receiver) => match to.inbox.try_reserve()? {
                Some(permit) => Some(permit),
                None if receiver != SlowConsumer::Block => None,
                None => return Err(full(to)),
            },
            None => Some(to.inbox.reserve(self.send_timeout).await?),
        };
        let acks = self.acks(from, to, &envelope.channel);
        let (receipt, confirmed) = if confirm {
            let (tx, rx) = oneshot::channel();
            let ack = LocalAck {
                acks,
                id: envelope.id,
                done: tx,
            };
            (Receipt::once(ack), Some(rx))
        } else {
            (Receipt::shared(acks, envelope.id.0), None)
        };
        from.stats.accepted(1);
        let item = Inbound::Message { envelope, receipt };
        let count = || to.stats.received(len);
        let outcome = match permit {
            Some(permit) => permit.send_counted(item, count),
            None => match to.inbox.deliver_now(item, count) {
                Ok(outcome) => outcome,
                Err((e, item)) => {
                    if let Inbound::Message { receipt, .. } = item {
                        receipt.abandon();
                    }
                    return Err(e);
                }
            },
        };
        if outcome == Delivered::Queued {
            from.stats.sent(len);
        }
        match confirmed {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(Error::DeliveryFailed {
                to: to.reg.id.clone(),
                reason: DeliveryFailure::ReceiverStopped,
            })),
        }
    }

    /// Puts one-way messages from `from` to `to` on `channel` in `to`'s inbox, in order, as
    /// that many [`LocalDelivery::send`]s would, but a batch at a time: room for as many as
    /// there is room for is taken at once, they go in under one lock with one wake-up of the
    /// agent, share one receipt sink and are counted once. Only when the inbox is full does
    /// a reliable batch wait (up to the send timeout) for room for the next one.
    ///
    /// # Errors
    /// As [`LocalDelivery::send`] when none was accepted; [`Error::PartlyAccepted`] when
    /// some were.
    pub async fn send_many(
        &self,
        from: &LocalAgent,
        to: &LocalAgent,
        envelopes: Vec<Envelope>,
        channel: &Channel,
    ) -> Result<()> {
        let Some(channel_name) = envelopes.first().map(|e| e.channel.clone()) else {
            return Ok(());
        };
        let total = envelopes.len();
        let mut rest = envelopes.into_iter();
        if !channel.reliable {
            let queued = match to.inbox.try_reserve_many(total)? {
                Some(permits) => {
                    let batch = rest.by_ref().take(permits.len()).map(Inbound::message);
                    let mut sent = (0, 0);
                    permits.send_many(batch, |n, bytes| {
                        to.stats.received_many(n, bytes);
                        sent = (n, bytes);
                    });
                    from.stats.sent_many(sent.0, sent.1);
                    sent.0 as usize
                }
                None => 0,
            };
            from.stats.dropped_many((total - queued) as u64);
            return Ok(());
        }
        let acks = self.acks(from, to, &channel_name);
        let policy = Self::slow_consumer(channel, to);
        let mut accepted = 0;
        while accepted < total {
            let permits = match to.inbox.try_reserve_many(total - accepted) {
                Ok(Some(permits)) => permits,
                // A full inbox that drops takes the rest at once, by its policy.
                Ok(None) if policy.is_some_and(|r| r != SlowConsumer::Block) => {
                    let batch: Vec<Inbound> = rest
                        .map(|envelope| Inbound::Message {
                            receipt: Receipt::shared(acks.clone(), envelope.id.0),
                            envelope,
                        })
                        .collect();
                    from.stats.accepted(batch.len() as u64);
                    let mut sent = (0, 0);
                    return match to.inbox.deliver_now_many(batch, |n, bytes| {
                        to.stats.received_many(n, bytes);
                        sent = (n, bytes);
                    }) {
                        Ok(_) => {
                            from.stats.sent_many(sent.0, sent.1);
                            Ok(())
                        }
                        Err((e, items)) => {
                            for item in items {
                                if let Inbound::Message { receipt, .. } = item {
                                    receipt.abandon();
                                }
                            }
                            Err(e.after_accepted(accepted))
                        }
                    };
                }
                Ok(None) if policy.is_some() => return Err(full(to).after_accepted(accepted)),
                Ok(None) => match to.inbox.reserve(self.send_timeout).await {
                    Ok(one) => InboxPermits::from(one),
                    Err(e) => return Err(e.after_accepted(accepted)),
                },
                Err(e) => return Err(e.after_accepted(accepted)),
            };
            let k = permits.len();
            // Each message goes from the batch straight into the inbox (no list between).
            let batch = rest.by_ref().take(k).map(|envelope| Inbound::Message {
                receipt: Receipt::shared(acks.clone(), envelope.id.0),
                envelope,
            });
            from.stats.accepted(k as u64);
            let mut sent = (0, 0);
            permits.send_many(batch, |n, bytes| {
                to.stats.received_many(n, bytes);
                sent = (n, bytes);
            });
            from.stats.sent_many(sent.0, sent.1);
            accepted += k;
        }
        Ok(())
    }

    /// Whether a reliable send to `to` on `channel` must not wait for room: `None` when
    /// both sides block (it waits up to the send timeout); else the receiving inbox's
    /// policy (`block` there: the send fails at once, for the sender's channel does not
    /// wait).
    fn slow_consumer(channel: &Channel, to: &LocalAgent) -> Option<SlowConsumer> {
        let receiver = to.inbox.slow_consumer(&channel.name);
        (channel.slow_consumer != SlowConsumer::Block || receiver != SlowConsumer::Block)
            .then_some(receiver)
    }

    /// The receipt sink of messages from `from` to `to` on `channel`.
    fn acks(&self, from: &LocalAgent, to: &LocalAgent, channel: &ChannelName) -> Arc<LocalAcks> {
        Arc::new(LocalAcks {
            from: from.reg.id.clone(),
            to: to.reg.id.clone(),
            channel: channel.clone(),
            stats: from.stats.clone(),
            events: self.events.clone(),
        })
    }

    /// Puts a request in `to`'s inbox and waits for the answer, all within `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] (no room, or no answer, in time); [`Error::Remote`] with
    /// [`RemoteErrorKind::Dropped`] when the receiver dropped the request unanswered.
    pub async fn request(
        &self,
        from: &LocalAgent,
        to: &LocalAgent,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let len = envelope.payload.len();
        let started = Instant::now();
        let (responder, answer) = responder(envelope.from.clone(), to.stats.clone());
        let exchange = async {
            let permit = to.inbox.reserve(timeout).await?;
            let _ = permit.send_counted(
                Inbound::Request {
                    envelope,
                    responder,
                },
                || to.stats.received(len),
            );
            from.stats.sent(len);
            answer.await.map_err(|_| Error::Remote {
                agent: to.reg.id.clone(),
                kind: RemoteErrorKind::Dropped,
                message: "the request was dropped without an answer".to_owned(),
            })
        };
        let response = match tokio::time::timeout(timeout, exchange).await {
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
        };
        from.stats.received(response.payload.len());
        from.stats.rtt_sample(started.elapsed());
        Ok(response)
    }

    /// Opens a stream from `from` to `to` on `channel`; the receiver gets it in its inbox.
    ///
    /// # Errors
    /// [`Error::SendFailed`] when `to`'s inbox stays full for the send timeout, or is gone.
    pub async fn open_stream(
        &self,
        from: &LocalAgent,
        to: &LocalAgent,
        header: StreamHeader,
        channel: &Channel,
    ) -> Result<LocalSink> {
        let limits = LocalStreamLimits {
            max_chunk: channel.max_message_size,
            capacity: self.stream_capacity,
            send_timeout: self.send_timeout,
        };
        let (sink, incoming) = stream(header, limits, from.stats.clone(), to.stats.clone());
        let _ = to
            .inbox
            .deliver(
                Inbound::Stream(incoming),
                Delivery::Reliable(self.send_timeout),
            )
            .await?;
        Ok(sink)
    }
}

fn unconfirmable() -> Error {
    Error::Unsupported {
        operation: "a confirmed send on an unreliable channel (nothing is acknowledged there)",
    }
}

/// Where the receipts of reliable in-process messages from one sender to one receiver on
/// one channel go (tokens are message ids): one allocation per send or batch.
struct LocalAcks {
    from: AgentId,
    to: AgentId,
    channel: ChannelName,
    stats: Arc<StatsRecorder>,
    events: broadcast::Sender<Event>,
}

impl LocalAcks {
    /// Counts message `id` failed for `reason` and says so on the events.
    fn fail(&self, id: MessageId, reason: DeliveryFailure) -> DeliveryFailure {
        self.stats.failed(1);
        tracing::debug!(from = %self.from, to = %self.to, %id, %reason, "message not taken");
        let _ = self.events.send(Event::DeliveryFailed {
            from: self.from.clone(),
            to: self.to.clone(),
            channel: self.channel.clone(),
            ids: vec![id],
            reason,
        });
        reason
    }
}

impl AckSink for LocalAcks {
    fn acknowledged(&self, _id: u64) {
        self.stats.confirmed(1);
    }

    fn abandoned(&self, id: u64) {
        self.fail(MessageId(id), DeliveryFailure::ReceiverStopped);
    }

    fn expired(&self, id: u64) {
        self.fail(MessageId(id), DeliveryFailure::Expired);
    }

    fn dropped(&self, id: u64) {
        self.fail(MessageId(id), DeliveryFailure::Dropped);
    }
}

/// The receipt of one confirmed in-process message: its sender waits on `done`.
struct LocalAck {
    acks: Arc<LocalAcks>,
    id: MessageId,
    done: oneshot::Sender<Result<()>>,
}

impl AckOnce for LocalAck {
    fn acknowledged(self: Box<Self>) {
        self.acks.acknowledged(self.id.0);
        let _ = self.done.send(Ok(()));
    }

    fn abandoned(self: Box<Self>) {
        (*self).failed(DeliveryFailure::ReceiverStopped);
    }

    fn expired(self: Box<Self>) {
        (*self).failed(DeliveryFailure::Expired);
    }

    fn dropped(self: Box<Self>) {
        (*self).failed(DeliveryFailure::Dropped);
    }
}

impl LocalAck {
    fn failed(self, reason: DeliveryFailure) {
        let reason = self.acks.fail(self.id, reason);
        let _ = self.done.send(Err(Error::DeliveryFailed {
            to: self.acks.to.clone(),
            reason,
        }));
    }
}

/// A responder that hands the answer to a waiting requester in the same process, and the
/// requester's end. `responder_stats` counts the answer as sent.
pub fn responder(
    requester: AgentId,
    responder_stats: Arc<StatsRecorder>,
) -> (Responder, oneshot::Receiver<Envelope>) {
    let (reply, answer) = oneshot::channel();
    (
        Responder::new(LocalResponder {
            reply,
            stats: responder_stats,
            requester,
        }),
        answer,
    )
}

struct LocalResponder {
    reply: oneshot::Sender<Envelope>,
    stats: Arc<StatsRecorder>,
    requester: AgentId,
}

#[async_trait]
impl Respond for LocalResponder {
    async fn respond(self: Box<Self>, response: Envelope) -> Result<()> {
        let len = response.payload.len();
        self.reply.send(response).map_err(|_| Error::SendFailed {
            to: self.requester.clone(),
            reason: SendFailure::ReceiverClosed,
        })?;
        self.stats.sent(len);
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.reply.closed().await
    }
}

/// Limits of an in-process stream.
#[derive(Debug, Clone, Copy)]
pub struct LocalStreamLimits {
    /// Largest chunk, in bytes (the channel's message size).
    pub max_chunk: usize,
    /// Chunks buffered before the writer waits (reliable) or drops (unreliable).
    pub capacity: usize,
    /// How long a reliable write waits for room.
    pub send_timeout: Duration,
}

/// Makes both ends of an in-process stream and counts it as active on both agents.
pub fn stream(
    header: StreamHeader,
    limits: LocalStreamLimits,
    writer: Arc<StatsRecorder>,
    reader: Arc<StatsRecorder>,
) -> (LocalSink, IncomingStream) {
    let (tx, rx) = mpsc::channel(limits.capacity.max(1));
    writer.stream_delta(true);
    reader.stream_delta(true);
    let sink = LocalSink {
        id: header.id,
        tx: Some(tx),
        reliable: header.options.reliable,
        limits,
        writer,
        reader_id: header.to.clone(),
    };
    (
        sink,
        IncomingStream::new(
            header,
            LocalSource {
                rx,
                reader,
                open: true,
            },
        ),
    )
}

/// The writing end of an in-process stream.
pub struct LocalSink {
    id: StreamId,
    /// `None` once finished.
    tx: Option<mpsc::Sender<StreamChunk>>,
    reliable: bool,
    limits: LocalStreamLimits,
    writer: Arc<StatsRecorder>,
    reader_id: AgentId,
}

impl LocalSink {
    fn finish(&mut self) {
        if self.tx.take().is_some() {
            self.writer.stream_delta(false);
        }
    }
}

#[async_trait]
impl StreamSink for LocalSink {
    async fn write(&mut self, mut data: Bytes, fin: bool) -> Result<()> {
        // At once while there is room: no timer, and no spending of the task's budget.
        if !fin {
            match self.try_write(data) {
                Ok(res) => return res,
                Err(back) => data = back,
            }
        }
        let id = self.id;
        let failed = move |reason| Error::Stream { stream: id, reason };
        let Some(tx) = &self.tx else {
            return Err(failed(StreamFailure::Finished));
        };
        if data.len() > self.limits.max_chunk {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: self.limits.max_chunk,
            });
        }
        let len = data.len();
        let chunk = StreamChunk { data, fin };
        // The final mark is always delivered reliably, or the reader could never tell the
        // end from a stall.
        if self.reliable || fin {
            match tx.send_timeout(chunk, self.limits.send_timeout).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                    self.finish();
                    return Err(failed(StreamFailure::ClosedByPeer));
                }
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    return Err(Error::SendFailed {
                        to: self.reader_id.clone(),
                        reason: SendFailure::QueueFull(self.limits.send_timeout),
                    });
                }
            }
        } else {
            match tx.try_send(chunk) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.writer.dropped();
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.finish();
                    return Err(failed(StreamFailure::ClosedByPeer));
                }
            }
        }
        self.writer.sent(len);
        if fin {
            self.finish();
        }
        Ok(())
    }

    fn try_write(&mut self, data: Bytes) -> std::result::Result<Result<()>, Bytes> {
        let Some(tx) = &self.tx else {
            return Err(data);
        };
        if data.len() > self.limits.max_chunk {
            return Err(data);
        }
        let len = data.len();
        match tx.try_send(StreamChunk { data, fin: false }) {
            Ok(()) => {
                self.writer.sent(len);
                Ok(Ok(()))
            }
            Err(mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c)) => {
                Err(c.data)
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.tx.is_some() {
            self.write(Bytes::new(), true).await
        } else {
            Ok(())
        }
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        // Dropping the sender without a final chunk ends the reader with an error.
        self.finish();
    }
}

struct LocalSource {
    rx: mpsc::Receiver<StreamChunk>,
    reader: Arc<StatsRecorder>,
    open: bool,
}

impl LocalSource {
    fn end(&mut self) {
        if std::mem::take(&mut self.open) {
            self.reader.stream_delta(false);
        }
    }

    /// Counts what `next` returns.
    fn took(&mut self, chunk: Option<StreamChunk>) -> Option<Result<StreamChunk>> {
        match &chunk {
            Some(c) => {
                self.reader.received(c.data.len());
                if c.fin {
                    self.end();
                }
            }
            None => self.end(),
        }
        chunk.map(Ok)
    }
}

#[async_trait]
impl StreamSource for LocalSource {
    fn try_next(&mut self) -> Option<Result<StreamChunk>> {
        let chunk = self.rx.try_recv().ok()?;
        self.took(Some(chunk))
    }

    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        let chunk = self.rx.recv().await;
        self.took(chunk)
    }
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.end();
    }
}
