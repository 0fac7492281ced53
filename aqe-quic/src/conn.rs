//! One connection to another endpoint: its writers, its control writer, its driver (what
//! arrives on it), and its liveness.
//!
//! Reliable messages go to a writer task per stream (one per ordered channel, a small pool
//! for unordered channels, one of its own for a large unordered message). A writer sends
//! what accumulated in one vectored write per wake-up. Senders never touch a QUIC stream;
//! they take room in the [`Outbox`] window and enqueue.
//!
//! Liveness: each side sends a heartbeat on the control stream every `heartbeatInterval`; a
//! connection on which nothing was heard for `livenessTimeout` is closed as unresponsive,
//! which fails its requests at once and orphans its unacknowledged messages for redelivery.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use s2n_quic::connection::{Handle, StreamAcceptor};
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::stream::{PeerStream, SendStream};
use tokio::sync::mpsc;
use tracing::Instrument;

use aqe_core::plumbing::LocalAgent;
use aqe_core::plumbing::{Delivered, FrameCodec};
use aqe_core::{
    AgentId, ChannelName, Envelope, Error, Inbound, IncomingStream, Receipt, Result, StreamHeader,
};

use crate::endpoint::{Frames, Shared};
use crate::inflow::Inflow;
use crate::link::{self, LinkStats};
use crate::outbox::{self, Lane, Outbox, Pending};
use crate::registry::ConnKey;
use crate::stream::{QuicResponder, QuicSource};
use crate::wire::{self, Control, FrameReader, Preamble, Sequenced, Unprocessed, close, reset};

/// The largest datagram frame sent: it fits in one packet on any QUIC path (the minimum
/// path MTU is 1200 bytes; headers, packet protection and the frame header take the rest).
/// A fixed limit keeps "too large" predictable instead of depending on path MTU discovery.
pub(crate) const MAX_DATAGRAM: usize = 1100;
/// Unordered messages above this size take a stream of their own, so that a large message
/// never holds back the small ones.
const LARGE_MESSAGE: usize = 64 * 1024;
/// Pooled streams per connection for small unordered messages: a lost packet holds back
/// only the messages of its stream.
const UNORDERED_POOL: usize = 4;
/// Frames a writer sends in one write, at most.
const WRITE_BATCH: usize = 256;
/// Control frames queued for a peer that does not read them before the connection is
/// declared unresponsive.
pub(crate) const CONTROL_QUEUE: usize = 4096;

/// A writer task's queue and how far it wrote.
#[derive(Clone)]
struct Writer {
    tx: mpsc::UnboundedSender<(u64, Bytes)>,
    written: Arc<AtomicU64>,
}

#[derive(Default)]
struct Writers {
    ordered: std::collections::HashMap<ChannelName, Writer>,
    pool: Vec<Writer>,
    next: usize,
}

pub(crate) struct Conn {
    pub(crate) key: ConnKey,
    /// The remote endpoint's id.
    pub(crate) endpoint: u64,
    /// Where the remote endpoint listens.
    pub(crate) listen: SocketAddr,
    pub(crate) handle: Handle,
    pub(crate) outbox: Outbox,
    pub(crate) inflow: Arc<Inflow>,
    control: mpsc::Sender<Control>,
    writers: Mutex<Writers>,
    link: Arc<LinkStats>,
    /// The request lane this side opened, once used.
    pub(crate) lane: tokio::sync::Mutex<Option<Arc<crate::lane::Lane>>>,
    born: Instant,
    /// Milliseconds after `born` when the peer was last heard from.
    heard_ms: AtomicU64,
    /// Set when this side closed the connection, with the code.
    closed_with: Mutex<Option<u32>>,
    retire: Mutex<Option<Retirement>>,
    pings: AtomicU32,
    /// The span of everything this connection does (`RUST_LOG=aqe_quic=debug` shows it):
    /// the remote endpoint's id and address.
    pub(crate) span: tracing::Span,
}

/// A connection being retired: drained when neither side needs it any more.
#[derive(Clone, Copy)]
struct Retirement {
    code: u32,
    since: Instant,
    drained_sent: bool,
    drained_received: bool,
}

