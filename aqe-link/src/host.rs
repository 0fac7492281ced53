//! [`Host`]: the [`Transport`] of any wire, over sessions.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::plumbing::{InboxSender, LocalAgent, LocalDelivery};
use aqe_core::{
    Address, AgentId, BroadcastReport, Channel, ChannelName, Envelope, Error, Event, PeerInfo,
    PeerState, Redeliver, Registration, RemoteErrorKind, Result, RttStats, SendFailure, Stats,
    StreamHeader, StreamSink, Transport, TransportKind,
};
use aqe_session::{
    Answer, Budgets, Config, EndpointId, Frame, Hello, MessageMeta, Rank, Refusal, SESSION_VERSION,
    Trust, fanout_meta, message_meta, outgoing,
};

use crate::cell::{Cell, Shared, lock};
use crate::ctx::{Confirm, MsgCtx, ReqCtx};
use crate::introspect::{Reporter, endpoint_agent, endpoint_of};
use crate::locals::Locals;
use crate::node::{Command, NodeTask, Open, Tables, Way};
use crate::{Link, Wire};

/// How long a shutting-down host waits for the unreliable messages its links still queue.
const FLUSH_WAIT: Duration = Duration::from_millis(250);

/// Who may read this endpoint's report ([`crate::endpoint_agent`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Introspection {
    /// Peers that proved their key with a certificate (mutual TLS): the default.
    #[default]
    Verified,
    /// Any authenticated peer (a token holder included).
    Authenticated,
    /// Peers that proved one of these keys.
    Keys(Vec<u64>),
    /// Nobody.
    Nobody,
}

/// What a host is told.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The session layer's limits, timers and wire policy.
    pub session: Config,
    /// How long a send may wait for room (a full window) or for a link to be made.
    pub send_timeout: Duration,
    /// Who may read the endpoint's report.
    pub introspection: Introspection,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            session: Config::default(),
            send_timeout: Duration::from_secs(5),
            introspection: Introspection::default(),
        }
    }
}

/// A link that passed its hello checks, for [`Host::open`].
pub struct Opening {
    /// The peer's hello (its `listen` with the IP its link comes from).
    pub hello: Hello,
    /// How both sides know the session.
    pub rank: Rank,
    /// What the peer proved.
    pub trust: Trust,
    /// The link.
    pub link: Arc<dyn Link>,
}

/// A session a wire feeds (see [`Host::open`]).
#[derive(Clone)]
pub struct SessionHandle(Arc<Cell>);

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.0.id)
            .field("peer", &self.0.peer)
            .finish()
    }
}

impl SessionHandle {
    /// The peer.
    pub fn peer(&self) -> EndpointId {
        self.0.peer
    }

    /// How both sides know it.
    pub fn rank(&self) -> Rank {
        self.0.rank
    }

    /// What the peer proved.
    pub fn trust(&self) -> Trust {
        self.0.trust
    }

    /// Whether it lives.
    pub fn is_live(&self) -> bool {
        self.0.is_live()
    }
}

struct Inner {
    me: EndpointId,
    address: Address,
    config: HostConfig,
    wire: Arc<dyn Wire>,
    shared: Arc<Shared>,
    tables: Arc<Tables>,
    commands: mpsc::Sender<Command>,
    local: LocalDelivery,
    stop: CancellationToken,
    tasks: TaskTracker,
    closed: std::sync::atomic::AtomicBool,
    node_task: Mutex<Option<NodeTask>>,
    node_rx: Mutex<Option<mpsc::Receiver<Command>>>,
    budget: Arc<Budgets>,
}

/// The transport of a wire: it hosts agents, runs a session per peer incarnation, and
/// implements [`Transport`] over them. Cloning gives another handle to the same endpoint.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("me", &self.inner.me)
            .field("kind", &self.inner.wire.kind())
            .finish_non_exhaustive()
    }
}

/// A handle to a host that does not keep it alive (for a wire, which the host owns).
#[derive(Clone, Default)]
pub struct WeakHost(std::sync::Weak<Inner>);

impl WeakHost {
    /// The host, if it still exists.
    pub fn upgrade(&self) -> Option<Host> {
        self.0.upgrade().map(|inner| Host { inner })
    }
}

impl std::fmt::Debug for WeakHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakHost")
    }
}

/// A fresh incarnation for an endpoint starting now: microseconds since the Unix epoch,
/// made unique (and growing) within the process.
pub fn fresh_incarnation() -> u64 {
    use std::sync::atomic::AtomicU64;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1);
    let prev = LAST
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(0);
    now.max(prev + 1)
}

