//! The transport trait and what travels through it.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::broadcast;

use crate::plumbing::InboxSender;
use crate::{
    Address, AgentId, ChannelName, DeliveryFailure, Envelope, Error, MessageId, MessageKind,
    PeerInfo, Receipt, Registration, Result, Stats, StreamId, StreamOptions, TransportKind,
};

/// Something that happened in the fleet or on a transport.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An agent became reachable (it started, or its endpoint connected).
    PeerDiscovered(PeerInfo),
    /// An agent is gone (it stopped, or its endpoint disconnected).
    PeerLeft(AgentId),
    /// A connection to another endpoint is up.
    ConnectionEstablished {
        /// The remote endpoint.
        addr: Address,
    },
    /// A connection to another endpoint ended.
    ConnectionLost {
        /// The remote endpoint.
        addr: Address,
        /// Why.
        reason: String,
    },
    /// A message reached the agent.
    MessageReceived {
        /// Its id.
        id: crate::MessageId,
        /// Its sender.
        from: AgentId,
        /// Its channel.
        channel: ChannelName,
        /// Its kind.
        kind: MessageKind,
        /// Payload size in bytes.
        size: usize,
    },
    /// A peer opened a stream to the agent.
    StreamOpened {
        /// The stream.
        stream: StreamId,
        /// The opener.
        from: AgentId,
    },
    /// A stream to the agent ended.
    StreamClosed {
        /// The stream.
        stream: StreamId,
        /// The opener.
        from: AgentId,
    },
    /// A connection attempt from or to another endpoint failed a security check (untrusted
    /// certificate, wrong or missing token). The side that dialed also gets the error from
    /// its call; this event is how the accepting side learns of it.
    SecurityRejected {
        /// The remote endpoint.
        addr: Address,
        /// Which check failed.
        kind: crate::SecurityFailure,
    },
    /// An endpoint announced an agent id that another endpoint (or this one) hosts already.
    /// The first keeps it; the claim is refused, never silently preferred.
    AgentConflict {
        /// The contested id.
        agent: AgentId,
        /// Where the endpoint that claimed it listens.
        claimed_by: Address,
    },
    /// A transport reported an error not tied to one call.
    TransportError {
        /// Which transport.
        transport: TransportKind,
        /// What happened.
        message: String,
    },
    /// Reliable messages that were accepted for delivery (their send returned `Ok`) did not
    /// reach their receiver, and will not: the reason says whether they may have been
    /// processed. Every accepted message ends either taken by its receiving agent or here.
    DeliveryFailed {
        /// The sending agent.
        from: AgentId,
        /// The receiving agent.
        to: AgentId,
        /// The channel they were sent on.
        channel: ChannelName,
        /// The messages, in send order.
        ids: Vec<MessageId>,
        /// Why.
        reason: DeliveryFailure,
    },
    /// An operation failed on one transport of a fallback chain and was carried by a later
    /// one.
    FallbackUsed {
        /// The operation (`send`, `request`, `broadcast`, `open_stream`, `redeliver`).
        operation: &'static str,
        /// The peer concerned, if one.
        peer: Option<AgentId>,
        /// The transport that carried it.
        via: TransportKind,
        /// The error of the transport before it.
        reason: String,
    },
    /// A transport was put in front of the agent's own at run time (QUIC enabled): the
    /// agent's operations try it first from now on.
    TransportEnabled {
        /// The transport added.
        kind: TransportKind,
    },
    /// A transport enabled at run time was taken away again, once what the agent had sent
    /// over it was settled: operations go through the agent's own transport from now on.
    TransportDisabled {
        /// The transport removed.
        kind: TransportKind,
    },
    /// A hosted agent does not keep up: its inbox was full and its channel's slow-consumer
    /// policy dropped messages unread (their senders hear `DeliveryFailed(Dropped)`).
    SlowConsumer {
        /// The agent.
        agent: AgentId,
        /// The channel whose messages were dropped.
        channel: ChannelName,
        /// How many were dropped just now.
        dropped: u64,
        /// How many its inbox has dropped in all.
        total: u64,
        /// Items waiting in its inbox.
        waiting: usize,
    },
    /// This subscriber was too slow and missed that many events.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// Checks that a batch for [`Transport::send_many`] has one sender, one recipient and one