impl Conn {
    pub(crate) fn new(
        key: ConnKey,
        endpoint: u64,
        listen: SocketAddr,
        handle: Handle,
        control: mpsc::Sender<Control>,
        window: usize,
    ) -> Self {
        let link = link::of(&handle);
        let span = tracing::info_span!(
            "connection",
            peer = %format_args!("{endpoint:016x}"),
            addr = %listen
        );
        Self {
            span,
            key,
            endpoint,
            listen,
            handle,
            outbox: Outbox::new(window),
            inflow: Arc::default(),
            control,
            writers: Mutex::default(),
            link,
            lane: tokio::sync::Mutex::new(None),
            born: Instant::now(),
            heard_ms: AtomicU64::new(0),
            closed_with: Mutex::new(None),
            retire: Mutex::new(None),
            pings: AtomicU32::new(0),
        }
    }

    pub(crate) fn link(&self) -> &LinkStats {
        &self.link
    }

    pub(crate) fn lost(&self, e: impl Into<aqe_core::BoxError>) -> Error {
        Error::ConnectionLost {
            addr: self.listen.into(),
            source: e.into(),
        }
    }

    /// Closes the connection with `code` (once).
    pub(crate) fn close(&self, code: u32) {
        let mut c = self.closed_with.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(code);
            self.handle.close(code.into());
        }
    }

    fn closed_with(&self) -> Option<u32> {
        *self.closed_with.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a control frame; a peer that let [`CONTROL_QUEUE`] of them pile up is not
    /// reading, and is closed as unresponsive.
    pub(crate) fn send_control(&self, c: Control) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.control.try_send(c) {
            tracing::warn!(peer = %self.listen, "peer does not read its control stream; closing");
            self.close(close::UNRESPONSIVE);
        }
    }

    fn heard(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heard_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.heard_ms.load(Ordering::Relaxed)))
    }

    /// Stops using the connection: closes it now, or once both sides drained it.
    pub(crate) fn retire(&self, code: u32, drain: bool) {
        if !drain {
            self.close(code);
            return;
        }
        let mut r = self.retire.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(Retirement {
                code,
                since: Instant::now(),
                drained_sent: false,
                drained_received: false,
            });
        }
    }

    /// Whether this side needs nothing more from the connection.
    async fn idle(&self) -> bool {
        if !self.outbox.is_empty() {
            return false;
        }
        match self.lane.lock().await.as_ref() {
            Some(lane) => lane.is_idle(),
            None => true,
        }
    }

    /// Drives a retirement on each heartbeat: announce `Drained` once idle, close once both
    /// sides are, or when draining took longer than `limit`.
    async fn step_retirement(&self, limit: Duration) {
        let Some(r) = *self.retire.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        if !r.drained_sent && self.idle().await {
            self.send_control(Control::Drained);
            if let Some(r) = self
                .retire
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                r.drained_sent = true;
            }
        }
        let r = self
            .retire
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(r);
        if (r.drained_sent && r.drained_received) || r.since.elapsed() > limit {
            self.close(r.code);
        }
    }

    fn peer_drained(&self) {
        if let Some(r) = self
            .retire
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            r.drained_received = true;
        }
    }

    /// Hands a reliable message to its writer; `admitted` says whether it took room in the
    /// window already (a redelivery is forced past it). `Err` gives it back when the
    /// connection has ended.
    #[allow(clippy::result_large_err)]
    pub(crate) fn enqueue(
        &self,
        shared: &Arc<Shared>,
        mut p: Pending,
        admitted: bool,
    ) -> std::result::Result<(), Pending> {
        let writer = self.writer(shared, &p.lane, p.body.len());
        p.written = Some(writer.written.clone());
        let body = p.body.clone();
        let seq = self.outbox.push(p, admitted)?;
        // A writer that ended leaves the message unacknowledged: it is orphaned, and
        // redelivered, when the connection closes (a writer only ends with its connection).
        let _ = writer.tx.send((seq, body));
        Ok(())
    }

    fn writer(&self, shared: &Arc<Shared>, lane: &Lane, len: usize) -> Writer {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        match lane {
            Lane::Ordered(channel) => w
                .ordered
                .entry(channel.clone())
                .or_insert_with(|| self.spawn_writer(shared, Preamble::Channel(channel.clone())))
                .clone(),
            Lane::Unordered if len > LARGE_MESSAGE => {
                self.spawn_writer(shared, Preamble::Unordered)
            }
            Lane::Unordered => {
                if w.pool.len() < UNORDERED_POOL {
                    let fresh = self.spawn_writer(shared, Preamble::Unordered);
                    w.pool.push(fresh);
                }
                w.next = (w.next + 1) % w.pool.len();
                w.pool[w.next].clone()
            }
        }
    }

    fn spawn_writer(&self, shared: &Arc<Shared>, preamble: Preamble) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let written = Arc::new(AtomicU64::new(0));
        shared.tasks.spawn(
            write_stream(
                shared.clone(),
                self.handle.clone(),
                self.key,
                preamble,
                rx,
                written.clone(),
            )
            .instrument(self.span.clone()),
        );
        Writer { tx, written }
    }

    /// A request: on the lane, or on a stream of its own when large.
    pub(crate) async fn request(
        &self,
        shared: &Arc<Shared>,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        if envelope.payload.len() > crate::lane::LANE_MAX_PAYLOAD {
            return self.request_on_stream(shared, &envelope, timeout).await;
        }
        let target = envelope
            .target()
            .cloned()
            .unwrap_or_else(|| AgentId::from("?"));
        // The exchange is made in the call, not bound first: a future moved into an awaited
        // one would keep its own slot too (twice the size, and a larger allocation).
        match tokio::time::timeout(timeout, async {
            let lane = {
                let mut slot = self.lane.lock().await;
                match slot.as_ref() {
                    Some(l) if !l.is_broken() => l.clone(),
                    _ => slot
                        .insert(crate::lane::Lane::open(shared, self).await?)
                        .clone(),
                }
            };
            let (answer, pending) = lane.request(&shared.tasks, envelope).await?;
            let down = answer
                .await
                .map_err(|_| self.lost("the connection closed before the answer"))?;
            pending.answered();
            Ok(down)
        })
        .await
        {
            Err(_) => Err(Error::Timeout {
                after: timeout,
                attempts: 1,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(crate::lane::Down::Response(response))) => Ok(response),
            Ok(Ok(crate::lane::Down::Refused(_))) => Err(Error::PeerNotFound { peer: target }),
            Ok(Ok(crate::lane::Down::Busy(_))) => Err(Error::Busy { peer: target }),
            Ok(Ok(crate::lane::Down::Dropped(_))) => Err(Error::Remote {
                agent: target,
                kind: aqe_core::RemoteErrorKind::Dropped,
                message: "the request was dropped without an answer".to_owned(),
            }),
        }
    }

    /// A request on a bidirectional stream of its own; the response comes back on it.
    async fn request_on_stream(
        &self,
        shared: &Shared,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let target = envelope.target().cloned();
        let frames = wire::frames(&shared.codec, &[&Preamble::Request, envelope])?;
        let mut send_half = None;
        let exchange = async {
            let stream = self
                .handle
                .clone()
                .open_bidirectional_stream()
                .await
                .map_err(|e| self.lost(e))?;
            let (recv, send) = stream.split();
            let send = send_half.insert(send);
            // The send side stays open until the answer: its end tells the responder we gave up.
            send.send(frames).await.map_err(|e| self.stream_failed(e))?;
            FrameReader::new(recv, shared.frame_limit(Frames::Data))
                .next::<Envelope>()
                .await
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        let target = || target.clone().unwrap_or_else(|| AgentId::from("?"));
        match outcome {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(Error::Remote {
                agent: target(),
                kind: aqe_core::RemoteErrorKind::Dropped,
                message: "the request was dropped without an answer".to_owned(),
            }),
            Ok(Err(Error::Stream {
                reason: aqe_core::StreamFailure::ClosedByPeer,
                ..
            })) => Err(Error::PeerNotFound { peer: target() }),
            Ok(Err(Error::Stream { .. })) => Err(self.lost("the request stream broke")),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if let Some(send) = send_half.as_mut() {
                    let _ = send.reset(reset::CANCELLED.into());
                }
                Err(Error::Timeout {
                    after: timeout,
                    attempts: 1,
                })
            }
        }
    }

    fn stream_failed(&self, e: s2n_quic::stream::Error) -> Error {
        wire::stream_error(self.listen, 0, e)
    }

    /// Unreliable: one DATAGRAM frame. Too large for the peer is an error, never a silent drop;
    /// a full send queue drops and says so.
    pub(crate) fn send_datagram(&self, frame: Bytes) -> Result<Delivered> {
        let (size, max) = (frame.len(), MAX_DATAGRAM);
        if size > max {
            return Err(Error::MessageTooLarge { size, max });
        }
        self.handle
            .datagram_mut(|s: &mut datagram::Sender| match s.send_datagram(frame) {
                Ok(()) => Ok(Delivered::Queued),
                Err(datagram::DatagramError::QueueAtCapacity { .. }) => Ok(Delivered::Dropped),
                Err(datagram::DatagramError::ExceedsPeerTransportLimits { .. }) => {
                    Err(Error::MessageTooLarge { size, max })
                }
                Err(e) => Err(Error::ConnectionLost {
                    addr: self.listen.into(),
                    source: format!("{e:?}").into(),
                }),
            })
            .map_err(|e| self.lost(e))?
    }

    /// Opens the stream of an agent stream and sends its preamble.
    pub(crate) async fn open_stream(
        &self,
        codec: &FrameCodec,
        header: &StreamHeader,
    ) -> Result<SendStream> {
        let mut s = self
            .handle
            .clone()
            .open_send_stream()
            .await
            .map_err(|e| self.lost(e))?;
        s.send(codec.encode_to_bytes(&Preamble::Stream(header.clone()))?)
            .await
            .map_err(|e| self.stream_failed(e))?;
        Ok(s)
    }
}