impl Host {
    /// A handle that does not keep the host alive.
    pub fn downgrade(&self) -> WeakHost {
        WeakHost(Arc::downgrade(&self.inner))
    }

    /// A host for endpoint `me`, known to others at `address`, over `wire`. Its tasks start
    /// with [`Host::start`].
    pub fn new(me: EndpointId, address: Address, wire: Arc<dyn Wire>, config: HostConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        let (introspect, intro_rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            locals: Locals::new(endpoint_agent(me)),
            events: events.clone(),
            attention: Mutex::default(),
            attention_wake: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
            introspect,
        });
        let tables = Arc::new(Tables::default());
        let (commands, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let session = Arc::new(config.session.clone());
        let budget = Arc::new(Budgets::new(&config.session));
        let node = NodeTask {
            node: aqe_session::Node::new(me, address.clone(), session.clone()),
            config: session,
            budget: budget.clone(),
            shared: shared.clone(),
            tables: tables.clone(),
            wire: wire.clone(),
            commands: commands.clone(),
            tasks: tasks.clone(),
            stop: stop.clone(),
            handler: None,
        };
        let reporter = Reporter {
            me,
            policy: config.introspection.clone(),
            shared: shared.clone(),
            tables: tables.clone(),
            wire: wire.clone(),
            started: Instant::now(),
        };
        tasks.spawn(reporter.run(intro_rx, stop.clone()));
        let local = LocalDelivery::new(events, config.send_timeout, 64);
        Self {
            inner: Arc::new(Inner {
                me,
                address,
                config,
                wire,
                shared,
                tables,
                commands,
                local,
                stop,
                tasks,
                closed: std::sync::atomic::AtomicBool::new(false),
                node_task: Mutex::new(Some(node)),
                node_rx: Mutex::new(Some(rx)),
                budget,
            }),
        }
    }

    /// Starts the node task (once; later calls do nothing).
    pub fn start(&self) {
        let task = lock(&self.inner.node_task).take();
        let rx = lock(&self.inner.node_rx).take();
        if let (Some(task), Some(rx)) = (task, rx) {
            self.inner.tasks.spawn(task.run(rx));
        }
    }

    /// This endpoint.
    pub fn me(&self) -> EndpointId {
        self.inner.me
    }

    /// The options it runs with.
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    /// This endpoint's hello, with `nonce`, announcing `listen` and presenting `token`.
    pub fn hello(
        &self,
        nonce: u64,
        listen: Option<std::net::SocketAddr>,
        token: Option<String>,
    ) -> Hello {
        let c = &self.inner.config.session;
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Hello {
            version: SESSION_VERSION,
            endpoint: self.inner.me,
            nonce,
            listen,
            token,
            window: c.window,
            session_bytes: c.session_bytes,
            heartbeat_ms: ms(c.heartbeat),
            liveness_ms: ms(c.liveness),
        }
    }

    fn live(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    async fn command<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(make(tx))
            .await
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    // ----- for wires -----

    /// A link passed its hello: the session it makes. `None` when the node refuses it (a
    /// session of smaller rank with that peer lives: close the link).
    pub async fn open(&self, opening: Opening) -> Option<SessionHandle> {
        if self.live().is_err() {
            return None;
        }
        let open = Box::new(Open {
            hello: opening.hello,
            rank: opening.rank,
            trust: opening.trust,
            link: opening.link,
        });
        self.command(|tx| Command::Open(open, tx))
            .await
            .ok()
            .flatten()
            .map(SessionHandle)
    }

    /// Frames that arrived over `session`'s link, in order.
    ///
    /// # Errors
    /// The rule a frame broke: the session ends and the link must close.
    pub fn frames(
        &self,
        session: &SessionHandle,
        frames: impl IntoIterator<Item = Frame>,
    ) -> std::result::Result<(), &'static str> {
        session.0.pump(&self.inner.shared, |s, locals| {
            let now = Instant::now();
            for f in frames {
                s.on_frame(f, now, locals)?;
            }
            Ok(())
        })
    }

    /// `session` is over for `why`, as its wire learned: its link went away
    /// ([`Ended::LinkLost`](aqe_session::Ended::LinkLost)), the peer said goodbye or reset
    /// it, or sent what does not decode (a violation, which closes the link).
    pub fn end(&self, session: &SessionHandle, why: aqe_session::Ended) {
        session.0.pump(&self.inner.shared, |s, _| s.end(why));
    }

    /// The generation of this endpoint's membership, for a wire's shared heartbeat.
    pub fn generation(&self) -> u64 {
        self.inner.tables.generation.load(Ordering::Acquire)
    }

