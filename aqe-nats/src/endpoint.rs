//! The NATS wire: one client connection, the endpoint's own subject and the fleet's presence
//! subject read, everything published by one task.
//!
//! A session's link is its peer's subject ([`NatsLink`]): what the session sends waits in
//! the link and goes out in as few packets as the server's `max_payload` allows. Handshakes
//! follow aqe-session's [`Greeter`]: an endpoint greets every endpoint whose heartbeat it
//! hears and has no session with; hellos that cross are settled by rank. Frames of a session
//! this endpoint does not know are answered with a reset, unless its handshake is under way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::plumbing::StatsRecorder;
use aqe_core::{Address, Error, Event, Result, StreamHeader, StreamSink, TransportKind};
use aqe_link::{Host, Link, Opening, SessionHandle, WeakHost, Wire, fresh_incarnation};
use aqe_session::{
    Ended, EndpointId, Greeter, Greeting, Hello, Principal, Transmit, Trust, check_hello,
};

use crate::NatsConfig;
use crate::stream::{NatsSink, Streams};
use crate::wire::{self, Packet, Subjects};

/// Packets of no session (hellos, resets, stream control) waiting to be published; beyond,
/// they are dropped: each is sent again, or its loss is a failure the wire reports anyway.
const MAX_LOOSE: usize = 4096;
/// Room in a payload for the envelope's fields other than its payload, and the packet's.
const ENVELOPE_OVERHEAD: usize = 4096;

/// Locks a mutex, taking it over from a panicked holder.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A random 64-bit number (endpoint keys, handshake nonces).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.write_u64(aqe_core::MessageId::next().0);
    h.finish() | 1
}

#[derive(Default)]
struct Outgoing {
    /// Links with frames waiting, each once.
    links: VecDeque<Arc<NatsLink>>,
    /// Packets for an endpoint's subject, or the presence subject (`None`).
    loose: VecDeque<(Option<EndpointId>, Bytes)>,
}