/// Writes one stream: opens it, sends the preamble, then [`Sequenced`] frames as they come,
/// all that accumulated in one vectored write. Ends, finishing the stream, once its queue is
/// dropped: with its connection, or at once for a large message's own stream (nobody keeps
/// that queue after the one message), and at shutdown. A stream that fails while its connection lives closes the
/// connection, so that what it held is orphaned and redelivered rather than stuck.
async fn write_stream(
    shared: Arc<Shared>,
    handle: Handle,
    key: ConnKey,
    preamble: Preamble,
    mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    written: Arc<AtomicU64>,
) {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        tracing::debug!(%e, "{what}");
        shared.close_conn(key, close::PROTOCOL_VIOLATION);
    };
    let mut handle = handle;
    let mut stream = match handle.open_send_stream().await {
        Ok(s) => s,
        Err(e) => return fail("cannot open a stream", &e),
    };
    let Ok(first) = shared.codec.encode_to_bytes(&preamble) else {
        return;
    };
    let mut pending_preamble = Some(first);
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * WRITE_BATCH + 1);
    loop {
        let n = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
        };
        if n == 0 {
            let _ = stream.finish();
            return;
        }
        chunks.clear();
        chunks.extend(pending_preamble.take());
        let mut last = 0;
        for (seq, body) in batch.drain(..) {
            match wire::sequenced_header(seq, body.len()) {
                Ok(h) => chunks.push(h),
                Err(e) => return fail("cannot frame a message", &e),
            }
            chunks.push(body);
            last = seq;
        }
        if let Err(e) = stream.send_vectored(&mut chunks).await {
            return fail("a message stream failed", &e);
        }
        written.store(last, Ordering::Release);
    }
}

