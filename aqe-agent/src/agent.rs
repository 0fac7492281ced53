//! The agent: a handle users program against, whatever transport carries its messages.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use aqe_core::plumbing::{FastState, InboxSender};
use aqe_core::{
    AgentId, BroadcastOptions, BroadcastReport, ChannelName, DiscoveryOptions, Envelope, Error,
    ErrorBody, Event, Health, HealthThresholds, MessageId, MessageKind, Payload, PeerInfo,
    PeerState, RecentError, Recipient, Registration, RequestOptions, Result, SendOptions, Started,
    Stats, StreamFailure, StreamHeader, StreamId, StreamOptions, StreamSink, Timestamp, Transport,
    TransportConfig, TransportKind,
};

use crate::builder::AgentBuilder;
use crate::events::EventStream;

/// An open stream's sink, written by one call at a time. futures' lock, not tokio's: a chunk
/// takes it and gives it back, and tokio's takes its waiter list's lock on every release
/// (about 5% of a stream of 64 B chunks).
type SharedSink = Arc<futures::lock::Mutex<Box<dyn StreamSink>>>;

/// How many errors the health report keeps.
const RECENT_ERRORS: usize = 16;

/// An agent of the fleet. Cheap to clone: clones are handles to the same agent.
///
/// The agent runs until [`Agent::shutdown`]; dropping handles does not stop it, as dropping
/// a server handle does not stop a server.
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aqe_core::Result<()> {
/// use std::sync::Arc;
/// use aqe_agent::{Agent, HandlerError};
/// use aqe_core::RequestOptions;
///
/// let bus = Arc::new(aqe_eventbus::EventBus::new());
/// let analyzer = Agent::builder()
///     .id("analyzer")
///     .agent_type("coverage-analyzer")
///     .transport(bus.clone())
///     .on_request(|_agent, req| async move {
///         let threshold: u32 = req.decode()?;
///         Ok::<_, HandlerError>(format!("coverage above {threshold}%: 87%"))
///     })
///     .start()
///     .await?;
/// let executor = Agent::builder().id("executor").agent_type("test-executor").transport(bus).start().await?;
/// let report: String = executor.request_from_agent(analyzer.id(), &80u32, RequestOptions::default()).await?;
/// assert_eq!(report, "coverage above 80%: 87%");
/// executor.shutdown().await;
/// analyzer.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

/// Transports enabled at run time ([`Agent::enable`]): kind, transport and delivery
/// deadline, newest first; and the chain over them and the agent's own transport.
#[derive(Default)]
struct Enabled {
    list: Vec<(TransportKind, Started, std::time::Duration)>,
    chain: Option<Arc<crate::Fallback>>,
}

pub(crate) struct Inner {
    pub(crate) reg: Registration,
    /// What the agent's operations go through: `base`, or a chain in front of it while
    /// transports are enabled at run time ([`Agent::enable`]).
    transport: std::sync::RwLock<Arc<dyn Transport>>,
    /// The transport the agent was started on.
    base: Arc<dyn Transport>,
    /// The task passing the current transport's events on; started by the first subscriber
    /// (an agent nobody watches has no task reading every membership event).
    forwarder: Mutex<Option<JoinHandle<()>>>,
    /// The runtime the agent was started on, where its forwarder runs.
    runtime: tokio::runtime::Handle,
    /// Transports enabled at run time, newest first, and the chain of them then `base`.
    enabled: tokio::sync::Mutex<Enabled>,
    pub(crate) thresholds: HealthThresholds,
    pub(crate) started: Instant,
    pub(crate) shutdown: CancellationToken,
    /// Set once, by [`Agent::shutdown`], just before `shutdown` is cancelled. Read where every
    /// item or operation checks for shutdown: the token's own check takes a lock.
    stopping: AtomicBool,
    /// Created by the first subscriber: an agent nobody watches holds no event buffer, and
    /// builds no events.
    events: std::sync::OnceLock<broadcast::Sender<Event>>,
    event_capacity: usize,
    /// Kept to read the inbox's expiry count; the dispatcher owns the receiving side.
    pub(crate) inbox: InboxSender,
    streams: DashMap<StreamId, SharedSink, FastState>,
    recent_errors: Mutex<VecDeque<RecentError>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Handler runs that panicked (caught: the agent goes on).
    panics: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.inner.reg.id)
            .field("type", &self.inner.reg.agent_type)
            .field("transport", &self.transport().kind())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts describing a new agent.
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    pub(crate) fn new(
        reg: Registration,
        transport: Arc<dyn Transport>,
        thresholds: HealthThresholds,
        inbox: InboxSender,
        event_capacity: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                reg,
                transport: std::sync::RwLock::new(transport.clone()),
                base: transport,
                forwarder: Mutex::new(None),
                runtime: tokio::runtime::Handle::current(),
                enabled: tokio::sync::Mutex::new(Enabled::default()),
                thresholds,
                started: Instant::now(),
                shutdown: CancellationToken::new(),
                stopping: AtomicBool::new(false),
                events: std::sync::OnceLock::new(),
                event_capacity: event_capacity.max(1),
                inbox,
                streams: DashMap::default(),
                recent_errors: Mutex::new(VecDeque::with_capacity(RECENT_ERRORS)),
                tasks: Mutex::new(Vec::new()),
                panics: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn own_task(&self, task: JoinHandle<()>) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// This agent's id.
    pub fn id(&self) -> &AgentId {
        &self.inner.reg.id
    }

    /// The transport this agent's operations go through now (shared with the other agents
    /// of its endpoint): the one it was started on, or, while QUIC is enabled at run time,
    /// the chain QUIC then that one.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.inner
            .transport
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the transport `config` describes and puts it in front of this agent's
    /// transports, at run time (the guide's `enableQUIC()`: `agent.enable(quic_config)`):
    /// operations try it first and fall back to the others as
    /// [`crate::FallbackPolicy::default`] says. Emits [`Event::TransportEnabled`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] when a transport of that kind is enabled already; what
    /// starting it meets (configuration, certificates, the port).
    pub async fn enable(&self, config: impl TransportConfig) -> Result<()> {
        let mut enabled = self.inner.enabled.lock().await;
        let kind = config.kind();
        if enabled.list.iter().any(|(k, _, _)| *k == kind) {
            return Err(Error::Unsupported {
                operation: "enabling a transport twice (disable it first)",
            });
        }
        if self.is_shut_down() {
            return Err(Error::Shutdown);
        }
        let started = config.start().await?;
        // Attached to it (the agent is attached to the others already).
        if let Err(e) = started
            .transport
            .attach(self.inner.reg.clone(), self.inner.inbox.clone())
            .await
        {
            started.transport.shutdown().await;
            return Err(e);
        }
        enabled
            .list
            .insert(0, (kind, started, config.delivery_deadline()));
        self.rechain(&mut enabled).await;
        self.emit(Event::TransportEnabled { kind });
        tracing::info!(agent = %self.id(), transport = %kind, "transport enabled");
        Ok(())
    }

    /// Takes the transport of `kind` enabled at run time away again (the guide's
    /// `disableQUIC()`): new operations go through the others at once; what the agent sent
    /// over it is given up to its delivery deadline to be confirmed (unconfirmed messages
    /// are redelivered over the others, never dropped silently); then it closes. Emits
    /// [`Event::TransportDisabled`]. Does nothing when no such transport is enabled.
    pub async fn disable(&self, kind: TransportKind) {
        let mut enabled = self.inner.enabled.lock().await;
        let Some(i) = enabled.list.iter().position(|(k, _, _)| *k == kind) else {
            return;
        };
        let (_, gone, deadline) = enabled.list.remove(i);
        let old_chain = enabled.chain.take();
        self.rechain(&mut enabled).await;
        drop(enabled);
        // What went out over it settles first: confirmed, or handed to the next link.
        let until = Instant::now() + deadline;
        while gone.transport.stats(self.id()).messages_unconfirmed > 0
            && Instant::now() < until
            && !self.is_shut_down()
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let _ = gone.transport.detach(self.id()).await;
        gone.transport.shutdown().await;
        if let Some(chain) = old_chain {
            chain.close().await;
        }
        self.emit(Event::TransportDisabled { kind });
        tracing::info!(agent = %self.id(), transport = %kind, "transport disabled");
    }

    /// The transport of type `T` (`aqe_quic::QuicTransport`) enabled at run time, if one is.
    pub async fn enabled<T: Clone + 'static>(&self) -> Option<T> {
        self.inner
            .enabled
            .lock()
            .await
            .list
            .iter()
            .find_map(|(_, s, _)| s.as_type::<T>().cloned())
    }

    /// Makes the agent's transport the chain of what is enabled, then `base` (or `base`
    /// alone), and closes the chain it replaces (unless the caller took it).
    async fn rechain(&self, enabled: &mut Enabled) {
        let next: Arc<dyn Transport> = match enabled.list.split_first() {
            None => self.inner.base.clone(),
            Some(((_, first, _), rest)) => {
                let mut b = crate::Fallback::chain(first.transport.clone());
                for (_, s, _) in rest {
                    b = b.then(s.transport.clone(), crate::FallbackPolicy::default());
                }
                let chain = b
                    .then(self.inner.base.clone(), crate::FallbackPolicy::default())
                    .build();
                chain.adopt(&self.inner.reg);
                let old = enabled.chain.replace(chain.clone());
                if let Some(old) = old {
                    old.close().await;
                }
                chain
            }
        };
        if enabled.list.is_empty()
            && let Some(old) = enabled.chain.take()
        {
            old.close().await;
        }
        self.forward_from(&next);
        *self
            .inner
            .transport
            .write()
            .unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// Passes `transport`'s events on to this agent's subscribers, instead of the previous
    /// transport's; nothing while nobody has subscribed.
    pub(crate) fn forward_from(&self, transport: &Arc<dyn Transport>) {
        if self.inner.events.get().is_none() || self.is_shut_down() {
            return;
        }
        let task = self.inner.runtime.spawn(crate::dispatch::forward_events(
            self.clone(),
            transport.subscribe(),
        ));
        let old = self
            .inner
            .forwarder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// What this agent declared: type, capabilities, channels, labels.
    pub fn registration(&self) -> &Registration {
        &self.inner.reg
    }

    /// Publishes an event to this agent's subscribers.
    pub(crate) fn emit(&self, event: Event) {
        if let Some(tx) = self.inner.events.get() {
            let _ = tx.send(event);
        }
    }

    /// Whether anyone subscribes to this agent's events (else per-message events are not
    /// even built).
    pub(crate) fn watched(&self) -> bool {
        self.inner
            .events
            .get()
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// Runs `op` unless the agent is shut down or shuts down meanwhile, and keeps any error
    /// for the health report.
    async fn guarded<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        if self.is_shut_down() {
            return Err(Error::Shutdown);
        }
        // The operation first: one that completes at once (a send with room) never registers
        // with the shutdown token.
        let res = tokio::select! {
            biased;
            r = op => r,
            () = self.inner.shutdown.cancelled() => Err(Error::Shutdown),
        };
        if let Err(e) = &res {
            self.note_error(e);
        }
        res
    }

    /// A handler panicked (caught by the dispatcher): counted, kept among the recent errors,
    /// and reported by [`Agent::health`].
    pub(crate) fn handler_panicked(&self, kind: &str, message: &str, from: &AgentId) {
        self.inner.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(agent = %self.id(), %from, handler = kind, panic = message, "a handler panicked");
        self.note_error(&format!(
            "the {kind} handler panicked on input from {from}: {message}"
        ));
    }

    pub(crate) fn note_error(&self, e: &dyn std::fmt::Display) {
        let mut q = self
            .inner
            .recent_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if q.len() == RECENT_ERRORS {
            q.pop_front();
        }
        q.push_back(RecentError {
            at: Timestamp::now(),
            message: e.to_string(),
        });
    }

    fn envelope(
        &self,
        to: Recipient,
        channel: &ChannelName,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<Envelope> {
        self.envelope_of(to, channel, kind, Payload::raw(payload))
            .map(|mut e| {
                e.encoding = aqe_core::Encoding::Postcard;
                e
            })
    }

    fn envelope_of(
        &self,
        to: Recipient,
        channel: &ChannelName,
        kind: MessageKind,
        payload: Payload,
    ) -> Result<Envelope> {
        let ch = self
            .inner
            .reg
            .check_outgoing(channel, payload.bytes.len())?;
        let mut env = Envelope::new(self.id().clone(), to, channel.clone(), kind, Bytes::new())
            .with_payload(payload)
            .with_priority(ch.priority);
        env.ttl = ch.ttl_ms.map(std::time::Duration::from_millis);
        env.trace = crate::trace::current_trace().map(Box::new);
        Ok(env)
    }

    /// A one-way message to one agent.
    fn direct<T: Serialize + ?Sized>(
        &self,
        to: &AgentId,
        payload: &T,
        channel: &ChannelName,
    ) -> Result<Envelope> {
        self.envelope(
            Recipient::Agent(to.clone()),
            channel,
            MessageKind::Direct,
            aqe_core::encode(payload)?,
        )
    }

    /// Sends `payload` to one agent on `channel`, and returns the message's id.
    ///
    /// On a reliable channel, `Ok` means the message was accepted for delivery: it then ends
    /// either taken by the receiving agent, or reported in an [`Event::DeliveryFailed`]
    /// naming this id (and counted in `Stats::messages_failed`).
    /// [`Agent::send_confirmed`] waits for the first.
    ///
    /// # Errors
    /// [`Error::ChannelNotFound`] (this agent or the peer lacks the channel),
    /// [`Error::MessageTooLarge`], [`Error::PeerNotFound`], [`Error::SendFailed`] (a reliable
    /// channel's receiver stayed full), connection errors, [`Error::Shutdown`]. After an
    /// error, the message was not accepted: nothing else will be reported about it.
    pub async fn send_to_agent<T: Serialize + ?Sized>(
        &self,
        to: &AgentId,
        payload: &T,
        channel: impl Into<ChannelName>,
    ) -> Result<MessageId> {
        let channel = channel.into();
        self.guarded(async {
            let env = self.direct(to, payload, &channel)?;
            let id = env.id;
            self.transport().send(env).await.map(|()| id)
        })
        .await
    }

    /// Sends `payload` to one agent as `options` say: on their channel, with a time-to-live,
    /// and waiting for the receipt when `confirm` is set. Returns the message's id.
    ///
    /// # Errors
    /// As [`Agent::send_to_agent`], or [`Agent::send_confirmed`] when `confirm` is set.
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> aqe_core::Result<()> {
    /// # use std::{sync::Arc, time::Duration};
    /// # use aqe_agent::prelude::*;
    /// # let bus = Arc::new(aqe_agent::EventBus::new());
    /// let worker = Agent::builder().id("worker").agent_type("w").transport(bus.clone())
    ///     .on_message(|_, _| async {}).start().await?;
    /// let boss = Agent::builder().agent_type("boss").transport(bus).start().await?;
    /// // Worth doing within a second, or not at all.
    /// let opts = SendOptions::on("coordination").ttl(Duration::from_secs(1));
    /// boss.send_with(worker.id(), &"tick", opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_with<T: Serialize + ?Sized>(
        &self,
        to: &AgentId,
        payload: &T,
        options: SendOptions,
    ) -> Result<MessageId> {
        self.guarded(async {
            let mut env = self.direct(to, payload, &options.channel)?;
            if options.ttl.is_some() {
                env.ttl = options.ttl;
            }
            let id = env.id;
            if options.confirm {
                self.transport().send_confirmed(env).await.map(|()| id)
            } else {
                self.transport().send(env).await.map(|()| id)
            }
        })
        .await
    }

    /// Sends many messages to one agent on `channel`, in order, handed over together: as
    /// [`Agent::send_to_agent`] for each, at a fraction of the cost per message (the
    /// transport admits a window's worth at a time, encodes it into one write and counts it
    /// once). Returns their ids, in order.
    ///
    /// # Errors
    /// As [`Agent::send_to_agent`] when none was accepted; [`Error::PartlyAccepted`] when
    /// the first ones were (as many as it says: those are then settled and reported as any
    /// accepted message) and the rest were not.
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> aqe_core::Result<()> {
    /// # use std::sync::Arc;
    /// # let bus = Arc::new(aqe_agent::EventBus::new());
    /// let worker = aqe_agent::Agent::builder().id("worker").agent_type("w").transport(bus.clone())
    ///     .on_message(|_, _| async {}).start().await?;
    /// let boss = aqe_agent::Agent::builder().agent_type("boss").transport(bus).start().await?;
    /// let ids = boss.send_many(worker.id(), 0..100u32, "coordination").await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(()) }
    /// ```
    pub async fn send_many<T: Serialize>(
        &self,
        to: &AgentId,
        payloads: impl IntoIterator<Item = T>,
        channel: impl Into<ChannelName>,
    ) -> Result<Vec<MessageId>> {
        let channel = channel.into();
        self.guarded(async {
            // Every message is built before any is sent: a bad one stops the batch before it
            // starts. The channel is looked up and the clock read once per batch.
            let template = self.envelope(
                Recipient::Agent(to.clone()),
                &channel,
                MessageKind::Direct,
                Bytes::new(),
            )?;
            let ch = self.inner.reg.check_outgoing(&channel, 0)?;
            // Small payloads share their buffers: an allocation per 64 KiB, not per message.
            let values: Vec<T> = payloads.into_iter().collect();
            let mut envelopes = Vec::with_capacity(values.len());
            for payload in aqe_core::encode_each(&values)? {
                ch.check_size(payload.len())?;
                let mut e = template.clone();
                e.id = MessageId::next();
                e.payload = payload;
                envelopes.push(e);
            }
            let ids = envelopes.iter().map(|e| e.id).collect();
            self.transport().send_many(envelopes).await.map(|()| ids)
        })
        .await
    }

    /// Sends `payload` to one agent on a reliable `channel`, and returns once that agent has
    /// taken it (its message handler returned, or it has none). Where [`Agent::send_to_agent`]
    /// returns once the message is accepted for delivery, this waits for the receipt.
    ///
    /// # Errors
    /// As [`Agent::send_to_agent`]; [`Error::DeliveryFailed`] when the message was accepted
    /// but not delivered (the reason says whether it may have been processed);
    /// [`Error::Unsupported`] on an unreliable channel, where nothing is acknowledged.
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> aqe_core::Result<()> {
    /// # use std::sync::Arc;
    /// # let bus = Arc::new(aqe_agent::EventBus::new());
    /// let worker = aqe_agent::Agent::builder().id("worker").agent_type("w").transport(bus.clone())
    ///     .on_message(|_, _| async {}).start().await?;
    /// let boss = aqe_agent::Agent::builder().agent_type("boss").transport(bus).start().await?;
    /// boss.send_confirmed(worker.id(), &"do it", "coordination").await?; // worker has it now
    /// # Ok(()) }
    /// ```
    pub async fn send_confirmed<T: Serialize + ?Sized>(
        &self,
        to: &AgentId,
        payload: &T,
        channel: impl Into<ChannelName>,
    ) -> Result<()> {
        let channel = channel.into();
        self.guarded(async {
            let env = self.direct(to, payload, &channel)?;
            self.transport().send_confirmed(env).await
        })
        .await
    }

    /// Sends a payload in the encoding it carries (JSON, raw bytes, postcard) to one agent,
    /// as [`Agent::send_to_agent`] does a typed value.
    ///
    /// # Errors
    /// As [`Agent::send_to_agent`].
    pub async fn send_payload(
        &self,
        to: &AgentId,
        payload: Payload,
        channel: impl Into<ChannelName>,
    ) -> Result<MessageId> {
        self.send_payload_with(to, payload, SendOptions::on(channel))
            .await
    }

    /// [`Agent::send_payload`] with [`SendOptions`], as [`Agent::send_with`] for a typed
    /// value.
    ///
    /// # Errors
    /// As [`Agent::send_with`].
    pub async fn send_payload_with(
        &self,
        to: &AgentId,
        payload: Payload,
        options: SendOptions,
    ) -> Result<MessageId> {
        self.guarded(async {
            let mut env = self.envelope_of(
                Recipient::Agent(to.clone()),
                &options.channel,
                MessageKind::Direct,
                payload,
            )?;
            if options.ttl.is_some() {
                env.ttl = options.ttl;
            }
            let id = env.id;
            if options.confirm {
                self.transport().send_confirmed(env).await.map(|()| id)
            } else {
                self.transport().send(env).await.map(|()| id)
            }
        })
        .await
    }

    /// Sends a request carrying a payload in its own encoding and returns the response's
    /// envelope, whose [`Envelope::decode`] follows the encoding the responder chose.
    ///
    /// # Errors
    /// As [`Agent::request_from_agent`], except that the response is not decoded.
    pub async fn request_payload(
        &self,
        to: &AgentId,
        payload: Payload,
        options: RequestOptions,
    ) -> Result<Envelope> {
        self.guarded(self.request_envelope(to, payload, &options))
            .await
    }

    /// Sends a request and returns the decoded response, retrying after timeouts and
    /// unreachable peers as `options` say. Each retry is a new request; a fallback transport
    /// re-sending after a timeout uses the same request, so the responder's handler runs
    /// once.
    ///
    /// # Errors
    /// [`Error::Timeout`] after the last attempt; [`Error::Remote`] when the peer's handler
    /// failed, had no handler, or could not decode the request; [`Error::Malformed`] when the
    /// response is not a `Resp`; [`Error::Shutdown`] if this agent shuts down meanwhile; and
    /// the errors of [`Agent::send_to_agent`].
    pub async fn request_from_agent<Req, Resp>(
        &self,
        to: &AgentId,
        payload: &Req,
        options: RequestOptions,
    ) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.guarded(async {
            let rsp = self
                .request_envelope(to, Payload::postcard(payload)?, &options)
                .await?;
            rsp.decode()
        })
        .await
    }

    /// One request with its retries; the response envelope (errors turned into `Err`).
    async fn request_envelope(
        &self,
        to: &AgentId,
        payload: Payload,
        options: &RequestOptions,
    ) -> Result<Envelope> {
        let attempts = options.retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            let env = self.envelope_of(
                Recipient::Agent(to.clone()),
                &options.channel,
                MessageKind::Request,
                payload.clone(),
            )?;
            let span = tracing::debug_span!(
                "request",
                id = %env.id,
                to = %to,
                channel = %options.channel,
                attempt,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            if let Some(t) = &env.trace {
                span.record("trace_id", t.trace_id_hex());
                span.record("span_id", t.parent_id_hex());
            }
            let sent = tracing::Instrument::instrument(
                self.transport().request(env, options.timeout),
                span.clone(),
            )
            .await;
            tracing::debug!(parent: &span, ok = sent.is_ok(), "request ended");
            match sent {
                Ok(rsp) if rsp.kind == MessageKind::Error => {
                    let body: ErrorBody = rsp.decode()?;
                    if body.kind == aqe_core::RemoteErrorKind::Busy {
                        return Err(Error::Busy { peer: rsp.from });
                    }
                    return Err(Error::Remote {
                        agent: rsp.from,
                        kind: body.kind,
                        message: body.message,
                    });
                }
                Ok(rsp) => return Ok(rsp),
                Err(e) if e.is_unreachable() && attempt < attempts => {
                    tracing::debug!(agent = %self.id(), peer = %to, attempt, error = %e, "request attempt failed, retrying");
                    self.note_error(&e);
                    tokio::time::sleep(options.retry_delay).await;
                    attempt += 1;
                }
                Err(Error::Timeout { after, .. }) => {
                    return Err(Error::Timeout {
                        after,
                        attempts: attempt,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `payload` to every peer on the options' channel (a broadcast channel) that the
    /// include/exclude lists admit, concurrently, and reports who got it.
    ///
    /// # Errors
    /// [`Error::WrongChannelKind`] on a unicast channel, [`Error::ChannelNotFound`],
    /// [`Error::MessageTooLarge`], [`Error::Shutdown`]. Per-peer failures are in the report.
    pub async fn broadcast_to_fleet<T: Serialize + ?Sized>(
        &self,
        payload: &T,
        options: BroadcastOptions,
    ) -> Result<BroadcastReport> {
        self.broadcast_payload(Payload::postcard(payload)?, options)
            .await
    }

    /// Like [`Agent::broadcast_to_fleet`], with a payload in the encoding it carries.
    ///
    /// # Errors
    /// As [`Agent::broadcast_to_fleet`].
    pub async fn broadcast_payload(
        &self,
        payload: Payload,
        options: BroadcastOptions,
    ) -> Result<BroadcastReport> {
        self.guarded(async {
            let env = self.envelope_of(
                Recipient::Fleet,
                &options.channel,
                MessageKind::Broadcast,
                payload,
            )?;
            let targets: Vec<AgentId> = self
                .transport()
                .agents_on(&options.channel)
                .into_iter()
                .filter(|id| id != self.id() && options.admits(id))
                .collect();
            // Explicitly included peers that are unknown are reported as failures, not ignored.
            let mut targets = targets;
            if let Some(include) = &options.include {
                for id in include {
                    if !targets.contains(id) && id != self.id() && !options.exclude.contains(id) {
                        targets.push(id.clone());
                    }
                }
            }
            if options.confirm {
                self.transport().broadcast_confirmed(env, &targets).await
            } else {
                self.transport().broadcast(env, &targets).await
            }
        })
        .await
    }

    /// Opens a stream to `to`. Write with [`Agent::write_stream`], end with a final write or
    /// [`Agent::close_stream`]. The receiver's stream handler sees the open, the data in
    /// order, then the end.
    ///
    /// # Errors
    /// As [`Agent::send_to_agent`], for the options' channel.
    pub async fn open_stream(&self, to: &AgentId, options: StreamOptions) -> Result<StreamId> {
        self.guarded(async {
            self.inner.reg.check_outgoing(&options.channel, 0)?;
            let id = StreamId::next();
            // Refused here, at once, when the receiver is known to take no streams.
            let takes_none = self.transport().peers().into_iter().any(|p| {
                &p.id == to
                    && !p
                        .capabilities
                        .iter()
                        .any(|c| c.as_str() == aqe_core::STREAM_CAPABILITY)
            });
            if takes_none {
                return Err(Error::Stream {
                    stream: id,
                    reason: StreamFailure::NotTaken,
                });
            }
            let header = StreamHeader {
                id,
                from: self.id().clone(),
                to: to.clone(),
                options,
            };
            let sink = self.transport().open_stream(header).await?;
            self.inner
                .streams
                .insert(id, Arc::new(futures::lock::Mutex::new(sink)));
            Ok(id)
        })
        .await
    }

    /// Writes to a stream this agent opened; `fin` makes this the last write.
    ///
    /// # Errors
    /// [`Error::Stream`] with [`StreamFailure::Unknown`] for a stream that is not open (never
    /// opened, already finished or closed), [`StreamFailure::ClosedByPeer`] when the receiver
    /// went away, [`Error::MessageTooLarge`] for data above the channel's limit.
    pub async fn write_stream(
        &self,
        stream: StreamId,
        data: impl Into<Bytes>,
        fin: bool,
    ) -> Result<()> {
        let mut data = data.into();
        // A chunk the stream takes at once is written here, without the waiting machinery
        // below: this future stays small (callers move it whole, chunk after chunk).
        if !fin
            && !self.is_shut_down()
            && let Ok(sink) = self.stream_sink(stream)
            && let Some(mut sink) = sink.try_lock()
        {
            match sink.try_write(data) {
                Ok(res) => {
                    drop(sink);
                    self.wrote(stream, false, &res);
                    if let Err(e) = &res {
                        self.note_error(e);
                    }
                    return res;
                }
                Err(back) => data = back,
            }
        }
        Box::pin(self.write_stream_waiting(stream, data, fin)).await
    }

    /// [`Agent::write_stream`] when the chunk has to wait (for room, for the stream's lock)
    /// or ends the stream.
    async fn write_stream_waiting(&self, stream: StreamId, data: Bytes, fin: bool) -> Result<()> {
        self.guarded(async {
            let sink = self.stream_sink(stream)?;
            let mut sink = match sink.try_lock() {
                Some(sink) => sink,
                None => sink.lock().await,
            };
            let res = sink.write(data, fin).await;
            drop(sink);
            self.wrote(stream, fin, &res);
            res
        })
        .await
    }

    /// A stream that ended (its final write, or a stream error) leaves the table.
    fn wrote(&self, stream: StreamId, fin: bool, res: &Result<()>) {
        if fin || matches!(res, Err(Error::Stream { .. })) {
            self.inner.streams.remove(&stream);
        }
    }

    /// Ends a stream this agent opened.
    ///
    /// # Errors
    /// [`Error::Stream`] with [`StreamFailure::Unknown`] for a stream that is not open.
    pub async fn close_stream(&self, stream: StreamId) -> Result<()> {
        self.guarded(async {
            let (_, sink) = self.inner.streams.remove(&stream).ok_or(Error::Stream {
                stream,
                reason: StreamFailure::Unknown,
            })?;
            sink.lock().await.close().await
        })
        .await
    }

    fn stream_sink(&self, stream: StreamId) -> Result<SharedSink> {
        self.inner
            .streams
            .get(&stream)
            .map(|s| s.value().clone())
            .ok_or(Error::Stream {
                stream,
                reason: StreamFailure::Unknown,
            })
    }

    /// The peers the transport knows, other than this agent, as the options select them.
    pub fn discover_peers(&self, options: &DiscoveryOptions) -> Vec<PeerInfo> {
        let peers = self
            .transport()
            .peers()
            .into_iter()
            .filter(|p| &p.id != self.id())
            .collect();
        options.select(peers)
    }

    /// The links of the transports it uses to other endpoints, as they measure them.
    pub fn links(&self) -> Vec<aqe_core::LinkReport> {
        self.transport().links()
    }

    /// Items waiting in the agent's inbox now.
    pub fn inbox_depth(&self) -> usize {
        self.inner.inbox.waiting()
    }

    /// Traffic statistics of this agent, over every transport it uses.
    pub fn stats(&self) -> Stats {
        let mut s = self.transport().stats(self.id());
        s.uptime = self.inner.started.elapsed();
        s.messages_dropped += self.inner.inbox.expired();
        s
    }

    /// The agent's health, judged against its thresholds.
    pub fn health(&self) -> Health {
        let stats = self.stats();
        let connected = self
            .transport()
            .peers()
            .iter()
            .filter(|p| &p.id != self.id() && p.state == PeerState::Connected)
            .count();
        let errors = self
            .inner
            .recent_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut health = Health::assess(
            &stats,
            !self.is_shut_down(),
            connected,
            self.inner.reg.channels.len(),
            errors,
            &self.inner.thresholds,
        );
        let panics = self.inner.panics.load(Ordering::Relaxed);
        if panics > 0 && health.status == aqe_core::HealthStatus::Healthy {
            health.status = aqe_core::HealthStatus::Degraded;
            health.message = format!(
                "{panics} handler run(s) panicked (the agent goes on); {}",
                health.message
            );
        }
        health
    }

    /// Subscribes to this agent's events, from now on.
    pub fn events(&self) -> EventStream {
        let first = self.inner.events.get().is_none();
        let tx = self
            .inner
            .events
            .get_or_init(|| broadcast::channel(self.inner.event_capacity).0);
        let stream = EventStream::new(tx.subscribe(), self.inner.shutdown.clone());
        if first {
            // From now on, the transport's events reach this agent's subscribers too.
            self.forward_from(&self.transport());
        }
        stream
    }

    /// Whether [`Agent::shutdown`] has been called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    /// Stops the agent: calls in flight fail with [`Error::Shutdown`], handlers still running
    /// are cancelled (their requesters get an error response), open streams are closed, the
    /// agent leaves its transport, and every task it started has ended when this returns.
    /// Calling it again does nothing.
    pub async fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.shutdown.cancel();
        // Wakes the dispatcher, which waits on the inbox alone (see `dispatch::run`).
        self.inner.inbox.close();
        if let Err(e) = self.transport().detach(self.id()).await {
            tracing::debug!(agent = %self.id(), error = %e, "detach on shutdown");
        }
        let streams: Vec<_> = self.inner.streams.iter().map(|s| *s.key()).collect();
        for id in streams {
            if let Some((_, sink)) = self.inner.streams.remove(&id) {
                let _ = sink.lock().await.close().await;
            }
        }
        let enabled = std::mem::take(&mut *self.inner.enabled.lock().await);
        for (_, started, _) in enabled.list {
            let _ = started.transport.detach(self.id()).await;
            started.transport.shutdown().await;
        }
        if let Some(chain) = enabled.chain {
            chain.close().await;
        }
        let mut tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tasks.extend(
            self.inner
                .forwarder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(agent = %self.id(), error = %e, "agent task ended abnormally");
            }
        }
        tracing::debug!(agent = %self.id(), "agent shut down");
    }
}