/// The wire of a NATS endpoint (see the module docs).
pub(crate) struct NatsWire {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) me: EndpointId,
    pub(crate) subjects: Subjects,
    /// The server URLs, as events name the connection.
    pub(crate) server: Address,
    host: Arc<OnceLock<WeakHost>>,
    greeter: Mutex<Greeter>,
    greet_wake: Notify,
    out: Mutex<Outgoing>,
    out_wake: Notify,
    pub(crate) streams: Streams,
    pub(crate) stop: CancellationToken,
    /// Cancelled when the server did not take the last packets in time at shutdown: a
    /// publish still waiting for room in the client gives up.
    abandon: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl NatsWire {
    /// Connects to one of `config.servers`, joins the fleet, and starts the host; with
    /// `background`, it returns at once and the client connects when a server answers.
    pub(crate) async fn connect(config: NatsConfig, background: bool) -> Result<(Arc<Self>, Host)> {
        config.validate()?;
        let server = Address::named(config.servers.join(","));
        let host_cell: Arc<OnceLock<WeakHost>> = Arc::default();
        let mut options = connect_options(&config, host_cell.clone(), server.clone()).await?;
        if background {
            options = options.retry_on_initial_connect();
        }
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
        let me = EndpointId::new(random(), fresh_incarnation());
        let subjects = Subjects::new(&config.fleet);
        let host_config = config.host();
        let session = &host_config.session;
        let greeter = Greeter::new(me, session.heartbeat, session.liveness);
        let wire = Arc::new(Self {
            client,
            me,
            subjects,
            server: server.clone(),
            host: host_cell.clone(),
            greeter: Mutex::new(greeter),
            greet_wake: Notify::new(),
            out: Mutex::default(),
            out_wake: Notify::new(),
            streams: Streams::default(),
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            tasks: TaskTracker::new(),
            config,
        });
        let host = Host::new(me, wire.address_of(me), wire.clone(), host_config);
        let _ = host_cell.set(host.downgrade());
        host.start();
        let subscribe = |subject: String| {
            let client = wire.client.clone();
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
        let own = subscribe(wire.subjects.endpoint(me)).await?;
        let presence = subscribe(wire.subjects.presence()).await?;
        for sub in [own, presence] {
            wire.tasks.spawn(wire.clone().read(sub));
        }
        wire.tasks.spawn(wire.clone().publish_loop());
        // Heard at once: every endpoint of the fleet greets this one.
        wire.heartbeat(&host);
        wire.tasks.spawn(wire.clone().tick());
        if background && wire.client.connection_state() != async_nats::connection::State::Connected
        {
            tracing::warn!(server = %server, "NATS server not reachable yet; connecting in the background");
        } else {
            host.publish(Event::ConnectionEstablished { addr: server });
        }
        tracing::info!(endpoint = %me, fleet = %wire.config.fleet, "NATS endpoint started");
        Ok((wire, host))
    }

    fn host(&self) -> Option<Host> {
        self.host.get().and_then(WeakHost::upgrade)
    }

    /// How an endpoint appears in peer listings.
    pub(crate) fn address_of(&self, ep: EndpointId) -> Address {
        Address::named(format!("nats:{}/{ep}", self.config.fleet))
    }

    /// The session with `peer` of nonce `session`, if it lives.
    pub(crate) fn session(
        &self,
        host: &Host,
        peer: &EndpointId,
        session: u64,
    ) -> Option<SessionHandle> {
        host.session_of(peer).filter(|s| s.rank().nonce == session)
    }

    // ----- publishing -----

    /// Queues a packet of no session for `to`'s subject (the presence subject for `None`).
    pub(crate) fn post(&self, to: Option<EndpointId>, packet: Packet) {
        let Ok(bytes) = wire::encode(&packet) else {
            return;
        };
        let mut out = lock(&self.out);
        if out.loose.len() >= MAX_LOOSE {
            tracing::debug!("too many packets waiting to be published; one dropped");
            return;
        }
        out.loose.push_back((to, bytes));
        drop(out);
        self.out_wake.notify_one();
    }

    /// Publishes `packet` to `to` now (stream data: its writer waits), refusing it as a
    /// payload of `payload_len` bytes when the server would.
    pub(crate) async fn publish_to(
        &self,
        to: EndpointId,
        packet: &Packet,
        payload_len: usize,
    ) -> Result<()> {
        let bytes = wire::encode(packet).map_err(|e| Error::Encode {
            what: "a NATS packet",
            source: Box::new(e),
        })?;
        let max = self.client.max_payload();
        if max > 0 && bytes.len() > max {
            let overhead = bytes.len().saturating_sub(payload_len);
            return Err(Error::MessageTooLarge {
                size: payload_len,
                max: max.saturating_sub(overhead),
            });
        }
        self.publish(self.subjects.endpoint(to), bytes).await;
        Ok(())
    }

    /// Publishes; a failure (the client is closed for good) is logged: retransmissions and
    /// liveness deal with what it loses.
    async fn publish(&self, subject: impl async_nats::subject::ToSubject, bytes: Bytes) {
        tokio::select! {
            // The publish first: while it is ready at once (the usual case) the shutdown
            // token is never polled, so nothing registers with it.
            biased;
            r = self.client.publish(subject, bytes) => if let Err(e) = r {
                tracing::debug!(error = %e, "NATS publish failed");
            },
            () = self.abandon.cancelled() => tracing::debug!("NATS publish given up at shutdown"),
        }
    }

    /// Publishes whatever waits: loose packets, then each waiting link's frames in as few
    /// packets as fit. `false` when nothing waited.
    async fn publish_pending(&self) -> bool {
        let (loose, links) = {
            let mut out = lock(&self.out);
            (
                std::mem::take(&mut out.loose),
                std::mem::take(&mut out.links),
            )
        };
        if loose.is_empty() && links.is_empty() {
            return false;
        }
        for (to, bytes) in loose {
            let subject = match to {
                Some(ep) => self.subjects.endpoint(ep),
                None => self.subjects.presence(),
            };
            self.publish(subject, bytes).await;
        }
        for link in links {
            // Cleared before taking: frames added from now on queue the link again.
            link.queued.store(false, Ordering::Release);
            let first = lock(&link.first).take();
            if let Some(hello) = first {
                self.publish(link.subject.clone(), hello).await;
            }
            let frames = std::mem::take(&mut *lock(&link.pending));
            for packet in self.pack(&link, frames) {
                self.publish(link.subject.clone(), packet).await;
            }
        }
        true
    }

    /// Frames in packets of at most the server's `max_payload`, in order.
    fn pack(&self, link: &NatsLink, frames: Vec<Transmit>) -> Vec<Bytes> {
        let max = self.client.max_payload().max(link.head.len() + 1);
        let hint: usize = frames.iter().map(Transmit::size_hint).sum();
        let mut out = Vec::new();
        let fresh = |hint: usize| {
            let mut buf = BytesMut::with_capacity((link.head.len() + hint).min(max));
            buf.extend_from_slice(&link.head);
            buf
        };
        let mut buf = fresh(hint);
        for t in frames {
            let mark = buf.len();
            if let Err(e) = t.encode(&mut buf) {
                tracing::error!(error = %e, "a frame does not encode; dropped");
                buf.truncate(mark);
                continue;
            }
            if buf.len() <= max {
                continue;
            }
            let tail = buf.split_off(mark);
            if mark > link.head.len() {
                out.push(buf.freeze());
            }
            buf = fresh(tail.len());
            buf.extend_from_slice(&tail);
            if buf.len() > max {
                tracing::error!(
                    size = tail.len(),
                    max,
                    "a frame larger than the server's max_payload; dropped"
                );
                buf.truncate(link.head.len());
            }
        }
        if buf.len() > link.head.len() {
            out.push(buf.freeze());
        }
        out
    }

    async fn publish_loop(self: Arc<Self>) {
        loop {
            let wake = self.out_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.publish_pending().await {
                continue;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = wake => {}
            }
        }
    }

    // ----- reading -----

    async fn read(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                () = self.stop.cancelled() => break,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let Some(host) = self.host() else { break };
            self.on_packet(&host, &msg.payload).await;
        }
        tokio::select! {
            biased;
            _ = sub.unsubscribe() => {}
            () = self.abandon.cancelled() => {}
        }
    }

    async fn on_packet(self: &Arc<Self>, host: &Host, bytes: &[u8]) {
        let (packet, rest) = match wire::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "a packet that does not decode; dropped");
                return;
            }
        };
        match packet {
            Packet::Alive { from, generation } => self.on_alive(host, from, generation),
            Packet::Gone { from } => {
                lock(&self.greeter).forget(&from);
                if let Some(s) = host.session_of(&from) {
                    self.ended(host, &s, Ended::Goodbye);
                }
            }
            Packet::Hello { to, reply, hello } if to == self.me => {
                self.on_hello(host, reply, hello).await;
            }
            Packet::Frames { from, to, session } if to == self.me => {
                self.on_frames(host, from, session, rest);
            }
            Packet::Reset { from, to, session } if to == self.me => {
                if let Some(s) = self.session(host, &from, session) {
                    self.ended(host, &s, Ended::Reset);
                }
            }
            Packet::StreamOpen { from, to, .. }
            | Packet::StreamData { from, to, .. }
            | Packet::StreamCredit { from, to, .. }
            | Packet::StreamCancel { from, to, .. }
            | Packet::StreamReset { from, to, .. }
                if to == self.me =>
            {
                Streams::on_packet(self, host, from, packet);
            }
            // For an earlier incarnation of this key, or misdirected.
            _ => {}
        }
    }

    /// A session ended for what the wire heard (the peer's goodbye or reset): it and its
    /// streams.
    fn ended(&self, host: &Host, s: &SessionHandle, why: Ended) {
        host.end(s, why);
        self.streams
            .session_ended(s.peer(), s.rank().nonce, &self.address_of(s.peer()));
    }

    fn on_alive(&self, host: &Host, from: EndpointId, generation: u64) {
        if from == self.me {
            return;
        }
        if let Some(s) = host.session_of(&from) {
            host.alive(&s, generation);
            return;
        }
        let limit = self.config.limits.endpoints as usize;
        if host.connections() >= limit {
            return;
        }
        let greeting = {
            let mut g = lock(&self.greeter);
            if g.pending() >= limit {
                return;
            }
            g.greet(from, random(), Instant::now())
        };
        if let Some(Greeting::Hello { to, nonce, reply }) = greeting {
            self.send_hello(host, to, nonce, reply);
            self.greet_wake.notify_one();
        }
    }

    fn send_hello(&self, host: &Host, to: EndpointId, nonce: u64, reply: bool) {
        let hello = host.hello(nonce, None, None);
        self.post(Some(to), Packet::Hello { to, reply, hello });
    }

    async fn on_hello(self: &Arc<Self>, host: &Host, reply: bool, mut hello: Hello) {
        if let Err(e) = check_hello(&hello, self.me, None, None) {
            tracing::debug!(peer = %hello.endpoint, error = %e, "a hello refused");
            return;
        }
        // Every member of the fleet was authenticated by the server alike; nobody has an
        // address to give (no peer exchange over NATS).
        let trust = Trust {
            authenticated: true,
            principal: Principal::Fleet,
        };
        hello.listen = None;
        let peer = hello.endpoint;
        let current = host.session_of(&peer).map(|s| s.rank());
        if current.is_none() && host.connections() >= self.config.limits.endpoints as usize {
            return;
        }
        let greetings = lock(&self.greeter).on_hello(peer, hello.nonce, reply, current);
        let answer = greetings.iter().find_map(|g| match g {
            Greeting::Hello { to, nonce, reply } => Some((*to, *nonce, *reply)),
            Greeting::Open { .. } => None,
        });
        let Some(Greeting::Open { peer, rank }) = greetings
            .iter()
            .find(|g| matches!(g, Greeting::Open { .. }))
            .copied()
        else {
            // A hello repeated: answered again.
            if let Some((to, nonce, reply)) = answer {
                self.send_hello(host, to, nonce, reply);
            }
            return;
        };
        let link = NatsLink::new(self, peer, rank.nonce);
        // The answer goes first on the link, ahead of the session's first frames, so that
        // the peer knows the session when they arrive.
        if let Some((to, nonce, reply)) = answer {
            let hello = host.hello(nonce, None, None);
            *lock(&link.first) = wire::encode(&Packet::Hello { to, reply, hello }).ok();
        }
        let opening = Opening {
            hello,
            rank,
            trust,
            link: Arc::new(LinkRef(link.clone())),
        };
        // Refused (a session of smaller rank lives): no answer.
        if host.open(opening).await.is_some() {
            link.queue();
        }
    }

    fn on_frames(&self, host: &Host, from: EndpointId, session: u64, rest: &[u8]) {
        let Some(s) = self.session(host, &from, session) else {
            if !lock(&self.greeter).is_pending(&from, session) {
                self.post(
                    Some(from),
                    Packet::Reset {
                        from: self.me,
                        to: from,
                        session,
                    },
                );
            }
            return;
        };
        match wire::frames(rest) {
            // A frame that breaks a rule ends the session; its link resets the peer.
            Ok(frames) => {
                if let Err(rule) = host.frames(&s, frames) {
                    tracing::debug!(peer = %from, rule, "protocol violation");
                }
            }
            Err(e) => {
                tracing::debug!(peer = %from, error = %e, "malformed frames");
                host.end(&s, Ended::Violation("malformed frames"));
            }
        }
    }

    // ----- timers -----

    fn heartbeat(&self, host: &Host) {
        self.post(
            None,
            Packet::Alive {
                from: self.me,
                generation: host.generation(),
            },
        );
    }

    /// Heartbeats on the presence subject, and hellos sent again until answered.
    async fn tick(self: Arc<Self>) {
        let every = self.config.heartbeat_interval;
        let mut next_alive = Instant::now() + every;
        loop {
            let wake = self.greet_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let at = lock(&self.greeter)
                .poll_timeout()
                .map_or(next_alive, |g| g.min(next_alive));
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = wake => continue,
                () = tokio::time::sleep_until(at.into()) => {}
            }
            let Some(host) = self.host() else { return };
            let now = Instant::now();
            if now >= next_alive {
                self.heartbeat(&host);
                next_alive = now + every;
            }
            let again = lock(&self.greeter).handle_timeout(now);
            for g in again {
                if let Greeting::Hello { to, nonce, reply } = g {
                    self.send_hello(&host, to, nonce, reply);
                }
            }
        }
    }
}