/// Writes the control stream: acknowledgements first, then queued frames, as one write per
/// wake-up. A write that cannot complete within the send timeout means the peer stopped
/// reading: the connection is closed as unresponsive.
pub(crate) async fn write_control(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut send: SendStream,
    mut rx: mpsc::Receiver<Control>,
) {
    let mut buf = BytesMut::new();
    let timeout = shared.config.send_timeout;
    loop {
        let mut queued = Vec::new();
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return,
            c = rx.recv() => match c {
                Some(c) => queued.push(c),
                None => return,
            },
            () = conn.inflow.wake.notified() => {}
        }
        while let Ok(c) = rx.try_recv() {
            queued.push(c);
        }
        let mut frames = conn.inflow.drain();
        frames.extend(queued);
        buf.clear();
        for f in &frames {
            if let Err(e) = shared.codec.encode(f, &mut buf) {
                tracing::error!(error = %e, "cannot encode a control frame");
            }
        }
        if buf.is_empty() {
            continue;
        }
        match tokio::time::timeout(timeout, send.send(buf.split().freeze())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(peer = %conn.listen, "control stream blocked for the send timeout; closing");
                conn.close(close::UNRESPONSIVE);
                return;
            }
        }
    }
}

/// Serves a connection until it ends: control frames, heartbeats and liveness, incoming
/// streams, datagrams.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut control: FrameReader,
    mut acceptor: StreamAcceptor,
) {
    let config = &shared.config;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    conn.heard();
    let reason = loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            msg = control.next::<Control>() => match msg {
                Ok(Some(c)) => {
                    conn.heard();
                    match c {
                        Control::Ack(ranges) => {
                            conn.outbox.settle(&ranges).into_iter().for_each(outbox::delivered);
                            shared.progress.notify_waiters();
                        }
                        Control::Unprocessed(ranges, why) => {
                            let gone = conn.outbox.settle(&ranges);
                            tracing::debug!(peer = %conn.listen, n = gone.len(), ?why, "messages not taken by their receiver");
                            outbox::failed(&shared.events, gone, |_| unprocessed_reason(why));
                            shared.progress.notify_waiters();
                        }
                        Control::Ping(_) => {}
                        Control::Drained => conn.peer_drained(),
                        other => shared.on_control(conn.key, other),
                    }
                }
                Ok(None) => break "the peer closed its control stream".to_owned(),
                Err(e @ (Error::Stream { .. } | Error::ConnectionLost { .. })) => break e.to_string(),
                Err(e) => {
                    conn.close(close::PROTOCOL_VIOLATION);
                    break format!("protocol violation on the control stream: {e}");
                }
            },
            stream = acceptor.accept() => match stream {
                Ok(Some(s)) => {
                    conn.heard();
                    shared
                        .tasks
                        .spawn(serve(shared.clone(), conn.clone(), s).instrument(conn.span.clone()));
                }
                Ok(None) => break "connection closed".to_owned(),
                Err(e) => break e.to_string(),
            },
            dgram = recv_datagram(&conn.handle) => match dgram {
                Some(bytes) => {
                    conn.heard();
                    datagram_arrived(&shared, &conn, bytes);
                }
                None => break "connection closed".to_owned(),
            },
            _ = heartbeat.tick() => {
                if conn.silent_for() > config.liveness_timeout {
                    tracing::warn!(peer = %conn.listen, silent = ?conn.silent_for(), "peer unresponsive; closing");
                    conn.close(close::UNRESPONSIVE);
                    break format!("nothing heard for {:?}", config.liveness_timeout);
                }
                let n = conn.pings.fetch_add(1, Ordering::Relaxed);
                conn.send_control(Control::Ping(u64::from(n)));
                conn.step_retirement(config.delivery_deadline).await;
            },
        }
    };
    let clean = match conn.closed_with() {
        Some(code) => code != close::UNRESPONSIVE && code != close::PROTOCOL_VIOLATION,
        None => peer_said_goodbye(&conn.handle),
    };
    conn.close(close::NORMAL);
    shared.connection_ended(&conn, clean, reason);
}