/// channel.
///
/// # Errors
/// [`Error::Unsupported`] when it does not.
pub fn check_batch(envelopes: &[Envelope]) -> Result<()> {
    let Some(first) = envelopes.first() else {
        return Ok(());
    };
    let to = first.target();
    if to.is_none()
        || envelopes
            .iter()
            .any(|e| e.from != first.from || e.channel != first.channel || e.target() != to)
    {
        return Err(Error::Unsupported {
            operation: "a batch with more than one sender, recipient or channel",
        });
    }
    Ok(())
}

/// What a fleet broadcast achieved, peer by peer.
#[derive(Debug)]
pub struct BroadcastReport {
    /// The message's id: every target's copy carries it, and [`Event::DeliveryFailed`] names
    /// it for each target whose copy failed later (a broadcast not confirmed resolves
    /// before its copies settle).
    pub id: MessageId,
    /// Peers that got the message.
    pub delivered: Vec<AgentId>,
    /// Peers that did not, and why.
    pub failed: Vec<(AgentId, Error)>,
}

impl BroadcastReport {
    /// Sorts per-peer outcomes of the message `id` into delivered and failed.
    pub fn from_outcomes(
        id: MessageId,
        outcomes: impl IntoIterator<Item = (AgentId, Result<()>)>,
    ) -> Self {
        let mut report = Self {
            id,
            delivered: Vec::new(),
            failed: Vec::new(),
        };
        for (peer, outcome) in outcomes {
            match outcome {
                Ok(()) => report.delivered.push(peer),
                Err(e) => report.failed.push((peer, e)),
            }
        }
        report
    }

    /// Whether every targeted peer got the message.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// How a transport sends back the answer to one request.
#[async_trait]
pub trait Respond: Send {
    /// Sends the response (a [`MessageKind::Response`] or [`MessageKind::Error`] envelope).
    ///
    /// # Errors
    /// When the requester is gone (it timed out or was dropped): the late answer is discarded.
    async fn respond(self: Box<Self>, response: Envelope) -> Result<()>;

    /// Resolves when the requester has given up, so the handler's work can be cancelled.
    /// A transport that cannot tell never resolves.
    async fn cancelled(&mut self);
}

/// The answering half of a request, handed to the receiving agent with it.
pub struct Responder(Box<dyn Respond>);

impl Responder {
    /// Wraps a transport's implementation.
    pub fn new(inner: impl Respond + 'static) -> Self {
        Self(Box::new(inner))
    }

    /// Sends the response.
    ///
    /// # Errors
    /// When the requester is gone: the answer is discarded.
    pub async fn respond(self, response: Envelope) -> Result<()> {
        self.0.respond(response).await
    }

    /// Resolves when the requester has given up.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn cancelled(&mut self) {
        self.0.cancelled().await
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Responder(..)")
    }
}

/// What identifies a stream and how its data travels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamHeader {
    /// Unique per opener.
    pub id: StreamId,
    /// The opener.
    pub from: AgentId,
    /// The receiver.
    pub to: AgentId,
    /// Channel, priority, order, reliability.
    pub options: StreamOptions,
}

/// One piece of stream data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// The bytes written.
    pub data: Bytes,
    /// Whether the writer marked this as the last piece.
    pub fin: bool,
}

/// The writing side of a stream.
#[async_trait]
pub trait StreamSink: Send + Sync {
    /// Writes one chunk; `fin` ends the stream after it. Returns once the chunk is queued
    /// (queues are bounded: a write waits for room up to the send timeout, then
    /// fails with nothing of it queued); a failure of data already queued is reported by the
    /// next write or the close. A final write returns once everything is handed to the wire.
    ///
    /// # Errors
    /// [`Error::Stream`] when the stream is finished or the receiver is gone;
    /// [`Error::MessageTooLarge`] for a chunk above the channel's limit.
    async fn write(&mut self, data: Bytes, fin: bool) -> Result<()>;

    /// Writes a chunk that is not the last without waiting, when [`StreamSink::write`] would
    /// complete at once; otherwise hands `data` back, and the caller writes it with `write`.
    /// Saves a boxed future per chunk; the default never takes the chunk.
    fn try_write(&mut self, data: Bytes) -> std::result::Result<Result<()>, Bytes> {
        Err(data)
    }

    /// Ends the stream (as an empty final write, if none was made).
    ///
    /// # Errors
    /// When the end cannot be signalled to the receiver.
    async fn close(&mut self) -> Result<()>;
}

/// The reading side of a stream, as a transport provides it.
#[async_trait]
pub trait StreamSource: Send {
    /// The next chunk; `None` after the final one, or when the stream broke.
    async fn next(&mut self) -> Option<Result<StreamChunk>>;