#[async_trait]
impl Wire for NatsWire {
    fn kind(&self) -> TransportKind {
        crate::NatsTransport::KIND
    }

    /// Over NATS every endpoint is reached by its subject: a handshake, as when its
    /// heartbeat is heard.
    fn dial(&self, _addr: std::net::SocketAddr, endpoint: EndpointId) {
        if let Some(host) = self.host() {
            self.on_alive(&host, endpoint, 0);
        }
    }

    fn max_payload(&self) -> Option<usize> {
        Some(self.client.max_payload().saturating_sub(ENVELOPE_OVERHEAD))
    }

    async fn shutdown(&self) {
        // What the sessions sent last (acknowledgements above all), then the goodbye; within
        // CLOSE_WAIT, whatever the server does: past it, what still waits gives up.
        self.stop.cancel();
        self.tasks.close();
        let orderly = async {
            self.tasks.wait().await;
            self.publish_pending().await;
            if let Ok(bytes) = wire::encode(&Packet::Gone { from: self.me }) {
                self.publish(self.subjects.presence(), bytes).await;
            }
            let _ = self.client.flush().await;
        };
        if tokio::time::timeout(CLOSE_WAIT, orderly).await.is_err() {
            tracing::warn!(server = %self.server, "the NATS server did not take this endpoint's last packets within {CLOSE_WAIT:?}; closing without them");
            self.abandon.cancel();
            let _ = tokio::time::timeout(CLOSE_WAIT, self.tasks.wait()).await;
        }
        tracing::info!(endpoint = %self.me, "NATS endpoint stopped");
    }
}