/// Whether the peer closed the connection itself with a goodbye code.
fn peer_said_goodbye(handle: &Handle) -> bool {
    let mut handle = handle.clone();
    match futures::FutureExt::now_or_never(handle.open_send_stream()) {
        Some(Err(s2n_quic::connection::Error::Application { error, .. })) => {
            let code = u64::from(error);
            [close::NORMAL, close::DUPLICATE, close::REPLACED]
                .iter()
                .any(|c| u64::from(*c) == code)
        }
        _ => false,
    }
}

async fn recv_datagram(handle: &Handle) -> Option<Bytes> {
    futures::future::poll_fn(|cx| {
        match handle.datagram_mut(|r: &mut datagram::Receiver| r.poll_recv_datagram(cx)) {
            Ok(Poll::Ready(Ok(b))) => Poll::Ready(Some(b)),
            Ok(Poll::Ready(Err(_))) | Err(_) => Poll::Ready(None),
            Ok(Poll::Pending) => Poll::Pending,
        }
    })
    .await
}

/// The local agent an envelope from `conn` is for, if it may have it: its sender must not be
/// an agent known to live elsewhere (here, or behind another endpoint); its receiver must be
/// hosted here and listen on the envelope's channel.
pub(crate) fn admit(shared: &Shared, conn: &Conn, envelope: &Envelope) -> Option<Arc<LocalAgent>> {
    if !shared.may_send_from(&envelope.from, conn.endpoint) {
        tracing::debug!(from = %envelope.from, peer = %conn.listen, "envelope from an agent that lives elsewhere; refused");
        return None;
    }
    let local = shared.local(envelope.target()?)?;
    local.reg.has_channel(&envelope.channel).then_some(local)
}