    /// The next chunk if it is already here (`Some`, as [`StreamSource::next`] would return
    /// it); `None` when `next` must wait or end the stream. Saves a boxed future per chunk;
    /// the default never has one.
    fn try_next(&mut self) -> Option<Result<StreamChunk>> {
        None
    }
}

/// A stream opened by a peer, in order: this value is the open, then chunks, then the end.
pub struct IncomingStream {
    header: StreamHeader,
    source: Box<dyn StreamSource>,
    finished: bool,
}

impl IncomingStream {
    /// Wraps a transport's reading side.
    pub fn new(header: StreamHeader, source: impl StreamSource + 'static) -> Self {
        Self {
            header,
            source: Box::new(source),
            finished: false,
        }
    }

    /// Who opened it, to whom, and how.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The next chunk, in write order; `None` once the final chunk has been returned.
    ///
    /// # Errors
    /// [`Error::Stream`] with [`StreamFailure::Cancelled`](crate::StreamFailure::Cancelled)
    /// when the writer gave up before the final chunk; [`Error::ConnectionLost`] when the
    /// connection carrying it went away.
    pub async fn next(&mut self) -> Option<Result<StreamChunk>> {
        if self.finished {
            return None;
        }
        let item = match self.source.try_next() {
            Some(item) => Some(item),
            None => self.source.next().await,
        };
        match &item {
            Some(Ok(chunk)) if !chunk.fin => {}
            Some(Ok(_)) | Some(Err(_)) => self.finished = true,
            None => {
                // The source ended without the final mark: the writer gave up.
                self.finished = true;
                return Some(Err(Error::Stream {
                    stream: self.header.id,
                    reason: crate::StreamFailure::Cancelled,
                }));
            }
        }
        item
    }
}

impl fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingStream")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// What a transport puts in an agent's inbox.
#[derive(Debug)]
pub enum Inbound {
    /// A one-way message (direct or broadcast).
    Message {
        /// The message.
        envelope: Envelope,
        /// Acknowledges it when dropped: the sender then counts it delivered.
        receipt: Receipt,
    },
    /// A request, with the means to answer it.
    Request {
        /// The request.
        envelope: Envelope,
        /// Answers it.
        responder: Responder,
    },
    /// A stream a peer opened.
    Stream(IncomingStream),
}

impl Inbound {
    /// A message nobody needs a receipt for (unreliable, or made up locally).
    pub fn message(envelope: Envelope) -> Self {
        Inbound::Message {
            envelope,
            receipt: Receipt::none(),
        }
    }
}

/// Where a transport hands reliable messages it accepted but could not deliver (the
/// connection to the receiver ended before they were acknowledged), to try another way
/// before reporting them failed. [`Fallback`](../aqe_agent/struct.Fallback.html)-style
/// combinations register one on their primary with [`Transport::set_redelivery`].
#[async_trait]
pub trait Redeliver: Send + Sync {
    /// Delivers `envelope` another way and resolves once its receiver has taken it.
    ///
    /// # Errors
    /// When the other way cannot reach the receiver either: the transport keeps the message
    /// and goes on trying until its delivery deadline.
    async fn redeliver(&self, envelope: Envelope) -> Result<()>;
}