/// The link of one session: the peer's subject, and the frames waiting to go there.
pub(crate) struct NatsLink {
    wire: Arc<NatsWire>,
    peer: EndpointId,
    session: u64,
    subject: async_nats::Subject,
    /// The packet head every batch of this session's frames starts with.
    head: Bytes,
    /// A packet to publish before the frames (the hello answering the peer's).
    first: Mutex<Option<Bytes>>,
    pending: Mutex<Vec<Transmit>>,
    queued: AtomicBool,
}

impl NatsLink {
    fn new(wire: &Arc<NatsWire>, peer: EndpointId, session: u64) -> Arc<Self> {
        let head = wire::encode(&Packet::Frames {
            from: wire.me,
            to: peer,
            session,
        })
        .unwrap_or_default();
        Arc::new(Self {
            wire: wire.clone(),
            peer,
            session,
            subject: wire.subjects.endpoint(peer).into(),
            head,
            first: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            queued: AtomicBool::new(false),
        })
    }

    /// Has the publisher look at this link (once until it does).
    fn queue(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.wire.out).links.push_back(self.clone());
            self.wire.out_wake.notify_one();
        }
    }
}

/// The link as the host holds it.
struct LinkRef(Arc<NatsLink>);

#[async_trait]
impl Link for LinkRef {
    fn transmit(&self, frames: &mut Vec<Transmit>) -> usize {
        lock(&self.0.pending).append(frames);
        self.0.queue();
        0
    }

