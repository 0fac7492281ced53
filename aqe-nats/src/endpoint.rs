//! One NATS endpoint: its connection, what it hosts, what it knows of the fleet, what it
//! has in flight, and the tasks that move frames.
//!
//! Tasks, all owned here and ended by [`Shared::close`]:
//! - one reader per subscription: the endpoint's own subject, presence, broadcasts, and one
//!   per attached agent (ended when it detaches);
//! - the control writer, which batches acknowledgements and sends the small frames that
//!   synchronous code (drops, receipts) asks for;
//! - the ticker: heartbeats, liveness, retransmission, delivery deadlines;
//! - redeliveries handed to a fallback, at most [`REDELIVERIES`] at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::plumbing::{AckOnce, LocalAgent, LocalDelivery, Respond};
use aqe_core::{
    Address, AgentId, DeliveryFailure, Envelope, Error, Event, Inbound, IncomingStream, MessageId,
    PeerInfo, PeerState, Receipt, Redeliver, Registration, RemoteErrorKind, Responder, Result,
    StreamChunk, StreamFailure,
};

use crate::NatsConfig;
use crate::flows::{Entry, FlowKey, InKey, Inflow, Outbox, Settled, Verdict};
use crate::membership::{Change, MAX_SNAPSHOT_PARTS, Membership};
use crate::stream::{InStream, NatsSource, OutStream};
use crate::wire::{self, BroadcastTarget, Ep, Frame, Received, Sequenced, Subjects};
use crate::{ConcurrentMap, Map};

/// Redeliveries through a fallback running at once.
const REDELIVERIES: usize = 64;
/// Control items written per batch.
const CONTROL_BATCH: usize = 1024;
/// Agent subjects kept escaped.
const MAX_CACHED_SUBJECTS: usize = 65536;
/// Acknowledgements per frame.
const ACKS_PER_FRAME: usize = 2048;
/// How long acknowledgements wait to share a frame while traffic keeps coming: the batch
/// goes with the first acknowledgement added after this. Well below the sender's
/// retransmission timer; a confirmed send does not wait for it.
const ACK_DELAY: Duration = Duration::from_millis(2);
/// How long the last acknowledgements of a burst may wait, when nothing more comes to send
/// them. A timer does this, and only this: a timer firing every [`ACK_DELAY`] made every
/// message under steady traffic several microseconds slower (tokio's driver wakes, measured
/// with `nats_cpu`).
const ACK_LINGER: Duration = Duration::from_millis(20);
/// Acknowledgements that make a batch go at once.
const ACK_BATCH: usize = 256;

/// Acknowledgements waiting to be written, by the endpoint they go to.
#[derive(Default)]
struct PendingAcks {
    by_endpoint: Map<Ep, EndpointAcks>,
    /// When the first of these was added.
    since: Option<Instant>,
}

#[derive(Default)]
struct EndpointAcks {
    received: Map<(AgentId, AgentId, aqe_core::ChannelName, u64), u64>,
    taken: Vec<(AgentId, MessageId)>,
    abandoned: Vec<(AgentId, MessageId)>,
}

impl PendingAcks {
    fn to(&mut self, ep: Ep) -> &mut EndpointAcks {
        self.by_endpoint.entry(ep).or_default()
    }

    fn len(&self) -> usize {
        self.by_endpoint
            .values()
            .map(|a| a.received.len() + a.taken.len() + a.abandoned.len())
            .sum()
    }
}

/// A request this endpoint sent, waiting for its answer.
struct Pending {
    to: Ep,
    agent: AgentId,
    answer: oneshot::Sender<Result<Envelope>>,
}

/// Small frames for the control writer (acknowledgements go through the [`Acker`]).
pub(crate) enum Control {
    /// Any frame to an endpoint's subject (or presence, for [`PRESENCE`]).
    To(Ep, Frame),
}

/// Acknowledgements waiting to be written: added from anywhere without waiting, written by
/// the control writer in batches: at once when one is urgent or the batch is large, with the
/// first one added [`ACK_DELAY`] after the batch began, and at most [`ACK_LINGER`] after it
/// began when nothing more is added.
#[derive(Default)]
pub(crate) struct Acker {
    pending: Mutex<PendingAcks>,
    wake: Notify,
    /// The writer was told of the current batch.
    armed: AtomicBool,
    /// The current batch holds something a sender waits for.
    urgent: AtomicBool,
}