    /// The peer's shared heartbeat (wires without per-session pings): it lives, its
    /// membership is at `generation`.
    pub fn alive(&self, session: &SessionHandle, generation: u64) {
        session.0.pump(&self.inner.shared, |s, _| {
            s.alive(generation, Instant::now())
        });
    }

    /// The session with `endpoint`, if one lives.
    pub fn session_of(&self, endpoint: &EndpointId) -> Option<SessionHandle> {
        self.inner
            .tables
            .cell_of(endpoint)
            .filter(|c| c.is_live())
            .map(SessionHandle)
    }

    /// Every session that lives.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.inner
            .tables
            .cells()
            .into_iter()
            .filter(|c| c.is_live())
            .map(SessionHandle)
            .collect()
    }

    /// Waits, at most [`FLUSH_WAIT`], until the live links have sent the unreliable
    /// messages they queue.
    async fn flush(&self) {
        let links: Vec<Arc<dyn Link>> = self
            .sessions()
            .into_iter()
            .map(|s| s.0.link.clone())
            .collect();
        let _ = tokio::time::timeout(
            FLUSH_WAIT,
            futures::future::join_all(links.iter().map(|l| l.flush())),
        )
        .await;
    }

    /// What the link of `session` measures.
    pub fn figures(&self, session: &SessionHandle) -> Option<crate::LinkFigures> {
        session.0.link.figures()
    }

    /// Where `session`'s peer is.
    pub fn address_of(&self, session: &SessionHandle) -> Address {
        session.0.link.address()
    }

    /// Whether `from` is an agent `session`'s peer announced, waiting (at most the send
    /// timeout) for an announcement that `generation` says is on its way.
    pub async fn sender_registered(
        &self,
        session: &SessionHandle,
        from: &AgentId,
        generation: u64,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + self.inner.config.send_timeout;
        loop {
            let changed = session.0.members.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let s = lock(&session.0.session);
                if s.hosts(from) {
                    return true;
                }
                if generation <= s.peer_generation() || !s.is_linked() {
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// The local agent `id`, if it is hosted here.
    pub fn local(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.inner.shared.locals.get(id)
    }

    /// Every agent hosted here.
    pub fn locals(&self) -> Vec<Arc<LocalAgent>> {
        self.inner.shared.locals.all()
    }

    /// The events of the transport (for the wire's own events).
    pub fn publish(&self, event: Event) {
        self.inner.shared.publish(event);
    }

    /// A token cancelled when the host stops: wires end their tasks on it.
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// The endpoint-wide budgets its sessions draw from; a wire that holds peers' bytes of
    /// its own (partial frames) draws from them too.
    pub fn budgets(&self) -> &Arc<Budgets> {
        &self.inner.budget
    }

    /// The task tracker the host's tasks (and the wire's, if it likes) run under.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    // ----- sending -----

    fn sender(&self, id: &AgentId) -> Result<Arc<LocalAgent>> {
        self.live()?;
        self.inner
            .shared
            .locals
            .get(id)
            .ok_or_else(|| Error::PeerNotFound { peer: id.clone() })
    }

    /// Waits while what waits for `to` is with the redelivery handler (a send that falls back
    /// after this goes out after it), at most `wait`.
    async fn await_handoff(&self, to: &AgentId, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            loop {
                let changed = self.inner.tables.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if !self.inner.tables.handing_off(to) {
                    return;
                }
                changed.await;
            }
        })
        .await;
    }

    /// The session that reaches `to`, which must listen on `channel`; a link is made first
    /// when `to` is known only through peer exchange.
    async fn reach(
        &self,
        to: &AgentId,
        channel: &ChannelName,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Cell>> {
        let mut dialed = false;
        loop {
            let changed = self.inner.tables.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.inner.tables.way(to) {
                Some(way) => {
                    if !way.registration().has_channel(channel) {
                        return Err(Error::ChannelNotFound {
                            channel: channel.clone(),
                            agent: to.clone(),
                        });
                    }
                    match way {
                        Way::Session(cell, _) if cell.is_live() => return Ok(cell),
                        Way::Session(..) => {}
                        Way::Dial(addr, endpoint, _) => {
                            if !dialed {
                                dialed = true;
                                self.inner.wire.dial(addr, endpoint);
                            }
                        }
                    }
                }
                None if self.inner.tables.handing_off(to) => {
                    // What waited for `to` is with the redelivery handler; when it is done the
                    // agent may be reachable here again (what waited went first), or not.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    self.await_handoff(to, left).await;
                    if self.inner.tables.handing_off(to) || self.inner.tables.way(to).is_none() {
                        return Err(Error::PeerNotFound { peer: to.clone() });
                    }
                    continue;
                }
                None => return Err(Error::PeerNotFound { peer: to.clone() }),
            }
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(match self.inner.tables.way(to) {
                        Some(Way::Dial(addr, ..)) => Error::ConnectionTimeout {
                            addr: addr.into(),
                            after: self.inner.config.send_timeout,
                        },
                        _ => Error::PeerNotFound { peer: to.clone() },
                    });
                }
                () = self.inner.stop.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    async fn send_as(&self, envelope: Envelope, confirm: Confirm) -> Result<()> {
        let sender = self.sender(&envelope.from)?;
        let len = envelope.payload.len();
        let channel = sender.reg.check_outgoing(&envelope.channel, len)?.clone();
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        if let Some(local) = self.inner.shared.locals.get(&to) {
            local.listens(&channel.name)?;
            return self
                .inner
                .local
                .send(&sender, &local, envelope, &channel, confirm.waits())
                .await;
        }
        if let Some(max) = self.inner.wire.max_payload()
            && len > max
        {
            return Err(Error::MessageTooLarge { size: len, max });
        }
        if !channel.reliable {
            return self
                .send_datagram(&sender, &channel, &to, envelope, confirm.waits())
                .await;
        }
        self.send_reliable(&sender, &channel, &to, envelope, confirm)
            .await
    }

    async fn send_datagram(
        &self,
        sender: &LocalAgent,
        channel: &Channel,
        to: &AgentId,
        envelope: Envelope,
        confirm: bool,
    ) -> Result<()> {
        if confirm {
            return Err(Error::Unsupported {
                operation: "a confirmed send on an unreliable channel (nothing is acknowledged there)",
            });
        }
        if let Some(max) = self.inner.wire.max_datagram() {
            let size = aqe_core::encode(&envelope)?.len() + 16;
            if size > max {
                return Err(Error::MessageTooLarge { size, max });
            }
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.send_timeout;
        let cell = self.reach(to, &channel.name, deadline).await?;
        let len = envelope.payload.len();
        // Dropped and counted when there is no link, or the wire's datagram queue is full.
        match cell.pump_counted(&self.inner.shared, |s, _| s.send_datagram(envelope)) {
            (true, 0) => sender.stats.sent(len),
            _ => sender.stats.dropped(),
        }
        Ok(())
    }

    async fn send_reliable(
        &self,
        sender: &LocalAgent,
        channel: &Channel,
        to: &AgentId,
        envelope: Envelope,
        confirm: Confirm,
    ) -> Result<()> {
        // Encoded once, outside any lock.
        let (meta, body) = outgoing(
            &envelope,
            channel.ordered,
            confirm.waits(),
            aqe_core::Timestamp::now,
        )?;
        drop(envelope);
        let (done, confirmed) = if confirm.waits() {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let ctx = MsgCtx {
            stats: sender.stats.clone(),
            confirm: done,
            announce: confirm != Confirm::WaitQuietly,
        };
        // A batch of one: no allocation for it.
        self.admit(sender, channel, to, std::iter::once((meta, body, ctx)))
            .await?;
        match confirmed {
            None => Ok(()),
            Some(rx) => self.await_confirmation(rx).await,
        }
    }

    /// Hands `batch` (to one agent, on one reliable channel) to the session that reaches
    /// `to`, as much at a time as its window has room for: one borrow of the session, one
    /// transmission and one count per admission. Waits for room up to the send timeout,
    /// counted from the last progress (not at all on a channel whose slow-consumer policy is
    /// not `block`).
    async fn admit<I>(
        &self,
        sender: &LocalAgent,
        channel: &Channel,
        to: &AgentId,
        batch: I,
    ) -> Result<()>
    where
        I: ExactSizeIterator<Item = (MessageMeta, aqe_core::Encoded, MsgCtx)> + Send,
    {
        let send_timeout = self.inner.config.send_timeout;
        let total = batch.len();
        let mut batch = batch.peekable();
        let mut deadline = tokio::time::Instant::now() + send_timeout;
        let fail = |left: usize, e: Error| e.after_accepted(total - left);
        'route: loop {
            let cell = self
                .reach(to, &channel.name, deadline)
                .await
                .map_err(|e| fail(batch.len(), e))?;
            loop {
                let room = cell.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                match self.admit_now(sender, &cell, &mut batch) {
                    Some(0) => {}
                    Some(_) => {
                        if batch.len() == 0 {
                            return Ok(());
                        }
                        deadline = tokio::time::Instant::now() + send_timeout;
                    }
                    None => continue 'route,
                }
                // A channel that does not block fails what the window has no room for, at once.
                if channel.slow_consumer != aqe_core::SlowConsumer::Block {
                    return Err(fail(
                        batch.len(),
                        Error::SendFailed {
                            to: to.clone(),
                            reason: SendFailure::QueueFull(Duration::ZERO),
                        },
                    ));
                }
                tokio::select! {
                    () = &mut room => {}
                    () = tokio::time::sleep_until(deadline) => {
                        return Err(fail(batch.len(), Error::SendFailed {
                            to: to.clone(),
                            reason: SendFailure::QueueFull(send_timeout),
                        }));
                    }
                    () = self.inner.stop.cancelled() => {
                        return Err(fail(batch.len(), Error::Shutdown));
                    }
                }
            }
        }
    }

    /// Hands the session of `cell` as much of `batch` as its windows have room for now, in
    /// one step, and counts it; how many it took (`None`: the session has no link).
    fn admit_now<I>(
        &self,
        sender: &LocalAgent,
        cell: &Arc<Cell>,
        batch: &mut std::iter::Peekable<I>,
    ) -> Option<usize>
    where
        I: ExactSizeIterator<Item = (MessageMeta, aqe_core::Encoded, MsgCtx)>,
    {
        let now = Instant::now();
        // Counted before the session has them: a settlement may be told on another thread
        // before `pump` returns, and must find its message counted.
        sender.stats.accepted(batch.len() as u64);
        let sent = cell.pump(&self.inner.shared, |s, _| s.send_many(batch, now));
        sender.stats.unaccepted(batch.len() as u64);
        let (n, bytes) = sent?;
        if n > 0 {
            sender.stats.sent_many(n as u64, bytes as u64);
        }
        Some(n)
    }

    /// Admits the copies of a broadcast for every target a live session reaches now: the
    /// targets of one session encoded together and admitted under one borrow of it, their
    /// outcomes into `outcomes`. Returns the targets left for single sends.
    fn broadcast_at_once(
        &self,
        sender: &LocalAgent,
        channel: &Channel,
        envelope: &Envelope,
        targets: &[AgentId],
        outcomes: &mut Vec<(AgentId, Result<()>)>,
    ) -> Vec<AgentId> {
        if self
            .inner
            .wire
            .max_payload()
            .is_some_and(|max| envelope.payload.len() > max)
        {
            // A single send says why it cannot go.
            return targets.to_vec();
        }
        let mut rest = Vec::new();
        let mut groups: Vec<(Arc<Cell>, Vec<AgentId>)> = Vec::new();
        for to in targets {
            let way = match self.inner.shared.locals.get(to) {
                Some(_) => None,
                None => self.inner.tables.way(to),
            };
            match way {
                Some(Way::Session(cell, reg))
                    if cell.is_live() && reg.has_channel(&channel.name) =>
                {
                    match groups.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &cell)) {
                        Some((_, to_all)) => to_all.push(to.clone()),
                        None => groups.push((cell, vec![to.clone()])),
                    }
                }
                _ => rest.push(to.clone()),
            }
        }
        if groups.is_empty() {
            return rest;
        }
        // One encoding for every copy and every session: each session frames its copies
        // as fanouts, which name the agents (PROTOCOL.md 4.4).
        let mut shared = envelope.clone();
        shared.to = aqe_core::Recipient::Fleet;
        let Ok(body) = aqe_core::encode_envelope(&shared) else {
            rest.extend(groups.into_iter().flat_map(|(_, to)| to));
            return rest;
        };
        // One clock read for all the copies (only a TTL needs it).
        let stamp = shared.ttl.map(|_| aqe_core::Timestamp::now());
        for (cell, to) in groups {
            let mut batch = to
                .iter()
                .map(|to| {
                    let meta = fanout_meta(&shared, to.clone(), channel.ordered, || {
                        stamp.unwrap_or_else(aqe_core::Timestamp::now)
                    });
                    let ctx = MsgCtx {
                        stats: sender.stats.clone(),
                        confirm: None,
                        announce: true,
                    };
                    (meta, body.clone(), ctx)
                })
                .peekable();
            let n = self.admit_now(sender, &cell, &mut batch).unwrap_or(0);
            let mut to = to.into_iter();
            outcomes.extend(to.by_ref().take(n).map(|t| (t, Ok(()))));
            rest.extend(to);
        }
        rest
    }

    /// Waits for a confirmed message's settlement, which comes by its deadline at the latest.
    async fn await_confirmation(&self, rx: oneshot::Receiver<Result<()>>) -> Result<()> {
        let wait = self.inner.config.session.delivery_deadline + self.inner.config.send_timeout;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout {
                after: wait,
                attempts: 1,
            }),
        }
    }

    async fn request_as(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let sender = self.sender(&envelope.from)?;
        let len = envelope.payload.len();
        let to = envelope.target().cloned().ok_or(Error::Protocol {
            detail: "a request needs exactly one recipient",
        })?;
        let deadline = tokio::time::Instant::now() + timeout;
        let cell = if let Some(endpoint) = endpoint_of(&to) {
            self.inner
                .tables
                .cell_of(&endpoint)
                .filter(|c| c.is_live())
                .ok_or_else(|| Error::PeerNotFound { peer: to.clone() })?
        } else {
            sender.reg.check_outgoing(&envelope.channel, len)?;
            if let Some(local) = self.inner.shared.locals.get(&to) {
                local.listens(&envelope.channel)?;
                return self
                    .inner
                    .local
                    .request(&sender, &local, envelope, timeout)
                    .await;
            }
            if let Some(max) = self.inner.wire.max_payload()
                && len > max
            {
                return Err(Error::MessageTooLarge { size: len, max });
            }
            self.reach(&to, &envelope.channel, deadline).await?
        };
        let id = envelope.id;
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let asked = cell.pump(&self.inner.shared, |s, _| {
            s.request(envelope, ReqCtx { answer: tx })
        });
        if asked.is_err() {
            return Err(Error::ConnectionLost {
                addr: cell.link.address(),
                source: "the session ended".into(),
            });
        }
        sender.stats.sent(len);
        // Whatever happens from here (timeout, the caller dropping this future), an
        // unanswered request is cancelled at the responder.
        let mut guard = Cancel {
            cell: &cell,
            shared: &self.inner.shared,
            id,
            armed: true,
        };
        let answer = tokio::time::timeout_at(deadline, rx).await;
        let answer = match answer {
            Err(_) => {
                return Err(Error::Timeout {
                    after: timeout,
                    attempts: 1,
                });
            }
            Ok(Err(_)) => Answer::Lost,
            Ok(Ok(a)) => a,
        };
        guard.armed = false;
        match answer {
            Answer::Response(response) => {
                sender.stats.received(response.payload.len());
                sender.stats.rtt_sample(started.elapsed());
                Ok(response)
            }
            Answer::Refused(Refusal::NotHere | Refusal::NotRegistered) => {
                Err(Error::PeerNotFound { peer: to })
            }
            Answer::Refused(Refusal::Overflow) => Err(Error::Busy { peer: to }),
            // Requests are not refused `Expired` (section 4.9); a peer that does so dropped it.
            Answer::Refused(Refusal::Stopped | Refusal::Expired | Refusal::Dropped) => {
                Err(Error::Remote {
                    agent: to,
                    kind: RemoteErrorKind::Dropped,
                    message: "the request was dropped without an answer".to_owned(),
                })
            }
            Answer::Lost => Err(Error::ConnectionLost {
                addr: cell.link.address(),
                source: "the session ended before the answer".into(),
            }),
        }
    }

    /// The introspection ids of the endpoints this one has a session with.
    pub fn endpoint_agents(&self) -> Vec<AgentId> {
        let mut v: Vec<AgentId> = self
            .inner
            .tables
            .cells()
            .iter()
            .filter(|c| c.is_live())
            .map(|c| endpoint_agent(c.peer))
            .collect();
        v.sort();
        v
    }

    /// How many peers this endpoint has a live session with.
    pub fn connections(&self) -> usize {
        self.inner
            .tables
            .cells()
            .iter()
            .filter(|c| c.is_live())
            .count()
    }

    fn flow_here(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        self.inner
            .tables
            .cells()
            .iter()
            .any(|c| c.has_flow(from, to, channel))
    }
}