fn datagram_arrived(shared: &Shared, conn: &Conn, bytes: Bytes) {
    let len = bytes.len();
    let envelope = match shared.codec.decode_exact::<Envelope>(&bytes) {
        Ok(e) => e,
        Err(e) => {
            return tracing::debug!(peer = %conn.listen, error = %e, "malformed datagram dropped");
        }
    };
    let Some(local) = admit(shared, conn, &envelope) else {
        return;
    };
    match local.inbox.try_reserve() {
        Ok(Some(permit)) => {
            let _ = permit.send_counted(Inbound::message(envelope), || local.stats.received(len));
        }
        Ok(None) | Err(_) => local.stats.dropped(),
    }
}

/// Puts a reliable message in its agent's inbox at once (the sender's window bounds what can
/// be in flight), with a receipt on this connection; a message nobody here can take is
/// refused, so the sender learns it.
///
/// # Errors
/// [`Error::Protocol`] when the peer has more messages unsettled here than the windows it was
/// given allow (one window per local agent): it ignored them, and the stream is closed.
fn deliver_sequenced(shared: &Shared, conn: &Conn, seq: u64, envelope: Envelope) -> Result<()> {
    let Some(local) = admit(shared, conn, &envelope) else {
        conn.inflow.refuse(seq);
        return Ok(());
    };
    let allowed = shared.config.window as usize * shared.local_count().max(1);
    if !conn.inflow.take_one(allowed) {
        return Err(Error::Protocol {
            detail: "the peer sent more unacknowledged messages than its windows allow",
        });
    }
    let len = envelope.payload.len();
    let sink: Arc<dyn aqe_core::plumbing::AckSink> = conn.inflow.clone();
    let item = Inbound::Message {
        envelope,
        receipt: Receipt::shared(sink, seq),
    };
    if let Err((_, item)) = local.inbox.deliver_now(item, || local.stats.received(len)) {
        // The agent is stopping: it will never take it.
        item.abandon();
    }
    Ok(())
}