impl Acker {
    fn add(&self, urgent: bool, f: impl FnOnce(&mut PendingAcks)) {
        let now = Instant::now();
        let due = {
            let mut p = lock(&self.pending);
            f(&mut p);
            let since = *p.since.get_or_insert(now);
            p.len() >= ACK_BATCH || now.saturating_duration_since(since) >= ACK_DELAY
        };
        if urgent || due {
            self.urgent.store(true, Ordering::Release);
            self.wake.notify_one();
        } else if !self.armed.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Something to acknowledge is noted elsewhere (what flows received, in the inflow):
    /// makes sure a batch will go.
    fn arm(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Takes the batch to write.
    fn take(&self) -> PendingAcks {
        self.armed.store(false, Ordering::Release);
        self.urgent.store(false, Ordering::Release);
        std::mem::take(&mut *lock(&self.pending))
    }
}

/// Requests this endpoint's agents hold, by requesting endpoint.
#[derive(Default)]
struct Serving {
    per_endpoint: Map<Ep, u32>,
    cancels: Map<(Ep, MessageId), watch::Sender<bool>>,
}

/// Messages whose receiver's endpoint went away: they wait for the agent to come back (on
/// another endpoint, say after a restart) until their deadline.
#[derive(Default)]
struct Homeless {
    entries: Vec<(FlowKey, Entry)>,
}

pub(crate) struct Shared {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) me: Ep,
    pub(crate) subjects: Subjects,
    /// The server URLs, as events name the connection.
    pub(crate) server: Address,
    pub(crate) locals: ConcurrentMap<AgentId, Arc<LocalAgent>>,
    readers: Mutex<Map<AgentId, (CancellationToken, JoinHandle<()>)>>,
    pub(crate) membership: Mutex<Membership>,
    /// The generation of this endpoint's agent set; the lock also orders announcements.
    generation: tokio::sync::Mutex<u64>,
    current_generation: AtomicU64,
    pub(crate) outbox: Mutex<Outbox>,
    /// Woken when the outbox frees room.
    pub(crate) room: Notify,
    inflow: Mutex<Inflow>,
    homeless: Mutex<Homeless>,
    requests: ConcurrentMap<MessageId, Pending>,
    serving: Mutex<Serving>,
    /// Streams opened from here, by the endpoint they go to.
    pub(crate) out_streams: ConcurrentMap<(Ep, aqe_core::StreamId), Arc<OutStream>>,
    pub(crate) in_streams: ConcurrentMap<(Ep, aqe_core::StreamId), InStream>,
    /// Unbounded on purpose: fed by receipts and drops, which cannot wait, and bounded by
    /// what they stand for (messages admitted under the senders' windows, requests in hand,
    /// streams open).
    pub(crate) control: mpsc::UnboundedSender<Control>,
    acker: Acker,
    agent_subjects: ConcurrentMap<AgentId, async_nats::Subject>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) local_delivery: LocalDelivery,
    redelivery: RwLock<Option<Arc<dyn Redeliver>>>,
    redeliveries: Arc<Semaphore>,
    closed: AtomicBool,
    pub(crate) shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Shared {
    /// Connects to the server and starts the endpoint's tasks.
    pub(crate) async fn connect(config: NatsConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let server = Address::named(config.servers.join(","));
        let (events, _) = broadcast::channel(1024);
        let options = connect_options(&config, events.clone(), server.clone()).await?;
        let addrs: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse().map_err(|e: std::io::Error| Error::Configuration {
                    file: None,
                    field: format!("servers[{i}]"),
                    message: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| Error::ConnectionFailed {
                addr: server.clone(),
                source: Box::new(e),
            })?;
        let me = Ep::random();
        let subjects = Subjects::new(&config.fleet);
        let (control, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            membership: Mutex::new(Membership::new(
                me,
                config.limits.endpoints as usize,
                config.limits.agents_per_endpoint as usize,
            )),
            outbox: Mutex::new(Outbox::new(config.window as usize)),
            inflow: Mutex::new(Inflow::new(config.limits.flows as usize)),
            local_delivery: LocalDelivery::new(
                events.clone(),
                config.send_timeout,
                config.limits.stream_window as usize,
            ),
            config,
            client,
            me,
            subjects,
            server: server.clone(),
            locals: ConcurrentMap::default(),
            readers: Mutex::new(Map::default()),
            generation: tokio::sync::Mutex::new(0),
            current_generation: AtomicU64::new(0),
            room: Notify::new(),
            homeless: Mutex::new(Homeless::default()),
            requests: ConcurrentMap::default(),
            serving: Mutex::new(Serving::default()),
            out_streams: ConcurrentMap::default(),
            in_streams: ConcurrentMap::default(),
            control,
            acker: Acker::default(),
            agent_subjects: ConcurrentMap::default(),
            events,
            redelivery: RwLock::new(None),
            redeliveries: Arc::new(Semaphore::new(REDELIVERIES)),
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let subscribe = |subject: String| {
            let client = shared.client.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| Error::ConnectionFailed {
                        addr: Address::named(subject),
                        source: Box::new(e),
                    })
            }
        };
        let own = subscribe(shared.subjects.endpoint(me)).await?;
        let presence = subscribe(shared.subjects.presence()).await?;
        let fleet = subscribe(shared.subjects.broadcast()).await?;
        for sub in [own, presence, fleet] {
            let s = shared.clone();
            shared.tasks.spawn(async move { s.read(sub, None).await });
        }
        let s = shared.clone();
        shared
            .tasks
            .spawn(async move { s.write_control(control_rx).await });
        let s = shared.clone();
        shared.tasks.spawn(async move { s.tick().await });
        // Say hello: everyone who hears it greets back, so membership converges at once.
        shared.publish_presence(Frame::Alive {
            from: me,
            generation: 0,
        });
        let _ = shared
            .events
            .send(Event::ConnectionEstablished { addr: server });
        tracing::info!(endpoint = %me, fleet = %shared.config.fleet, "NATS endpoint started");
        Ok(shared)
    }

    pub(crate) fn live(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    pub(crate) fn local(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.locals.get(id).map(|l| l.value().clone())
    }

    /// How other endpoints appear in peer listings.
    pub(crate) fn address_of(&self, ep: Ep) -> Address {
        Address::named(format!("nats:{}/{ep}", self.config.fleet))
    }

    pub(crate) fn publish_event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// The largest frame the server takes.
    pub(crate) fn max_frame(&self) -> usize {
        self.client.max_payload()
    }

    /// Encodes `frame`, refusing it (as a payload of `payload_len` bytes) when the server
    /// would.
    pub(crate) fn encode_checked(&self, frame: &Frame, payload_len: usize) -> Result<Bytes> {
        let bytes = wire::encode(frame).map_err(|source| Error::Encode {
            what: "a NATS frame",
            source: Box::new(source),
        })?;
        let max = self.max_frame();
        if max > 0 && bytes.len() > max {
            let overhead = bytes.len().saturating_sub(payload_len);
            return Err(Error::MessageTooLarge {
                size: payload_len,
                max: max.saturating_sub(overhead),
            });
        }
        Ok(bytes)
    }

    /// Publishes on `subject`; a failure (the connection is closed for good) is logged: the
    /// retransmission and liveness machinery deal with what it loses.
    pub(crate) async fn publish(&self, subject: impl async_nats::subject::ToSubject, bytes: Bytes) {
        if let Err(e) = self.client.publish(subject, bytes).await {
            tracing::debug!(error = %e, "NATS publish failed");
        }
    }

    /// The subject of agent `id` (kept: it is escaped once, not per message).
    pub(crate) fn agent_subject(&self, id: &AgentId) -> async_nats::Subject {
        if let Some(s) = self.agent_subjects.get(id) {
            return s.clone();
        }
        let subject = async_nats::Subject::from(self.subjects.agent(id));
        if self.agent_subjects.len() >= MAX_CACHED_SUBJECTS {
            self.agent_subjects.clear();
        }
        self.agent_subjects.insert(id.clone(), subject.clone());
        subject
    }

    fn publish_presence(&self, frame: Frame) {
        let _ = self.control.send(Control::To(PRESENCE, frame));
    }

    // ---- agents ----

    pub(crate) async fn attach(
        self: &Arc<Self>,
        reg: Registration,
        inbox: aqe_core::plumbing::InboxSender,
    ) -> Result<()> {
        self.live()?;
        reg.validate()?;
        let mut generation = self.generation.lock().await;
        match self.locals.entry(reg.id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(Error::Configuration {
                    file: None,
                    field: "id".to_owned(),
                    message: format!("agent {} is already attached to this endpoint", reg.id),
                });
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Arc::new(LocalAgent::new(reg.clone(), inbox)));
            }
        }
        let sub = match self.client.subscribe(self.subjects.agent(&reg.id)).await {
            Ok(sub) => sub,
            Err(e) => {
                self.locals.remove(&reg.id);
                return Err(Error::ConnectionFailed {
                    addr: self.server.clone(),
                    source: Box::new(e),
                });
            }
        };
        self.lock_membership().attach_local(reg.id.clone());
        let stop = self.shutdown.child_token();
        let s = self.clone();
        let (id, token) = (reg.id.clone(), stop.clone());
        let reader = self.tasks.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = s.read(sub, Some(id)) => {}
            }
        });
        lock(&self.readers).insert(reg.id.clone(), (stop, reader));
        *generation += 1;
        self.current_generation
            .store(*generation, Ordering::Release);
        self.publish_presence(Frame::Joined {
            from: self.me,
            generation: *generation,
            agent: reg.clone(),
        });
        tracing::debug!(agent = %reg.id, "agent attached to the NATS endpoint");
        self.publish_event(Event::PeerDiscovered(
            reg.peer_info(None, PeerState::Connected),
        ));
        Ok(())
    }

    pub(crate) async fn detach(self: &Arc<Self>, agent: &AgentId) -> Result<()> {
        let mut generation = self.generation.lock().await;
        self.locals
            .remove(agent)
            .ok_or_else(|| Error::PeerNotFound {
                peer: agent.clone(),
            })?;
        if let Some((stop, reader)) = lock(&self.readers).remove(agent) {
            stop.cancel();
            drop(reader);
        }
        let changes = self.lock_membership().detach_local(agent);
        *generation += 1;
        self.current_generation
            .store(*generation, Ordering::Release);
        self.publish_presence(Frame::Left {
            from: self.me,
            generation: *generation,
            agent: agent.clone(),
        });
        self.publish_event(Event::PeerLeft(agent.clone()));
        self.apply(changes);
        Ok(())
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        lock(&self.membership)
    }

    /// Every agent this endpoint can reach.
    pub(crate) fn peers(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .locals
            .iter()
            .map(|l| {
                let mut info = l.reg.peer_info(None, PeerState::Connected);
                if let Some(t) = l.stats.snapshot().last_activity {
                    info.last_activity = t.to_system_time();
                }
                info
            })
            .collect();
        let now = Instant::now();
        let m = self.lock_membership();
        for (ep, reg, heard) in m.agents() {
            let mut info = reg.peer_info(Some(self.address_of(ep)), PeerState::Connected);
            info.last_activity =
                std::time::SystemTime::now() - now.saturating_duration_since(heard);
            out.push(info);
        }
        out
    }

    // ---- sending ----

    /// Sends a reliable message to agent `to` of endpoint `ep`; with `confirm`, resolves when
    /// it is taken.
    pub(crate) async fn send_reliable(
        self: &Arc<Self>,
        sender: &LocalAgent,
        ep: Ep,
        envelope: Envelope,
        confirm: bool,
    ) -> Result<()> {
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        let key = FlowKey {
            from: envelope.from.clone(),
            to: to.clone(),
            channel: envelope.channel.clone(),
        };
        let len = envelope.payload.len();
        let id = envelope.id;
        let (done, confirmed) = if confirm {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut done = done;
        let admit = |done: &mut Option<_>| {
            lock(&self.outbox).admit(&key, ep, &envelope, Instant::now(), done)
        };
        // Room at once is the common case: no waiting registered for it.
        let flow = match admit(&mut done) {
            Some(flow) => flow,
            None => {
                let deadline = tokio::time::Instant::now() + self.config.send_timeout;
                loop {
                    let waiting = self.room.notified();
                    tokio::pin!(waiting);
                    waiting.as_mut().enable();
                    // `None`: a full window, or the receiver moved while messages to its old
                    // endpoint are being handed on; wait for room.
                    if let Some(flow) = admit(&mut done) {
                        break flow;
                    }
                    if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                        return Err(Error::SendFailed {
                            to,
                            reason: aqe_core::SendFailure::QueueFull(self.config.send_timeout),
                        });
                    }
                    self.live()?;
                }
            }
        };
        let frame = Frame::Message {
            to: ep,
            from: self.me,
            flow,
            confirm,
            envelope,
        };
        let encoded = self.encode_checked(&frame, len);
        drop(frame);
        let bytes = match encoded {
            Ok(bytes) => bytes,
            Err(e) => {
                // Refused before anything left: the place in the window is given back.
                lock(&self.outbox).remove(&to, id, ep);
                self.room.notify_waiters();
                return Err(e);
            }
        };
        sender.stats.accepted();
        sender.stats.sent(len);
        self.publish(self.agent_subject(&to), bytes).await;
        match confirmed {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(Error::Shutdown)),
        }
    }

    /// Sends a request to agent `to` of endpoint `ep` and waits up to `timeout`.
    pub(crate) async fn request(
        self: &Arc<Self>,
        sender: &LocalAgent,
        ep: Ep,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        let (id, len) = (envelope.id, envelope.payload.len());
        // Encoded and dropped here: nothing of the frame lives across the awaits below.
        let bytes = self.encode_checked(
            &Frame::Request {
                to: ep,
                from: self.me,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                envelope,
            },
            len,
        )?;
        let (tx, rx) = oneshot::channel();
        self.requests.insert(
            id,
            Pending {
                to: ep,
                agent: to.clone(),
                answer: tx,
            },
        );
        // Whatever happens from here (answer, timeout, the caller dropping this future),
        // the entry goes and an unanswered request is cancelled at the responder.
        let guard = RequestGuard {
            shared: self,
            id,
            to: ep,
            answered: false,
        };
        let started = Instant::now();
        sender.stats.sent(len);
        let outcome = tokio::time::timeout(timeout, async {
            // The answer comes on a reply inbox of the client's own request multiplexer (one
            // hop fewer than a subscription of ours); refusals come on this endpoint's
            // subject. Made here, not before: a future moved into an awaited one keeps its
            // own slot too, and this one is 1 KiB (the request future was 2.8 KiB).
            let call = self.client.send_request(
                self.agent_subject(&to),
                async_nats::Request::new().payload(bytes).timeout(None),
            );
            tokio::select! {
                r = call => self.reply(ep, id, &to, r),
                r = rx => r.unwrap_or(Err(Error::Shutdown)),
            }
        })
        .await;
        let mut guard = guard;
        match outcome {
            Ok(Ok(response)) => {
                guard.answered = true;
                sender.stats.received(response.payload.len());
                sender.stats.rtt_sample(started.elapsed());
                Ok(response)
            }
            Ok(Err(e)) => {
                guard.answered = !matches!(e, Error::ConnectionLost { .. });
                Err(e)
            }
            Err(_) => Err(Error::Timeout {
                after: timeout,
                attempts: 1,
            }),
        }
    }

    /// What a reply on a request's inbox says: the response from the endpoint the request
    /// went to, or why there is none.
    fn reply(
        &self,
        ep: Ep,
        id: MessageId,
        to: &AgentId,
        reply: std::result::Result<async_nats::Message, async_nats::RequestError>,
    ) -> Result<Envelope> {
        use async_nats::RequestErrorKind;
        let message = match reply {
            Ok(m) => m,
            // Nobody subscribes to the agent's subject: it is not in the fleet (any more).
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                return Err(Error::PeerNotFound { peer: to.clone() });
            }
            Err(e) => {
                return Err(Error::ConnectionLost {
                    addr: self.server.clone(),
                    source: Box::new(e),
                });
            }
        };
        match wire::decode(&message.payload) {
            Some(Frame::Response {
                from,
                request,
                envelope,
            }) if from == ep && request == id => Ok(envelope),
            _ => Err(Error::Protocol {
                detail: "the answer on a request's inbox is not its response",
            }),
        }
    }

    /// Publishes a fleet broadcast of `envelope` to `targets` (agent, endpoint) in one frame,
    /// each reliable copy taking its place in the flow to its target.
    pub(crate) async fn broadcast(
        self: &Arc<Self>,
        sender: &LocalAgent,
        channel: &aqe_core::Channel,
        envelope: Envelope,
        targets: Vec<(AgentId, Ep)>,
    ) -> Vec<(AgentId, Result<()>)> {
        let len = envelope.payload.len();
        let now = Instant::now();
        let mut placed = Vec::with_capacity(targets.len());
        let mut outcomes = Vec::with_capacity(targets.len());
        for (agent, ep) in targets {
            if !channel.reliable {
                placed.push(BroadcastTarget {
                    agent: agent.clone(),
                    endpoint: ep,
                    flow: None,
                });
                outcomes.push((agent, Ok(())));
                continue;
            }
            let key = FlowKey {
                from: envelope.from.clone(),
                to: agent.clone(),
                channel: envelope.channel.clone(),
            };
            let mut copy = envelope.clone();
            copy.to = aqe_core::Recipient::Agent(agent.clone());
            let admitted = lock(&self.outbox).admit(&key, ep, &copy, now, &mut None);
            match admitted {
                Some(flow) => {
                    sender.stats.accepted();
                    placed.push(BroadcastTarget {
                        agent: agent.clone(),
                        endpoint: ep,
                        flow: Some(flow),
                    });
                    outcomes.push((agent, Ok(())));
                }
                None => {
                    // A full window: this target gets its own send, which waits for room.
                    let mut copy = envelope.clone();
                    copy.to = aqe_core::Recipient::Agent(agent.clone());
                    let r = self.send_reliable(sender, ep, copy, false).await;
                    outcomes.push((agent, r));
                }
            }
        }
        if !placed.is_empty() {
            for _ in &placed {
                sender.stats.sent(len);
            }
            // Frames small enough for the server, a share of the targets each.
            let per_frame = (self.max_frame() / 256).clamp(16, 4096);
            for chunk in placed.chunks(per_frame) {
                let frame = Frame::Broadcast {
                    from: self.me,
                    envelope: envelope.clone(),
                    targets: chunk.to_vec(),
                };
                match wire::encode(&frame) {
                    Ok(bytes) => self.publish(self.subjects.broadcast(), bytes).await,
                    Err(e) => tracing::warn!(error = %e, "a frame could not be encoded"),
                }
            }
        }
        outcomes
    }

    // ---- receiving ----

    /// Reads one subscription until it ends. `agent` is the agent whose subject it is.
    async fn read(self: &Arc<Self>, mut sub: async_nats::Subscriber, agent: Option<AgentId>) {
        loop {
            let message = tokio::select! {
                () = self.shutdown.cancelled() => break,
                m = sub.next() => m,
            };
            let Some(message) = message else { break };
            let Some(frame) = wire::decode(&message.payload) else {
                tracing::debug!(subject = %message.subject, "dropped a NATS message that is not an aqe frame");
                continue;
            };
            self.handle(frame, agent.as_ref(), message.reply).await;
        }
        let _ = sub.unsubscribe().await;
    }

    /// Acts on one frame. `agent` is the agent whose subject it came on, if any.
    async fn handle(
        self: &Arc<Self>,
        frame: Frame,
        agent: Option<&AgentId>,
        reply: Option<async_nats::Subject>,
    ) {
        let now = Instant::now();
        match frame {
            // ---- to an agent ----
            Frame::Message {
                to,
                from,
                flow,
                confirm,
                envelope,
            } if to == self.me => {
                self.lock_membership().heard(from, now);
                if let Some(agent) = agent.filter(|a| envelope.target() == Some(*a)) {
                    self.take_message(from, agent, Some((flow, confirm)), envelope);
                }
            }
            Frame::Datagram { to, from, envelope } if to == self.me => {
                self.lock_membership().heard(from, now);
                if let Some(agent) = agent.filter(|a| envelope.target() == Some(*a)) {
                    self.take_message(from, agent, None, envelope);
                }
            }
            Frame::Broadcast {
                from,
                envelope,
                targets,
            } => {
                if from == self.me {
                    return;
                }
                self.lock_membership().heard(from, now);
                for t in targets.into_iter().filter(|t| t.endpoint == self.me) {
                    let mut copy = envelope.clone();
                    copy.to = aqe_core::Recipient::Agent(t.agent.clone());
                    self.take_message(from, &t.agent, t.flow.map(|f| (f, false)), copy);
                }
            }
            Frame::Request {
                to,
                from,
                timeout_ms,
                envelope,
            } if to == self.me => {
                self.lock_membership().heard(from, now);
                let Some(agent) = agent.filter(|a| envelope.target() == Some(*a)) else {
                    return;
                };
                let reply = reply.unwrap_or_else(|| self.subjects.endpoint(from).into());
                self.take_request(from, agent, reply, timeout_ms, envelope);
            }
            Frame::StreamOpen { to, from, header } if to == self.me => {
                self.lock_membership().heard(from, now);
                if agent == Some(&header.to) {
                    self.open_incoming(from, header);
                }
            }
            Frame::StreamData {
                to,
                from,
                stream,
                seq,
                data,
                fin,
            } if to == self.me => {
                self.lock_membership().heard(from, now);
                self.stream_data(from, stream, seq, data, fin);
            }
            Frame::StreamCancel { to, from, stream } if to == self.me => {
                // Dropping the sending side ends the reader with "cancelled".
                self.in_streams.remove(&(from, stream));
            }
            // ---- to this endpoint ----
            Frame::Acks {
                from,
                received,
                taken,
                abandoned,
            } => {
                self.lock_membership().heard(from, now);
                self.on_acks(from, received, taken, abandoned, now);
            }
            Frame::Response {
                from,
                request,
                envelope,
            } => self.answer(from, request, Ok(envelope)),
            Frame::Refused {
                from,
                request,
                kind,
                message,
            } => self.refused(from, request, kind, message),
            Frame::NotHere {
                from,
                request,
                agent,
            } => self.answer(from, request, Err(Error::PeerNotFound { peer: agent })),
            Frame::Cancel { from, request } => {
                if let Some(c) = lock(&self.serving).cancels.get(&(from, request)) {
                    let _ = c.send(true);
                }
            }
            Frame::StreamCredit {
                from,
                stream,
                up_to,
            } => {
                if let Some(s) = self.out_streams.get(&(from, stream)) {
                    s.credit(up_to);
                }
            }
            Frame::StreamReset { from, stream } => {
                if let Some(s) = self.out_streams.get(&(from, stream)) {
                    s.fail(Error::Stream {
                        stream,
                        reason: StreamFailure::ClosedByPeer,
                    });
                }
            }
            Frame::SnapshotRequest { from } => self.send_snapshot(from).await,
            Frame::Snapshot {
                from,
                generation,
                part,
                parts,
                agents,
            } => {
                let changes = self
                    .lock_membership()
                    .on_snapshot(from, generation, part, parts, agents, now);
                self.apply(changes);
            }
            // ---- presence ----
            Frame::Alive { from, generation } => {
                let changes = self.lock_membership().on_alive(from, generation, now);
                self.apply(changes);
            }
            Frame::Joined {
                from,
                generation,
                agent,
            } => {
                let changes = self
                    .lock_membership()
                    .on_joined(from, generation, agent, now);
                self.apply(changes);
            }
            Frame::Left {
                from,
                generation,
                agent,
            } => {
                let changes = self
                    .lock_membership()
                    .on_left(from, generation, &agent, now);
                self.apply(changes);
            }
            Frame::Gone { from } if from != self.me => {
                let changes = self.lock_membership().on_gone(from);
                self.apply(changes);
            }
            // Addressed to another endpoint (an agent id two endpoints claim).
            _ => {}
        }
    }

    /// A one-way message for local agent `agent` from endpoint `from`.
    fn take_message(
        self: &Arc<Self>,
        from: Ep,
        agent: &AgentId,
        flow: Option<(Sequenced, bool)>,
        envelope: Envelope,
    ) {
        let id = envelope.id;
        let Some(local) = self.local(agent) else {
            if flow.is_some() {
                self.acker
                    .add(true, |p| p.to(from).abandoned.push((agent.clone(), id)));
            }
            return;
        };
        if local.listens(&envelope.channel).is_err() {
            if flow.is_some() {
                self.acker
                    .add(true, |p| p.to(from).abandoned.push((agent.clone(), id)));
            }
            return;
        }
        let len = envelope.payload.len();
        let Some((flow, confirm)) = flow else {
            // Unreliable: at most once, dropped when the inbox is full.
            if let Ok(Some(permit)) = local.inbox.try_reserve() {
                let _ =
                    permit.send_counted(Inbound::message(envelope), || local.stats.received(len));
            }
            return;
        };
        let key = InKey {
            endpoint: from,
            from: envelope.from.clone(),
            to: agent.clone(),
            channel: envelope.channel.clone(),
        };
        let verdict = lock(&self.inflow).on_message(key.clone(), id, &flow, Instant::now());
        let received = |up_to| Received {
            from: key.from.clone(),
            to: key.to.clone(),
            channel: key.channel.clone(),
            epoch: flow.epoch,
            up_to,
        };
        match verdict {
            Verdict::Deliver(_) => {
                let receipt = Receipt::once(TakeAck {
                    shared: Arc::downgrade(self),
                    key: key.clone(),
                    epoch: flow.epoch,
                    seq: flow.seq,
                    id,
                    urgent: confirm,
                });
                let item = Inbound::Message { envelope, receipt };
                let delivered = local.inbox.deliver_now(item, || local.stats.received(len));
                if let Err((_, Inbound::Message { receipt, .. })) = delivered {
                    receipt.abandon();
                }
                // Acknowledged as received with the next batch (`Inflow::take_received`).
                self.acker.arm();
            }
            // A copy of one delivered before, sent again because a confirmation was lost:
            // the confirmation goes again, the message does not.
            Verdict::Duplicate(up_to, fate) => {
                match fate {
                    Some(Settled::Taken) => {
                        self.acker
                            .add(false, |p| p.to(from).taken.push((agent.clone(), id)));
                    }
                    Some(Settled::Abandoned) => {
                        self.acker
                            .add(true, |p| p.to(from).abandoned.push((agent.clone(), id)));
                    }
                    Some(Settled::Queued) | None => {}
                }
                self.ack_received(from, received(up_to));
            }
            Verdict::Gap | Verdict::Full => {}
        }
    }

    /// A request for local agent `agent` from endpoint `from`, answered on `reply`.
    fn take_request(
        self: &Arc<Self>,
        from: Ep,
        agent: &AgentId,
        reply: async_nats::Subject,
        timeout_ms: u64,
        envelope: Envelope,
    ) {
        let request = envelope.id;
        let Some(local) = self.local(agent) else {
            let _ = self.control.send(Control::To(
                from,
                Frame::NotHere {
                    from: self.me,
                    request,
                    agent: agent.clone(),
                },
            ));
            return;
        };
        let (cancel_tx, cancel_rx) = watch::channel(false);
        {
            let mut serving = lock(&self.serving);
            let n = serving.per_endpoint.entry(from).or_insert(0);
            if *n >= self.config.limits.requests_in_hand {
                drop(serving);
                let _ = self.control.send(Control::To(
                    from,
                    Frame::Refused {
                        from: self.me,
                        request,
                        kind: RemoteErrorKind::Busy,
                        message: "too many requests in hand".to_owned(),
                    },
                ));
                return;
            }
            *n += 1;
            serving.cancels.insert((from, request), cancel_tx);
        }
        let len = envelope.payload.len();
        let responder = Responder::new(NatsResponder {
            shared: self.clone(),
            requester: from,
            request,
            reply,
            cancelled: cancel_rx,
            stats: local.stats.clone(),
            answered: false,
            expires: Instant::now() + Duration::from_millis(timeout_ms),
        });
        let item = Inbound::Request {
            envelope,
            responder,
        };
        // Bounded by requests in hand per endpoint; waiting would stall the subscription.
        let _ = local.inbox.deliver_now(item, || local.stats.received(len));
    }

    fn refused(&self, from: Ep, request: MessageId, kind: RemoteErrorKind, message: String) {
        let Some(peer) = self
            .requests
            .get(&request)
            .filter(|p| p.to == from)
            .map(|p| p.agent.clone())
        else {
            return;
        };
        let err = match kind {
            RemoteErrorKind::Busy => Error::Busy { peer },
            kind => Error::Remote {
                agent: peer,
                kind,
                message,
            },
        };
        self.answer(from, request, Err(err));
    }

    fn answer(&self, from: Ep, request: MessageId, outcome: Result<Envelope>) {
        // Only the endpoint the request went to may answer it.
        if self.requests.get(&request).is_some_and(|p| p.to == from)
            && let Some((_, p)) = self.requests.remove(&request)
        {
            let _ = p.answer.send(outcome);
        }
    }

    fn on_acks(
        &self,
        from: Ep,
        received: Vec<Received>,
        taken: Vec<(AgentId, MessageId)>,
        abandoned: Vec<(AgentId, MessageId)>,
        now: Instant,
    ) {
        let progress = !received.is_empty();
        let mut outbox = lock(&self.outbox);
        for r in received {
            let key = FlowKey {
                from: r.from,
                to: r.to,
                channel: r.channel,
            };
            if let Some(rtt) = outbox.on_received(&key, from, r.epoch, r.up_to, now)
                && let Some(l) = self.local(&key.from)
            {
                l.stats.rtt_sample(rtt);
            }
        }
        let mut freed = false;
        for (to, id) in taken {
            if let Some((key, entry)) = outbox.remove(&to, id, from) {
                freed = true;
                if let Some(l) = self.local(&key.from) {
                    l.stats.confirmed(1);
                }
                if let Some(c) = entry.confirm {
                    let _ = c.send(Ok(()));
                }
            }
        }
        let mut failed: Map<FlowKey, Vec<MessageId>> = Map::default();
        for (to, id) in abandoned {
            if let Some((key, entry)) = outbox.remove(&to, id, from) {
                freed = true;
                if let Some(c) = entry.confirm {
                    let _ = c.send(Err(Error::DeliveryFailed {
                        to: key.to.clone(),
                        reason: DeliveryFailure::ReceiverStopped,
                    }));
                }
                failed.entry(key).or_default().push(id);
            }
        }
        drop(outbox);
        for (key, ids) in failed {
            self.report_failed(key, ids, DeliveryFailure::ReceiverStopped);
        }
        if freed || progress {
            self.room.notify_waiters();
        }
    }

    /// Resolves once the flow has nothing its receiver's endpoint has not acknowledged
    /// receiving (it is then in the agent's inbox, or was handed on, or failed).
    pub(crate) async fn flush(&self, key: &FlowKey) -> Result<()> {
        loop {
            let progress = self.room.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            self.live()?;
            if !lock(&self.outbox).unreceived(key) {
                return Ok(());
            }
            progress.await;
        }
    }

    fn report_failed(&self, key: FlowKey, ids: Vec<MessageId>, reason: DeliveryFailure) {
        if let Some(l) = self.local(&key.from) {
            l.stats.failed(ids.len() as u64);
        }
        tracing::warn!(from = %key.from, to = %key.to, channel = %key.channel, count = ids.len(), %reason, "messages not delivered");
        self.publish_event(Event::DeliveryFailed {
            from: key.from,
            to: key.to,
            channel: key.channel,
            ids,
            reason,
        });
    }

    async fn send_snapshot(&self, to: Ep) {
        if !self.lock_membership().knows(to) {
            // Answer only endpoints that announced themselves (bounded by the limits).
            return;
        }
        let generation = self.current_generation.load(Ordering::Acquire);
        let agents: Vec<Registration> = self.locals.iter().map(|l| l.reg.clone()).collect();
        // Parts that fit the server's limit with room to spare.
        let budget = (self.max_frame() / 2).max(4096);
        let mut parts: Vec<Vec<Registration>> = vec![Vec::new()];
        let mut size = 0;
        for reg in agents {
            let n = postcard::to_allocvec(&reg).map_or(budget, |v| v.len());
            if size + n > budget
                && parts.last().is_some_and(|p| !p.is_empty())
                && parts.len() < usize::from(MAX_SNAPSHOT_PARTS)
            {
                parts.push(Vec::new());
                size = 0;
            }
            size += n;
            if let Some(p) = parts.last_mut() {
                p.push(reg);
            }
        }
        let count = u16::try_from(parts.len()).unwrap_or(MAX_SNAPSHOT_PARTS);
        for (i, agents) in parts.into_iter().enumerate() {
            let frame = Frame::Snapshot {
                from: self.me,
                generation,
                part: u16::try_from(i).unwrap_or(u16::MAX),
                parts: count,
                agents,
            };
            if let Ok(bytes) = wire::encode(&frame) {
                self.publish(self.subjects.endpoint(to), bytes).await;
            }
        }
    }

    /// Acts on membership changes.
    fn apply(self: &Arc<Self>, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Discovered(ep, reg) => {
                    let id = reg.id.clone();
                    self.publish_event(Event::PeerDiscovered(
                        reg.peer_info(Some(self.address_of(ep)), PeerState::Connected),
                    ));
                    self.rehome(&id, ep);
                }
                Change::Left(_, id) => self.publish_event(Event::PeerLeft(id)),
                Change::Conflict { agent, claimed_by } => {
                    tracing::warn!(%agent, endpoint = %claimed_by, "agent id claimed by a second endpoint; refused");
                    self.publish_event(Event::AgentConflict {
                        agent,
                        claimed_by: self.address_of(claimed_by),
                    });
                }
                Change::Fetch(ep) => {
                    let _ = self
                        .control
                        .send(Control::To(ep, Frame::SnapshotRequest { from: self.me }));
                }
                Change::Greet(ep) => {
                    let generation = self.current_generation.load(Ordering::Acquire);
                    let _ = self.control.send(Control::To(
                        ep,
                        Frame::Alive {
                            from: self.me,
                            generation,
                        },
                    ));
                }
                Change::EndpointGone(ep) => self.endpoint_gone(ep),
            }
        }
    }

    /// `ep` is gone: fail what waits on it, hand on what was in flight to it.
    fn endpoint_gone(self: &Arc<Self>, ep: Ep) {
        let addr = self.address_of(ep);
        let pending: Vec<MessageId> = self
            .requests
            .iter()
            .filter(|p| p.to == ep)
            .map(|p| *p.key())
            .collect();
        for id in pending {
            if let Some((_, p)) = self.requests.remove(&id) {
                let _ = p.answer.send(Err(Error::ConnectionLost {
                    addr: addr.clone(),
                    source: "the endpoint fell silent or left".into(),
                }));
            }
        }
        {
            let mut serving = lock(&self.serving);
            serving.per_endpoint.remove(&ep);
            for ((from, _), c) in &serving.cancels {
                if *from == ep {
                    let _ = c.send(true);
                }
            }
        }
        lock(&self.inflow).forget_endpoint(ep);
        for s in self.out_streams.iter().filter(|s| s.key().0 == ep) {
            s.fail(Error::ConnectionLost {
                addr: addr.clone(),
                source: "the endpoint fell silent or left".into(),
            });
        }
        let broken: Vec<_> = self
            .in_streams
            .iter()
            .filter(|s| s.key().0 == ep)
            .map(|s| *s.key())
            .collect();
        for key in broken {
            if let Some((_, s)) = self.in_streams.remove(&key) {
                s.fail(Error::ConnectionLost {
                    addr: addr.clone(),
                    source: "the endpoint fell silent or left".into(),
                });
            }
        }
        let entries = lock(&self.outbox).take_endpoint(ep);
        if !entries.is_empty() {
            self.room.notify_waiters();
            tracing::info!(endpoint = %ep, count = entries.len(), "messages in flight to a departed endpoint are handed on");
        }
        for (key, mut entry) in entries {
            // Received but not confirmed: it may have been processed.
            entry.envelope.redelivered |= entry.received;
            self.hand_on(key, entry);
        }
    }

    /// A message whose receiver's endpoint went away: to the fallback if there is one, else
    /// to wait for the agent to reappear, until its deadline.
    fn hand_on(self: &Arc<Self>, key: FlowKey, entry: Entry) {
        let redelivery = self
            .redelivery
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(redeliver) = redelivery else {
            lock(&self.homeless).entries.push((key, entry));
            return;
        };
        let s = self.clone();
        let permits = self.redeliveries.clone();
        self.tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let wait = s
                .config
                .delivery_deadline
                .saturating_sub(entry.accepted_at.elapsed());
            let outcome = tokio::select! {
                () = s.shutdown.cancelled() => None,
                r = tokio::time::timeout(wait, redeliver.redeliver(entry.envelope.clone())) => r.ok(),
            };
            match outcome {
                Some(Ok(())) => {
                    if let Some(l) = s.local(&key.from) {
                        l.stats.confirmed(1);
                    }
                    if let Some(c) = entry.confirm {
                        let _ = c.send(Ok(()));
                    }
                }
                _ => lock(&s.homeless).entries.push((key, entry)),
            }
        });
    }

    /// Agent `id` is (again) at `ep`: messages waiting for it go there.
    fn rehome(self: &Arc<Self>, id: &AgentId, ep: Ep) {
        let waiting: Vec<(FlowKey, Entry)> = {
            let mut h = lock(&self.homeless);
            let (mine, rest) = std::mem::take(&mut h.entries)
                .into_iter()
                .partition(|(k, _)| &k.to == id);
            h.entries = rest;
            mine
        };
        if waiting.is_empty() {
            return;
        }
        let s = self.clone();
        let ep2 = ep;
        self.tasks.spawn(async move {
            let mut frames = Vec::new();
            let mut refused = Vec::new();
            {
                let mut outbox = lock(&s.outbox);
                for (key, mut entry) in waiting {
                    let waited = entry.confirm.is_some();
                    match outbox.admit(
                        &key,
                        ep2,
                        &entry.envelope,
                        entry.accepted_at,
                        &mut entry.confirm,
                    ) {
                        Some(flow) => frames.push((
                            key.to.clone(),
                            Frame::Message {
                                to: ep2,
                                from: s.me,
                                flow,
                                confirm: waited,
                                envelope: entry.envelope,
                            },
                        )),
                        None => refused.push((key, entry)),
                    }
                }
            }
            if !refused.is_empty() {
                // No room now: they stay homeless, and are reported at their deadline like
                // the others if nothing takes them first.
                tracing::debug!(messages = refused.len(), "no room to redeliver now");
                lock(&s.homeless).entries.extend(refused);
            }
            for (to, frame) in frames {
                if let Ok(bytes) = wire::encode(&frame) {
                    s.publish(s.agent_subject(&to), bytes).await;
                }
            }
        });
    }

    // ---- the control writer ----

    /// A flow received up to a point: acknowledged in the next batch.
    fn ack_received(&self, to: Ep, r: Received) {
        self.acker.add(false, |p| {
            let up = p
                .to(to)
                .received
                .entry((r.from, r.to, r.channel, r.epoch))
                .or_insert(0);
            *up = (*up).max(r.up_to);
        });
    }

    /// What became of message `seq` of a flow: recorded, and confirmed to its sender.
    fn ack_settled(
        &self,
        key: InKey,
        epoch: u64,
        seq: u64,
        id: MessageId,
        fate: Settled,
        urgent: bool,
    ) {
        lock(&self.inflow).settle(&key, epoch, seq, fate);
        self.acker.add(urgent || fate == Settled::Abandoned, |p| {
            let a = p.to(key.endpoint);
            let to = key.to.clone();
            // A confirmation implies everything before it in the flow was received.
            if !a.received.is_empty() {
                let flow = (key.from, key.to, key.channel, epoch);
                if a.received.get(&flow).is_some_and(|up| *up <= seq) {
                    a.received.remove(&flow);
                }
            }
            match fate {
                Settled::Taken => a.taken.push((to, id)),
                Settled::Abandoned => a.abandoned.push((to, id)),
                Settled::Queued => {}
            }
        });
    }

    /// Writes control frames as they come, and acknowledgements in batches.
    async fn write_control(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Control>) {
        let mut batch = Vec::with_capacity(CONTROL_BATCH);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let until = due.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, CONTROL_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.send_frames(&mut batch).await;
                }
                () = self.acker.wake.notified() => {
                    if self.acker.urgent.load(Ordering::Acquire) {
                        let mut acks = self.acker.take();
                        self.flush_acks(&mut acks).await;
                        due = None;
                    } else if due.is_none() {
                        due = Some(tokio::time::Instant::now() + ACK_LINGER);
                    }
                }
                () = tokio::time::sleep_until(until), if due.is_some() => {
                    let mut acks = self.acker.take();
                    self.flush_acks(&mut acks).await;
                    due = None;
                }
            }
        }
        // What is queued at shutdown still goes (the goodbye among it).
        while let Ok(item) = rx.try_recv() {
            batch.push(item);
        }
        self.send_frames(&mut batch).await;
        let mut acks = self.acker.take();
        self.flush_acks(&mut acks).await;
        let _ = self.client.flush().await;
    }

    async fn send_frames(&self, batch: &mut Vec<Control>) {
        for Control::To(ep, frame) in batch.drain(..) {
            let subject = if ep == PRESENCE {
                self.subjects.presence()
            } else {
                self.subjects.endpoint(ep)
            };
            if let Ok(bytes) = wire::encode(&frame) {
                self.publish(subject, bytes).await;
            }
        }
    }

    async fn flush_acks(&self, acks: &mut PendingAcks) {
        for (ep, r) in lock(&self.inflow).take_received() {
            let up = acks
                .to(ep)
                .received
                .entry((r.from, r.to, r.channel, r.epoch))
                .or_insert(0);
            *up = (*up).max(r.up_to);
        }
        for (ep, a) in std::mem::take(&mut acks.by_endpoint) {
            let mut received: Vec<Received> = a
                .received
                .into_iter()
                .map(|((from, to, channel, epoch), up_to)| Received {
                    from,
                    to,
                    channel,
                    epoch,
                    up_to,
                })
                .collect();
            let (mut taken, mut abandoned) = (a.taken, a.abandoned);
            while !(received.is_empty() && taken.is_empty() && abandoned.is_empty()) {
                let frame = Frame::Acks {
                    from: self.me,
                    received: split_front(&mut received, ACKS_PER_FRAME / 8),
                    taken: split_front(&mut taken, ACKS_PER_FRAME),
                    abandoned: split_front(&mut abandoned, ACKS_PER_FRAME),
                };
                if let Ok(bytes) = wire::encode(&frame) {
                    self.publish(self.subjects.endpoint(ep), bytes).await;
                }
            }
        }
    }

    // ---- the ticker ----

    async fn tick(self: Arc<Self>) {
        let step = self
            .config
            .heartbeat_interval
            .min(self.config.retransmit_after / 2)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut interval = tokio::time::interval(step);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heartbeat = Instant::now();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            let now = Instant::now();
            if now.saturating_duration_since(last_heartbeat) >= self.config.heartbeat_interval {
                last_heartbeat = now;
                self.publish_presence(Frame::Alive {
                    from: self.me,
                    generation: self.current_generation.load(Ordering::Acquire),
                });
            }
            let changes = self
                .lock_membership()
                .tick(now, self.config.liveness_timeout);
            self.apply(changes);
            self.retransmit(now).await;
            self.expire(now);
            lock(&self.inflow).expire(
                now,
                self.config.delivery_deadline * 2 + self.config.liveness_timeout,
            );
        }
    }

    async fn retransmit(&self, now: Instant) {
        let due = lock(&self.outbox).due(now, self.config.retransmit_after);
        for resend in due {
            for (flow, envelope, confirm) in resend.messages {
                let frame = Frame::Message {
                    to: resend.endpoint,
                    from: self.me,
                    flow,
                    confirm,
                    envelope,
                };
                if let Ok(bytes) = wire::encode(&frame) {
                    self.publish(self.agent_subject(&resend.key.to), bytes)
                        .await;
                }
            }
        }
    }

    /// Reports messages out of time.
    fn expire(&self, now: Instant) {
        let deadline = self.config.delivery_deadline;
        let mut late = lock(&self.outbox).expired(now, deadline);
        {
            let mut h = lock(&self.homeless);
            let (out, keep) = std::mem::take(&mut h.entries)
                .into_iter()
                .partition(|(_, e)| now.saturating_duration_since(e.accepted_at) >= deadline);
            h.entries = keep;
            late.extend::<Vec<_>>(out);
        }
        if late.is_empty() {
            return;
        }
        self.room.notify_waiters();
        let mut failed: Map<(FlowKey, DeliveryFailure), Vec<MessageId>> = Map::default();
        for (key, entry) in late {
            let reason = if entry.received || entry.envelope.redelivered {
                DeliveryFailure::Unconfirmed
            } else {
                DeliveryFailure::Unreachable
            };
            if let Some(c) = entry.confirm {
                let _ = c.send(Err(Error::DeliveryFailed {
                    to: key.to.clone(),
                    reason,
                }));
            }
            failed
                .entry((key, reason))
                .or_default()
                .push(entry.envelope.id);
        }
        for ((key, reason), ids) in failed {
            self.report_failed(key, ids, reason);
        }
    }

    pub(crate) fn set_redelivery(&self, r: Arc<dyn Redeliver>) {
        *self.redelivery.write().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// Stops everything: says goodbye, fails what waits, ends every task.
    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            self.tasks.wait().await;
            return;
        }
        let _ = self
            .control
            .send(Control::To(PRESENCE, Frame::Gone { from: self.me }));
        let ids: Vec<AgentId> = self.locals.iter().map(|l| l.key().clone()).collect();
        for id in &ids {
            self.locals.remove(id);
        }
        for (_, (stop, _)) in lock(&self.readers).drain() {
            stop.cancel();
        }
        for r in self.requests.iter().map(|r| *r.key()).collect::<Vec<_>>() {
            if let Some((_, p)) = self.requests.remove(&r) {
                let _ = p.answer.send(Err(Error::Shutdown));
            }
        }
        self.room.notify_waiters();
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // What was in flight will not be delivered by this endpoint any more.
        let mut gone: Vec<(FlowKey, Entry)> = Vec::new();
        {
            let mut outbox = lock(&self.outbox);
            for id in &ids {
                gone.extend(outbox.take_sender(id));
            }
        }
        gone.extend(std::mem::take(&mut lock(&self.homeless).entries));
        let mut failed: Map<FlowKey, Vec<MessageId>> = Map::default();
        for (key, entry) in gone {
            if let Some(c) = entry.confirm {
                let _ = c.send(Err(Error::Shutdown));
            }
            failed.entry(key).or_default().push(entry.envelope.id);
        }
        for (key, ids) in failed {
            self.publish_event(Event::DeliveryFailed {
                from: key.from,
                to: key.to,
                channel: key.channel,
                ids,
                reason: DeliveryFailure::Unconfirmed,
            });
        }
        let _ = self.client.flush().await;
        tracing::info!(endpoint = %self.me, "NATS endpoint stopped");
    }

    /// Opens the receiving side of a stream from `from`.
    fn open_incoming(self: &Arc<Self>, from: Ep, header: aqe_core::StreamHeader) {
        let stream = header.id;
        // Refused: no such agent here, not on that channel, a stream id in use, or too many
        // streams from that endpoint.
        let local = self.local(&header.to).filter(|local| {
            let open_here = self.in_streams.iter().filter(|s| s.key().0 == from).count();
            open_here < self.config.limits.streams_per_endpoint as usize
                && !self.in_streams.contains_key(&(from, stream))
                && local.listens(&header.options.channel).is_ok()
        });
        let Some(local) = local else {
            let _ = self.control.send(Control::To(
                from,
                Frame::StreamReset {
                    from: self.me,
                    stream,
                },
            ));
            return;
        };
        let window = self.config.limits.stream_window as usize;
        let (state, source) =
            NatsSource::open(self.clone(), from, stream, window, local.stats.clone());
        self.in_streams.insert((from, stream), state);
        let incoming = IncomingStream::new(header, source);
        local.stats.stream_delta(true);
        if let Err((_, item)) = local.inbox.deliver_now(Inbound::Stream(incoming), || {}) {
            drop(item);
        }
    }

    fn stream_data(&self, from: Ep, stream: aqe_core::StreamId, seq: u64, data: Bytes, fin: bool) {
        let outcome = match self.in_streams.get(&(from, stream)) {
            Some(s) => s.push(seq, StreamChunk { data, fin }),
            None => return,
        };
        if fin || outcome.is_err() {
            self.in_streams.remove(&(from, stream));
        }
        if outcome.is_err() {
            let _ = self.control.send(Control::To(
                from,
                Frame::StreamReset {
                    from: self.me,
                    stream,
                },
            ));
        }
    }
}