/// Cancels a request still unanswered when dropped.
struct Cancel<'a> {
    cell: &'a Arc<Cell>,
    shared: &'a Shared,
    id: aqe_core::MessageId,
    armed: bool,
}

impl Drop for Cancel<'_> {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            let _ = self.cell.pump(self.shared, |s, _| s.cancel(id));
        }
    }
}

#[async_trait]
impl Transport for Host {
    fn kind(&self) -> TransportKind {
        self.inner.wire.kind()
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.live()?;
        agent.validate()?;
        inbox.tell_drops(self.inner.shared.events.clone());
        let local = Arc::new(LocalAgent::new(agent.clone(), inbox));
        match self.command(|tx| Command::Attach(agent, local, tx)).await? {
            Ok(()) => Ok(()),
            Err(aqe_session::AttachError::Shutdown) => Err(Error::Shutdown),
            Err(e @ aqe_session::AttachError::Taken(_)) => Err(Error::config("id", e.to_string())),
            Err(e) => Err(Error::config("registration", e.to_string())),
        }
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        // What the agent sent unreliably leaves before its departure is announced: a peer
        // drops an unreliable message from an agent it knows has left.
        self.flush().await;
        let id = agent.clone();
        if self.command(|tx| Command::Detach(id, tx)).await? {
            Ok(())
        } else {
            Err(Error::PeerNotFound {
                peer: agent.clone(),
            })
        }
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, Confirm::No).await
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, Confirm::Wait).await
    }

    async fn send_handed_over(&self, envelope: Envelope) -> Result<()> {
        self.send_as(envelope, Confirm::WaitQuietly).await
    }

    /// A batch to a remote agent on a reliable channel is encoded outside any lock and
    /// admitted a window's room at a time; anything else goes as single sends.
    async fn send_many(&self, envelopes: Vec<Envelope>) -> Result<()> {
        aqe_core::plumbing::check_batch(&envelopes)?;
        let Some(first) = envelopes.first() else {
            return Ok(());
        };
        let sender = self.sender(&first.from)?;
        let channel = sender.reg.check_outgoing(&first.channel, 0)?.clone();
        let to = first.target().cloned().ok_or(Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
        if !channel.reliable || self.inner.shared.locals.get(&to).is_some() {
            for (accepted, e) in envelopes.into_iter().enumerate() {
                self.send_as(e, Confirm::No)
                    .await
                    .map_err(|e| e.after_accepted(accepted))?;
            }
            return Ok(());
        }
        let max = self.inner.wire.max_payload();
        let mut metas = Vec::with_capacity(envelopes.len());
        let mut stopped = None;
        for (i, e) in envelopes.iter().enumerate() {
            let len = e.payload.len();
            let checked = sender
                .reg
                .check_outgoing(&e.channel, len)
                .map(|_| ())
                .and_then(|()| match max {
                    Some(max) if len > max => Err(Error::MessageTooLarge { size: len, max }),
                    _ => Ok(()),
                })
                .and_then(|()| message_meta(e, channel.ordered, false, aqe_core::Timestamp::now));
            match checked {
                Ok(meta) => metas.push(meta),
                Err(err) if i == 0 => return Err(err),
                Err(err) => {
                    // Those before it go; the error says where the batch stopped.
                    stopped = Some(err.after_accepted(i));
                    break;
                }
            }
        }
        // Encoded together: small envelopes share buffers (an allocation per 64 KiB), and
        // what the session keeps of each is a reference, not a copy.
        let bodies = aqe_core::encode_envelopes(&envelopes[..metas.len()])?;
        drop(envelopes);
        let batch = metas.into_iter().zip(bodies).map(|(meta, body)| {
            (
                meta,
                body,
                MsgCtx {
                    stats: sender.stats.clone(),
                    confirm: None,
                    announce: true,
                },
            )
        });
        self.admit(&sender, &channel, &to, batch).await?;
        stopped.map_or(Ok(()), Err)
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        self.request_as(envelope, timeout).await
    }

    /// The copies for targets a live session reaches now go in one pass, one borrow of each
    /// session for all its targets; the rest (local agents, targets still to be reached,
    /// windows without room) go as single sends, which wait as a send does.
    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        let sender = self.sender(&envelope.from)?;
        let channel = sender
            .reg
            .check_broadcast(&envelope.channel, envelope.payload.len())?
            .clone();
        let mut outcomes = Vec::with_capacity(targets.len());
        let rest = if channel.reliable {
            self.broadcast_at_once(&sender, &channel, &envelope, targets, &mut outcomes)
        } else {
            targets.to_vec()
        };
        let sends = rest.into_iter().map(|to| {
            let mut copy = envelope.clone();
            copy.to = aqe_core::Recipient::Agent(to.clone());
            async move {
                let r = self.send(copy).await;
                (to, r)
            }
        });
        outcomes.extend(futures::future::join_all(sends).await);
        Ok(BroadcastReport::from_outcomes(envelope.id, outcomes))
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let sender = self.sender(&header.from)?;
        let channel = sender
            .reg
            .check_outgoing(&header.options.channel, 0)?
            .clone();
        if let Some(local) = self.inner.shared.locals.get(&header.to) {
            local.listens(&channel.name)?;
            let sink = self
                .inner
                .local
                .open_stream(&sender, &local, header, &channel)
                .await?;
            return Ok(Box::new(sink));
        }
        let send_timeout = self.inner.config.send_timeout;
        let deadline = tokio::time::Instant::now() + send_timeout;
        let cell = self.reach(&header.to, &channel.name, deadline).await?;
        let generation = lock(&cell.session).generation();
        let to = header.to.clone();
        tokio::time::timeout_at(
            deadline,
            cell.link.open_stream(
                header,
                generation,
                channel.max_message_size,
                sender.stats.clone(),
            ),
        )
        .await
        .map_err(|_| Error::SendFailed {
            to,
            reason: SendFailure::QueueFull(send_timeout),
        })?
    }

    fn registration(&self, agent: &AgentId) -> Result<Registration> {
        Ok(self.sender(agent)?.reg.clone())
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .inner
            .shared
            .locals
            .all()
            .iter()
            .map(|l| {
                l.reg
                    .peer_info(Some(self.inner.address.clone()), PeerState::Connected)
            })
            .collect();
        let routes: Vec<(AgentId, Way)> = self
            .inner
            .tables
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (_, way) in routes {
            out.push(match way {
                Way::Session(cell, reg) => {
                    let mut info = reg.peer_info(Some(cell.link.address()), PeerState::Connected);
                    info.rtt = cell
                        .link
                        .figures()
                        .filter(|f| f.rtt.samples > 0)
                        .map(|f| f.smoothed_rtt)
                        .or_else(|| lock(&cell.session).rtt());
                    info
                }
                Way::Dial(addr, _, reg) => reg.peer_info(Some(addr.into()), PeerState::Known),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn agents_on(&self, channel: &ChannelName) -> Vec<AgentId> {
        let mut out: Vec<AgentId> = self
            .inner
            .shared
            .locals
            .all()
            .iter()
            .filter(|l| l.reg.has_channel(channel))
            .map(|l| l.reg.id.clone())
            .collect();
        out.extend(
            self.inner
                .tables
                .routes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, way)| way.registration().has_channel(channel))
                .map(|(id, _)| id.clone()),
        );
        out.sort();
        out
    }

    /// The agent's counters, with what the wire measures on the live links: RTT (every
    /// link's real samples, combined), loss (packets lost over sent), congestion window
    /// (the largest), and the peer endpoints lost without a goodbye lately.
    fn links(&self) -> Vec<aqe_core::LinkReport> {
        crate::introspect::link_reports(&self.inner.tables.cells())
    }

    fn stats(&self, agent: &AgentId) -> Stats {
        let mut stats = self
            .inner
            .shared
            .locals
            .get(agent)
            .map(|l| l.stats.snapshot())
            .unwrap_or_default();
        let figures: Vec<crate::LinkFigures> = self
            .inner
            .tables
            .cells()
            .iter()
            .filter(|c| c.is_live())
            .filter_map(|c| c.link.figures())
            .collect();
        let rtt = figures
            .iter()
            .fold(RttStats::default(), |acc, f| acc.merge(f.rtt));
        if rtt.samples > 0 {
            stats.rtt = rtt;
        }
        let (sent, lost) = figures
            .iter()
            .fold((0, 0), |(s, l), f| (s + f.packets_sent, l + f.packets_lost));
        if sent > 0 {
            stats.packet_loss = stats.packet_loss.max(lost as f64 / sent as f64);
        }
        stats.congestion_window = figures
            .iter()
            .map(|f| f.congestion_window)
            .max()
            .filter(|c| *c > 0);
        stats.unreachable_peers = self.inner.tables.unreachable.load(Ordering::Relaxed) as u64;
        stats
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    fn can_reach(&self, agent: &AgentId) -> bool {
        self.live().is_ok()
            && (self.inner.shared.locals.contains(agent) || self.inner.tables.way(agent).is_some())
    }

    async fn flush(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> Result<()> {
        loop {
            let progress = self.inner.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            self.live()?;
            let waiting = self.flow_here(from, to, channel) || {
                let (f, t, c) = (from.clone(), to.clone(), channel.clone());
                self.command(|tx| Command::HasFlow(f, t, c, tx)).await?
            };
            if !waiting {
                return Ok(());
            }
            tokio::select! {
                () = progress => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = self.inner.stop.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    fn set_redelivery(&self, redeliver: Arc<dyn Redeliver>) {
        let _ = self.inner.commands.try_send(Command::Redelivery(redeliver));
    }

    async fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Unreliable messages queued on the links leave first (a command that sends one and
        // exits would drop it otherwise).
        self.flush().await;
        // Goodbye first (every session ends, telling its peer), then the tasks stop.
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Shutdown(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        self.inner.shared.locals.clear();
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.wire.shutdown().await;
    }
}