async fn serve(shared: Arc<Shared>, conn: Arc<Conn>, stream: PeerStream) {
    let outcome = match stream {
        PeerStream::Bidirectional(s) => {
            let (recv, send) = s.split();
            let mut reader = FrameReader::new(recv, shared.frame_limit(Frames::Control));
            match reader.next::<Preamble>().await {
                Ok(Some(Preamble::Request)) => {
                    reader.set_limit(shared.frame_limit(Frames::Data));
                    serve_request(&shared, &conn, reader, send).await
                }
                Ok(Some(Preamble::Lane)) => {
                    reader.set_limit(shared.frame_limit(Frames::Lane));
                    crate::lane::serve(shared.clone(), conn.clone(), reader, send).await
                }
                Ok(Some(_)) => Err(Error::Protocol {
                    detail: "a bidirectional stream must carry a request or the lane",
                }),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
        PeerStream::Receive(recv) => {
            let reader = FrameReader::new(recv, shared.frame_limit(Frames::Control));
            serve_receive(&shared, &conn, reader).await
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(peer = %conn.listen, error = %e, "incoming stream failed");
        if matches!(
            e,
            Error::Malformed { .. }
                | Error::FrameTooLarge { .. }
                | Error::UnsupportedVersion { .. }
                | Error::Protocol { .. }
                | Error::Truncated { .. }
        ) {
            conn.close(close::PROTOCOL_VIOLATION);
        }
    }
}

async fn serve_request(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    mut reader: FrameReader,
    mut send: SendStream,
) -> Result<()> {
    let envelope: Envelope = reader.next().await?.ok_or(Error::Protocol {
        detail: "request stream without a request",
    })?;
    let Some(local) = admit(shared, conn, &envelope) else {
        reader.stop(reset::REFUSED);
        let _ = send.reset(reset::REFUSED.into());
        return Ok(());
    };
    let len = envelope.payload.len();
    let requester = envelope.from.clone();
    let responder = aqe_core::Responder::new(QuicResponder::new(
        send,
        reader,
        shared.codec,
        local.clone(),
        requester,
        shared.config.send_timeout,
    ));
    // A request stream is one of the connection's bounded streams: it waits in the inbox
    // above capacity rather than hold the stream open waiting for room.
    let item = Inbound::Request {
        envelope,
        responder,
    };
    if let Err((_, item)) = local.inbox.deliver_now(item, || local.stats.received(len)) {
        item.abandon();
    }
    Ok(())
}

async fn serve_receive(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    mut reader: FrameReader,
) -> Result<()> {
    let preamble = reader.next::<Preamble>().await?;
    reader.set_limit(shared.frame_limit(Frames::Data));
    match preamble {
        Some(Preamble::Channel(channel)) => {
            while let Some(Sequenced { seq, envelope }) = reader.next::<Sequenced>().await? {
                if envelope.channel != channel {
                    return Err(Error::Protocol {
                        detail: "envelope on another channel's stream",
                    });
                }
                deliver_sequenced(shared, conn, seq, envelope)?;
            }
            Ok(())
        }
        Some(Preamble::Unordered) => {
            while let Some(Sequenced { seq, envelope }) = reader.next::<Sequenced>().await? {
                deliver_sequenced(shared, conn, seq, envelope)?;
            }
            Ok(())
        }
        Some(Preamble::Stream(header)) => {
            let allowed = shared.may_send_from(&header.from, conn.endpoint);
            let local = shared
                .local(&header.to)
                .filter(|l| allowed && l.reg.has_channel(&header.options.channel));
            let Some(local) = local else {
                reader.stop(reset::REFUSED);
                return Ok(());
            };
            local.stats.stream_delta(true);
            let source = QuicSource::new(header.id, reader, local.clone());
            let item = Inbound::Stream(IncomingStream::new(header, source));
            if let Err((_, item)) = local.inbox.deliver_now(item, || {}) {
                item.abandon();
            }
            Ok(())
        }
        Some(Preamble::Request | Preamble::Lane) => Err(Error::Protocol {
            detail: "a request on a unidirectional stream",
        }),
        None => Ok(()),
    }
}

/// Why messages sent on a connection were not taken, as the sender reports it: either way
/// the receiving agent is not there to take them, and they were not processed.
fn unprocessed_reason(why: Unprocessed) -> aqe_core::DeliveryFailure {
    match why {
        Unprocessed::NotHere | Unprocessed::Stopped => aqe_core::DeliveryFailure::ReceiverStopped,
    }
}