/// The control writer's name for the presence subject.
const PRESENCE: Ep = Ep(u64::MAX);

fn split_front<T>(v: &mut Vec<T>, n: usize) -> Vec<T> {
    let rest = v.split_off(n.min(v.len()));
    std::mem::replace(v, rest)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes an unanswered request and tells its responder.
struct RequestGuard<'a> {
    shared: &'a Shared,
    id: MessageId,
    to: Ep,
    answered: bool,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.shared.requests.remove(&self.id);
        if !self.answered {
            let _ = self.shared.control.send(Control::To(
                self.to,
                Frame::Cancel {
                    from: self.shared.me,
                    request: self.id,
                },
            ));
        }
    }
}

/// Confirms a reliable message to its sender's endpoint when its agent takes it (or
/// reports it dropped unread), and records what became of it in its flow. Holds the endpoint
/// weakly: a receipt in an inbox that outlives its endpoint keeps nothing alive.
struct TakeAck {
    shared: std::sync::Weak<Shared>,
    key: InKey,
    epoch: u64,
    seq: u64,
    id: MessageId,
    urgent: bool,
}

impl TakeAck {
    fn settle(self, fate: Settled) {
        if let Some(shared) = self.shared.upgrade() {
            shared.ack_settled(self.key, self.epoch, self.seq, self.id, fate, self.urgent);
        }
    }
}