    fn close(&self, why: Ended) {
        let link = &self.0;
        let wire = &link.wire;
        wire.streams
            .session_ended(link.peer, link.session, &wire.address_of(link.peer));
        // The peer hears of an end it does not know of; on shutdown, the goodbye on the
        // presence subject tells everyone at once.
        if !matches!(why, Ended::Shutdown | Ended::Goodbye | Ended::Reset) {
            wire.post(
                Some(link.peer),
                Packet::Reset {
                    from: wire.me,
                    to: link.peer,
                    session: link.session,
                },
            );
        }
    }

    fn address(&self) -> Address {
        self.0.wire.address_of(self.0.peer)
    }

    async fn open_stream(
        &self,
        header: StreamHeader,
        generation: u64,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
    ) -> Result<Box<dyn StreamSink>> {
        let link = &self.0;
        let sink = NatsSink::open(
            link.wire.clone(),
            link.peer,
            link.session,
            header,
            generation,
            max_chunk,
            stats,
        )
        .await?;
        Ok(Box::new(sink))
    }
}

/// How long shutdown waits for the server to take the last packets, and then for the tasks
/// to give up: shutdown takes at most twice this.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The connection options `config` asks for; connection events go to the host's
/// subscribers once it exists.
async fn connect_options(
    config: &NatsConfig,
    host: Arc<OnceLock<WeakHost>>,
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
            let (host, server) = (host.clone(), server.clone());
            async move {
                let publish = |e: Event| {
                    if let Some(h) = host.get().and_then(WeakHost::upgrade) {
                        h.publish(e);
                    }
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(server = %server, "NATS connected");
                        publish(Event::ConnectionEstablished { addr: server });
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(server = %server, "NATS disconnected; reconnecting");
                        publish(Event::ConnectionLost {
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