/// What the agent runtime needs from anything that moves messages.
///
/// A transport is an *endpoint* hosting any number of local agents. Agents attach with a
/// [`Registration`] and an [`InboxSender`]; the transport then delivers what arrives for
/// them into their inbox and carries what they send. Peers are agents, wherever they live:
/// on the same endpoint, on the same bus, or behind a connection to another endpoint (one
/// connection per endpoint pair carries the traffic of every agent on both sides).
///
/// The four ways of moving data map onto QUIC directly (see `aqe-quic` and PROTOCOL.md):
/// - [`Transport::send`] on an ordered reliable channel: one long-lived stream per connection
///   and channel; unordered reliable: a stream per message; unreliable: a datagram.
/// - [`Transport::request`]: correlated request and response (over QUIC, on a long-lived
///   request stream, or a stream of its own when large); timing out or dropping the future
///   abandons the request, and the responder learns of it.
/// - [`Transport::open_stream`]: one stream, with flow control.
/// - [`Transport::broadcast`]: concurrent fan-out with a per-peer report.
///
/// **Delivery accounting.** On a reliable channel, `Ok` from [`Transport::send`] means the
/// message was accepted for delivery; it then ends in exactly one of two ways: taken by the
/// receiving agent (its [`Receipt`] acknowledged), or reported in [`Event::DeliveryFailed`]
/// and counted in `Stats::messages_failed`. [`Transport::send_confirmed`] waits for the first.
///
/// Every method validates what it is given: an unknown sender, channel or peer, or an
/// oversize payload, is a typed error and nothing is sent.
///
/// Implementations are endpoints shared by many agents, so every method takes `&self` and
/// may be called concurrently.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Which kind of transport this is.
    fn kind(&self) -> TransportKind;

    /// Hosts an agent: from now on, what arrives for it goes to `inbox`, and peers learn of it.
    ///
    /// # Errors
    /// [`Error::Configuration`] if the registration is invalid or the id is already attached
    /// here; [`Error::Shutdown`] after shutdown.
    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()>;

    /// Stops hosting an agent; peers learn it left.
    ///
    /// # Errors
    /// [`Error::PeerNotFound`] if it was not attached.
    async fn detach(&self, agent: &AgentId) -> Result<()>;

    /// Sends a one-way message to the one agent named in `envelope.to`, on the sender's
    /// channel `envelope.channel`, honouring the channel's contract.
    ///
    /// # Errors
    /// [`Error::PeerNotFound`], [`Error::ChannelNotFound`] (sender or receiver lacks the
    /// channel), [`Error::MessageTooLarge`], [`Error::SendFailed`], connection errors.
    async fn send(&self, envelope: Envelope) -> Result<()>;

    /// Sends `envelopes`, in order, as that many [`Transport::send`]s would, but handed over
    /// together: a transport admits as many as its window has room for at once, encodes
    /// them into one write and counts them once. Messages of a batch have one sender, one
    /// recipient and one channel.
    ///
    /// # Errors
    /// As [`Transport::send`] when none was accepted; [`Error::PartlyAccepted`] when some
    /// were: the first ones, as many as it says.
    async fn send_many(&self, envelopes: Vec<Envelope>) -> Result<()> {
        check_batch(&envelopes)?;
        for (accepted, envelope) in envelopes.into_iter().enumerate() {
            self.send(envelope)
                .await
                .map_err(|e| e.after_accepted(accepted))?;
        }
        Ok(())
    }

    /// Sends a one-way message as [`Transport::send`] does, and resolves once the receiving
    /// agent has taken it (its message handler returned).
    ///
    /// # Errors
    /// As [`Transport::send`]; [`Error::DeliveryFailed`] when the message was accepted but
    /// not delivered; [`Error::Unsupported`] on an unreliable channel, where nothing is
    /// acknowledged.
    async fn send_confirmed(&self, envelope: Envelope) -> Result<()>;

    /// As [`Transport::send_confirmed`], for a message another transport accepted and could
    /// not deliver (see [`Redeliver`]): a failure is returned but neither announced nor
    /// counted here, since the transport that hands the message over reports it, once. The
    /// provided implementation calls `send_confirmed`, which announces: transports that
    /// take messages handed over override it.
    ///
    /// # Errors
    /// As [`Transport::send_confirmed`].
    async fn send_handed_over(&self, envelope: Envelope) -> Result<()> {
        self.send_confirmed(envelope).await
    }

    /// Sends a request and waits up to `timeout` for its response. Dropping the future or
    /// timing out abandons the request: a late answer is discarded.
    ///
    /// # Errors
    /// As [`Transport::send`], plus [`Error::Timeout`]; an error *response* is returned as an
    /// `Ok` envelope of kind [`MessageKind::Error`] for the caller to interpret.
    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope>;

    /// Sends one message to each of `targets` concurrently and reports per peer.
    ///
    /// The provided implementation checks the sender's channel once (it must be a broadcast
    /// channel), then makes one [`Transport::send`] per target, each copy addressed to its
    /// target and still of kind [`MessageKind::Broadcast`]. A transport with a cheaper
    /// fan-out (a broker's fleet subject) overrides it, keeping the same report.
    ///
    /// # Errors
    /// Only for what concerns every target alike: an unknown sender or channel,
    /// [`Error::WrongChannelKind`] for a unicast channel, [`Error::MessageTooLarge`],
    /// [`Error::Shutdown`]. A target that cannot be reached is listed in the report.
    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        self.registration(&envelope.from)?
            .check_broadcast(&envelope.channel, envelope.payload.len())?;
        let sends = targets.iter().map(|to| {
            let mut copy = envelope.clone();
            copy.to = crate::Recipient::Agent(to.clone());
            async move { (to.clone(), self.send(copy).await) }
        });
        Ok(BroadcastReport::from_outcomes(
            envelope.id,
            futures::future::join_all(sends).await,
        ))
    }

    /// Broadcasts as [`Transport::broadcast`] does, on a reliable channel, and resolves once
    /// every target's copy is settled: the report's `delivered` are the targets whose agent
    /// took it, `failed` the others with the reason (a [`Error::DeliveryFailed`] says
    /// whether it may have been processed). Each copy is a confirmed send of its own, so
    /// one slow or gone target never holds up what the others report, and the whole
    /// resolves by the delivery deadline.
    ///
    /// # Errors
    /// As [`Transport::broadcast`]; [`Error::Unsupported`] on an unreliable channel, where
    /// nothing is acknowledged.
    async fn broadcast_confirmed(
        &self,
        envelope: Envelope,
        targets: &[AgentId],
    ) -> Result<BroadcastReport> {
        let reg = self.registration(&envelope.from)?;
        let channel = reg.check_broadcast(&envelope.channel, envelope.payload.len())?;
        if !channel.reliable {
            return Err(Error::Unsupported {
                operation: "a confirmed broadcast on an unreliable channel (nothing is acknowledged there)",
            });
        }
        let sends = targets.iter().map(|to| {
            let mut copy = envelope.clone();
            copy.to = crate::Recipient::Agent(to.clone());
            async move { (to.clone(), self.send_confirmed(copy).await) }
        });
        Ok(BroadcastReport::from_outcomes(
            envelope.id,
            futures::future::join_all(sends).await,
        ))
    }

    /// Opens a stream to `header.to`; the receiver gets an [`IncomingStream`] in its inbox.
    ///
    /// # Errors
    /// As [`Transport::send`].
    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>>;

    /// What the local agent `agent` declared when it attached here.
    ///
    /// # Errors
    /// [`Error::PeerNotFound`] when no such agent is attached here; [`Error::Shutdown`] after
    /// shutdown.
    fn registration(&self, agent: &AgentId) -> Result<Registration>;

    /// Every agent this transport can reach, local ones included.
    fn peers(&self) -> Vec<PeerInfo>;

    /// The agents of [`Transport::peers`] that listen on `channel`: whom a fleet broadcast
    /// on it goes to. The provided implementation filters [`Transport::peers`]; transports
    /// override it with a walk of their tables, since a broadcast has no use for what a
    /// peer's description measures (a link's RTT, an agent's counters), and building it
    /// for every agent cost a broadcast to 100 agents more than a quarter of its sending.
    fn agents_on(&self, channel: &ChannelName) -> Vec<AgentId> {
        self.peers()
            .into_iter()
            .filter(|p| p.channels.contains(channel))
            .map(|p| p.id)
            .collect()
    }

    /// Statistics of one attached agent on this transport.
    fn stats(&self, agent: &AgentId) -> Stats;

    /// This transport's live links to other endpoints, as it measures them (none for a
    /// transport without links, such as the bus).
    fn links(&self) -> Vec<crate::LinkReport> {
        Vec::new()
    }

    /// Subscribes to membership and connection events.
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    /// Whether this transport knows a way to `agent` now (it is attached here, or known at
    /// a reachable endpoint). A fallback chain skips a transport that cannot reach the peer
    /// instead of trying it. The provided implementation looks through [`Transport::peers`];
    /// transports override it with a direct lookup.
    fn can_reach(&self, agent: &AgentId) -> bool {
        self.peers().iter().any(|p| &p.id == agent)
    }

    /// Resolves once every reliable message accepted so far from `from` to `to` on
    /// `channel` is in the receiving agent's inbox (or was taken, or reported failed): what
    /// a fallback chain waits for before it moves an ordered channel to another transport,
    /// so that nothing sent later overtakes it. The provided implementation, for transports
    /// whose `send` returns once the message is in the inbox, resolves at once.
    ///
    /// # Errors
    /// [`Error::Shutdown`] when the transport stops meanwhile.
    async fn flush(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> Result<()> {
        let _ = (from, to, channel);
        Ok(())
    }

    /// Hands reliable messages this transport could not deliver to `redeliver` before
    /// reporting them failed. Transports that never lose an accepted message (the in-process
    /// bus) ignore it, which is what this default does.
    fn set_redelivery(&self, redeliver: std::sync::Arc<dyn Redeliver>) {
        let _ = redeliver;
    }

    /// Stops the transport: every attached agent is detached (their inboxes stay open) and
    /// every task it runs ends.
    async fn shutdown(&self);
}