impl AckOnce for TakeAck {
    fn acknowledged(self: Box<Self>) {
        self.settle(Settled::Taken);
    }

    fn abandoned(self: Box<Self>) {
        self.settle(Settled::Abandoned);
    }
}

/// Answers one request over NATS.
struct NatsResponder {
    shared: Arc<Shared>,
    requester: Ep,
    request: MessageId,
    reply: async_nats::Subject,
    cancelled: watch::Receiver<bool>,
    stats: Arc<aqe_core::plumbing::StatsRecorder>,
    answered: bool,
    expires: Instant,
}

impl NatsResponder {
    fn release(&self) {
        let mut serving = lock(&self.shared.serving);
        serving.cancels.remove(&(self.requester, self.request));
        if let Some(n) = serving.per_endpoint.get_mut(&self.requester) {
            *n = n.saturating_sub(1);
        }
    }
}

#[async_trait::async_trait]
impl Respond for NatsResponder {
    async fn respond(mut self: Box<Self>, response: Envelope) -> Result<()> {
        self.answered = true;
        self.release();
        if *self.cancelled.borrow() || Instant::now() >= self.expires {
            return Err(Error::Timeout {
                after: Duration::ZERO,
                attempts: 1,
            });
        }
        let len = response.payload.len();
        let frame = Frame::Response {
            from: self.shared.me,
            request: self.request,
            envelope: response,
        };
        let bytes = self.shared.encode_checked(&frame, len)?;
        self.shared
            .client
            .publish(self.reply.clone(), bytes)
            .await
            .map_err(|e| Error::ConnectionLost {
                addr: self.shared.server.clone(),
                source: Box::new(e),
            })?;
        self.stats.sent(len);
        Ok(())
    }

    async fn cancelled(&mut self) {
        let until = tokio::time::Instant::from_std(self.expires);
        tokio::select! {
            r = self.cancelled.wait_for(|c| *c) => {
                if r.is_err() {
                    // The endpoint stopped serving it: as good as cancelled.
                }
            }
            () = tokio::time::sleep_until(until) => {}
        }
    }
}

impl Drop for NatsResponder {
    fn drop(&mut self) {
        if !self.answered {
            self.release();
            let _ = self.shared.control.send(Control::To(
                self.requester,
                Frame::Refused {
                    from: self.shared.me,
                    request: self.request,
                    kind: RemoteErrorKind::Dropped,
                    message: "the request was dropped without an answer".to_owned(),
                },
            ));
        }
    }
}

/// The connection options `config` asks for.
async fn connect_options(
    config: &NatsConfig,
    events: broadcast::Sender<Event>,
    server: Address,
) -> Result<async_nats::ConnectOptions> {
    let mut o = async_nats::ConnectOptions::new()
        .connection_timeout(config.connection_timeout)
        .no_echo()
        .name(
            config
                .name
                .clone()
                .unwrap_or_else(|| format!("aqe {}", config.fleet)),
        )
        .event_callback(move |event| {
            let (events, server) = (events.clone(), server.clone());
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(server = %server, "NATS connected");
                        let _ = events.send(Event::ConnectionEstablished { addr: server });
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(server = %server, "NATS disconnected; reconnecting");
                        let _ = events.send(Event::ConnectionLost {
                            addr: server,
                            reason: "disconnected from the NATS server".to_owned(),
                        });
                    }
                    other => tracing::debug!(server = %server, event = %other, "NATS event"),
                }
            }
        });
    if let Some(path) = &config.credentials {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| Error::Configuration {
                file: Some(path.clone()),
                field: "credentials".to_owned(),
                message: e.to_string(),
            })?;
    }
    if let Some(t) = &config.token {
        o = o.token(t.expose().to_owned());
    }
    if let (Some(u), Some(p)) = (&config.user, &config.password) {
        o = o.user_and_password(u.clone(), p.expose().to_owned());
    }
    if config.tls.required {
        o = o.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca_path {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&config.tls.cert_path, &config.tls.key_path) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    Ok(o)
}
