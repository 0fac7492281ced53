//! One connection: the link of one session. Frames the session sends go to a writer task
//! per lane (each lane a QUIC stream, so that lanes never hold each other back); frames that
//! arrive on any stream or datagram go to the session; agent streams are QUIC streams of
//! their own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use s2n_quic::connection::{Handle, StreamAcceptor};
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::stream::{PeerStream, SendStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use aqe_core::plumbing::{FastMap, StatsRecorder};
use aqe_core::{
    Address, ChannelName, Error, Inbound, IncomingStream, Result, StreamHeader, StreamSink,
};
use aqe_link::{Host, Link, LinkFigures, SessionHandle};
use aqe_session::{Ended, Frame, Lane, Transmit};

use crate::codec::FRAME_HEADER_LEN;
use crate::link::LinkStats;
use crate::sched::{CHUNK, Gate, Tally};
use crate::stream::{QuicSink, QuicSource};
use crate::wire::{
    self, FrameCodec, FrameReader, LARGE, Preamble, REQUEST_VARIANTS, Reassembly, WIRE_VERSION,
    close, reset,
};

/// Pooled streams per connection and priority for unordered messages: a lost packet holds
/// back only the messages of its stream, and a message never waits behind one of a lower
/// priority in its stream.
const UNORDERED_POOL: usize = 4;
/// Datagrams s2n-quic queues per connection, each way.
pub(crate) const DATAGRAM_QUEUE: usize = 1024;
/// Frames a writer takes in one wake-up, at most.
const WRITE_BATCH: usize = 256;
/// Room in a frame limit for an envelope's fields other than its payload.
pub(crate) const ENVELOPE_OVERHEAD: usize = 64 * 1024;

/// How large the frames a connection accepts may be, by what carries them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Before a stream says what it carries (a preamble), and the control stream.
    pub(crate) control: usize,
    /// Frames of lanes whose large payloads go on streams of their own.
    pub(crate) small: usize,
    /// Unsettled reliable bytes one peer may have this endpoint hold.
    pub(crate) session_bytes: u64,
}

impl Limits {
    /// Frames that may hold the largest message of any local agent's channels, now. Agents
    /// come and go while a connection lives, so this is read when a stream says what it
    /// carries and again before a frame is refused as too large, never fixed at the
    /// handshake.
    pub(crate) fn data(host: &Host) -> usize {
        let largest = host
            .locals()
            .iter()
            .flat_map(|l| l.reg.channels.iter().map(|c| c.max_message_size))
            .max()
            .unwrap_or(aqe_core::DEFAULT_MAX_MESSAGE_SIZE)
            .max(aqe_core::DEFAULT_MAX_MESSAGE_SIZE);
        largest + ENVELOPE_OVERHEAD
    }

    /// Bytes of partial frames the connection's streams may hold together, now: what a
    /// peer within the session's windows can need (its unsettled bytes, one message beyond,
    /// and an agent stream's chunk), beyond which it is closed.
    fn partial(&self, host: &Host) -> u64 {
        self.session_bytes + 2 * Self::data(host) as u64
    }
}

type Writer = mpsc::UnboundedSender<Transmit>;

#[derive(Default)]
struct Pool {
    writers: Vec<Writer>,
    next: usize,
}

#[derive(Default)]
struct Lanes {
    ordered: FastMap<ChannelName, Writer>,
    pools: FastMap<aqe_core::Priority, Pool>,
    requests: Option<Writer>,
    answers: Option<Writer>,
}

/// The link of one session: a QUIC connection.
pub(crate) struct QuicLink {
    handle: Handle,
    /// Where the peer listens (the IP its connection comes from, the port its hello said).
    listen: SocketAddr,
    stats: Arc<LinkStats>,
    control: Writer,
    lanes: Mutex<Lanes>,
    /// Lanes' writers take turns by priority.
    gate: Gate,
    tasks: TaskTracker,
    /// Ends the link's writers: cancelled when the connection closes (the lanes and the
    /// writers hold each other, so nothing else would end an idle one) or the host stops.
    stop: CancellationToken,
    send_timeout: Duration,
    closed: Mutex<bool>,
    /// A datagram was sent since the last [`Link::flush`]: only then has a flush anything
    /// to wait for.
    unflushed: std::sync::atomic::AtomicBool,
    span: tracing::Span,
}

impl QuicLink {
    /// The link over `handle`, whose control stream's sending half is `control`.
    pub(crate) fn new(
        handle: Handle,
        listen: SocketAddr,
        control: SendStream,
        host: &Host,
        send_timeout: Duration,
        peer: aqe_session::EndpointId,
    ) -> Arc<Self> {
        let span = tracing::info_span!("connection", peer = %peer, addr = %listen);
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            stats: crate::link::of(&handle),
            handle,
            listen,
            control: tx,
            lanes: Mutex::default(),
            gate: Gate::default(),
            tasks: host.tasks().clone(),
            stop: host.stopping().child_token(),
            send_timeout,
            closed: Mutex::new(false),
            unflushed: std::sync::atomic::AtomicBool::new(false),
            span,
        });
        link.tasks
            .spawn(write_control(link.clone(), control, rx).instrument(link.span.clone()));
        link
    }

    /// Closes the connection with `code` (once).
    pub(crate) fn close_with(&self, code: u32) {
        let mut c = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !*c {
            *c = true;
            self.handle.close(code.into());
            self.gate.close();
        }
        self.stop.cancel();
    }

    fn writer(self: &Arc<Self>, preamble: Preamble) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tasks
            .spawn(write_stream(self.clone(), preamble, rx).instrument(self.span.clone()));
        tx
    }

    fn lane(self: &Arc<Self>, t: &Transmit) -> Option<Writer> {
        let large = t.size_hint() > LARGE;
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        Some(match t.lane() {
            Lane::Control => self.control.clone(),
            Lane::Datagram => return None,
            Lane::Ordered(channel) => lanes
                .ordered
                .entry(channel.clone())
                .or_insert_with(|| self.writer(Preamble::Channel(channel.clone())))
                .clone(),
            Lane::Unordered | Lane::Requests | Lane::Answers if large => {
                self.writer(Preamble::Large)
            }
            Lane::Unordered => {
                let pool = lanes.pools.entry(t.priority()).or_default();
                if pool.writers.len() < UNORDERED_POOL {
                    let w = self.writer(Preamble::Unordered);
                    pool.writers.push(w);
                }
                pool.next = (pool.next + 1) % pool.writers.len();
                pool.writers[pool.next].clone()
            }
            Lane::Requests => lanes
                .requests
                .get_or_insert_with(|| self.writer(Preamble::Requests))
                .clone(),
            Lane::Answers => lanes
                .answers
                .get_or_insert_with(|| self.writer(Preamble::Answers))
                .clone(),
        })
    }

    /// Queues a datagram; `false` when s2n-quic's queue refused it (full, or the
    /// connection is gone).
    fn send_datagram(&self, t: &Transmit) -> bool {
        let Ok(bytes) = wire::datagram(t) else {
            return false;
        };
        self.unflushed
            .store(true, std::sync::atomic::Ordering::Release);
        matches!(
            self.handle
                .datagram_mut(|s: &mut datagram::Sender| s.send_datagram(bytes)),
            Ok(Ok(()))
        )
    }
}

/// A link is held as the trait object the host knows; the writers need the concrete one.
pub(crate) struct LinkRef(pub(crate) Arc<QuicLink>);

#[async_trait]
impl Link for LinkRef {
    fn transmit(&self, frames: &mut Vec<Transmit>) -> usize {
        // Counted before any writer can see them, so that no writer of a lower priority
        // starts a chunk while they wait.
        let mut queued = Tally::default();
        for t in frames.iter().filter(|t| gated(t)) {
            queued.add(t.priority());
        }
        self.0.gate.queued(&queued);
        let mut refused = 0;
        // The writer of the last frame, reused while frames keep to its lane (a batch of one
        // ordered channel looks its lane up once); an unordered frame takes the next writer
        // of its pool, and a large one a stream of its own, each time.
        let mut last: Option<(Lane, Writer)> = None;
        for t in frames.drain(..) {
            let small = t.size_hint() <= LARGE;
            let fresh;
            let writer = match &last {
                Some((lane, w)) if small && lane == t.lane() => Some(w),
                _ => {
                    fresh = self.0.lane(&t);
                    last = match (&fresh, t.lane()) {
                        (
                            Some(w),
                            lane @ (Lane::Control
                            | Lane::Ordered(_)
                            | Lane::Requests
                            | Lane::Answers),
                        ) if small => Some((lane.clone(), w.clone())),
                        _ => None,
                    };
                    fresh.as_ref()
                }
            };
            match writer {
                Some(w) => {
                    let p = gated(&t).then(|| t.priority());
                    // A writer ends only with its connection: the session hears of it.
                    if w.send(t).is_err()
                        && let Some(p) = p
                    {
                        let mut lost = Tally::default();
                        lost.add(p);
                        self.0.gate.done(&mut lost);
                    }
                }
                None => refused += usize::from(!self.0.send_datagram(&t)),
            }
        }
        refused
    }

    fn close(&self, why: Ended) {
        self.0.close_with(wire::close_code(why));
    }

    /// Until s2n-quic's datagram queue of the connection is empty and what was sent is
    /// acknowledged (a datagram the peer's QUIC stack acknowledged is in its queue before
    /// the goodbye that follows), or the connection is gone.
    async fn flush(&self) {
        if !self
            .0
            .unflushed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        loop {
            let queued = self.0.handle.datagram_mut(|s: &mut datagram::Sender| {
                let mut n = 0usize;
                s.retain_datagrams(|_| {
                    n += 1;
                    true
                });
                n
            });
            match queued {
                Err(_) => return,
                Ok(0) if self.0.stats.all_acknowledged() => return,
                Ok(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn address(&self) -> Address {
        self.0.listen.into()
    }

    fn figures(&self) -> Option<LinkFigures> {
        let r = self.0.stats.read();
        Some(LinkFigures {
            rtt: r.rtt(),
            smoothed_rtt: if r.rtt_samples > 0 {
                r.smoothed_rtt
            } else {
                Duration::ZERO
            },
            congestion_window: r.cwnd,
            packets_sent: r.packets_sent,
            packets_lost: r.packets_lost,
        })
    }

    async fn open_stream(
        &self,
        header: StreamHeader,
        generation: u64,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
    ) -> Result<Box<dyn StreamSink>> {
        let link = &self.0;
        let mut send = link
            .handle
            .clone()
            .open_send_stream()
            .await
            .map_err(|e| lost(link.listen, e))?;
        let preamble = FrameCodec::default().encode_to_bytes(&Preamble::Stream {
            header: header.clone(),
            generation,
        })?;
        send.send(preamble)
            .await
            .map_err(|e| wire::stream_error(link.listen, send.id(), e))?;
        Ok(Box::new(QuicSink::new(
            &header,
            send,
            max_chunk,
            stats,
            link.send_timeout,
        )))
    }
}

fn lost(addr: SocketAddr, e: impl Into<aqe_core::BoxError>) -> Error {
    Error::ConnectionLost {
        addr: addr.into(),
        source: e.into(),
    }
}

/// Whether `t` waits for its turn: everything but the control lane (small, and what keeps
/// the session alive) and datagrams (s2n-quic's datagram queue).
fn gated(t: &Transmit) -> bool {
    !matches!(t.lane(), Lane::Control | Lane::Datagram)
}

/// Writes `chunks` at priority `p`, at most [`CHUNK`] bytes a turn (a large envelope is
/// split, never copied), so that a higher priority waits for one chunk at most.
async fn write_turns(
    gate: &Gate,
    stream: &mut SendStream,
    chunks: &mut Vec<Bytes>,
    group: &mut Vec<Bytes>,
    p: aqe_core::Priority,
) -> std::result::Result<(), s2n_quic::stream::Error> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    if total <= CHUNK {
        gate.turn(p).await;
        return stream.send_vectored(chunks).await;
    }
    let mut room = CHUNK;
    for mut c in chunks.drain(..) {
        while !c.is_empty() {
            let piece = c.split_to(c.len().min(room));
            room -= piece.len();
            group.push(piece);
            if room == 0 {
                gate.turn(p).await;
                stream.send_vectored(group).await?;
                group.clear();
                room = CHUNK;
            }
        }
    }
    if !group.is_empty() {
        gate.turn(p).await;
        stream.send_vectored(group).await?;
        group.clear();
    }
    Ok(())
}

/// Appends the frame of `t` to `head`; a payload its envelope's encoding left apart (see
/// [`aqe_core::Encoded`], and [`wire::frame_parts`] for the frames that carry an envelope)
/// goes to `chunks` as it is, never copied, after what `head` held.
/// Frames without such a payload accumulate in `head`, which the caller pushes last.
fn frame_into(t: &Transmit, head: &mut BytesMut, chunks: &mut Vec<Bytes>) -> Result<()> {
    match t {
        Transmit::Message { body, .. } | Transmit::Fanout { body, .. } => {
            let start = head.len();
            head.put_u32(0);
            head.put_u8(WIRE_VERSION);
            if let Err(e) = t.encode_head(head) {
                head.truncate(start);
                return Err(Error::Encode {
                    what: "frame",
                    source: Box::new(e),
                });
            }
            let len = head.len() - start - 4 + body.len();
            let Ok(len32) = u32::try_from(len) else {
                head.truncate(start);
                return Err(Error::MessageTooLarge {
                    size: len,
                    max: wire::MAX_FRAME_LEN,
                });
            };
            head[start..start + 4].copy_from_slice(&len32.to_be_bytes());
            head.extend_from_slice(body.head());
            if !body.tail().is_empty() {
                chunks.push(head.split().freeze());
                chunks.push(body.tail().clone());
            }
        }
        Transmit::Frame(..) => {
            if let Some(tail) = wire::frame_parts(t, head)? {
                chunks.push(head.split().freeze());
                chunks.push(tail);
            }
        }
    }
    Ok(())
}

/// What framing `t` writes into the head buffer, about (a frame's payload set apart is not).
fn head_room(t: &Transmit) -> usize {
    match t {
        Transmit::Message { body, .. } | Transmit::Fanout { body, .. } => {
            4 + 1 + t.head_hint() + body.head().len()
        }
        Transmit::Frame(..) if t.size_hint() >= aqe_core::SPLIT_FROM + 64 => 256,
        Transmit::Frame(..) => t.size_hint(),
    }
}

/// Frames `batch` after what `chunks` holds, counting each frame's priority in `tally`.
fn frame_batch(
    batch: &mut Vec<Transmit>,
    head: &mut BytesMut,
    chunks: &mut Vec<Bytes>,
    tally: &mut Tally,
) {
    // Room for the whole batch but the payloads set apart: one allocation per batch, not
    // one (or two) per frame as the buffer grows.
    head.reserve(batch.iter().map(head_room).sum());
    for t in batch.drain(..) {
        tally.add(t.priority());
        if let Err(e) = frame_into(&t, head, chunks) {
            tracing::error!(error = %e, "cannot frame what a session sends");
        }
    }
    if !head.is_empty() {
        chunks.push(head.split().freeze());
    }
}

/// Writes one lane's stream: its preamble, then what accumulated, one vectored write per
/// wake-up. A large frame's stream ends after it.
async fn write_stream(
    link: Arc<QuicLink>,
    preamble: Preamble,
    mut rx: mpsc::UnboundedReceiver<Transmit>,
) {
    let large = preamble == Preamble::Large;
    let mut stream = match link.handle.clone().open_send_stream().await {
        Ok(s) => s,
        Err(e) => {
            return tracing::debug!(error = %e, "cannot open a stream: the connection is gone");
        }
    };
    let Ok(first) = FrameCodec::default().encode_to_bytes(&preamble) else {
        return;
    };
    let mut pending = Some(first);
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut head = BytesMut::new();
    let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * WRITE_BATCH + 1);
    let mut group: Vec<Bytes> = Vec::new();
    let mut tally = Tally::default();
    loop {
        let n = tokio::select! {
            () = link.stop.cancelled() => return,
            n = rx.recv_many(&mut batch, if large { 1 } else { WRITE_BATCH }) => n,
        };
        if n == 0 {
            let _ = stream.finish();
            return;
        }
        chunks.clear();
        chunks.extend(pending.take());
        frame_batch(&mut batch, &mut head, &mut chunks, &mut tally);
        let written = write_turns(
            &link.gate,
            &mut stream,
            &mut chunks,
            &mut group,
            tally.top(),
        )
        .await;
        link.gate.done(&mut tally);
        if let Err(e) = written {
            tracing::debug!(error = %e, "a lane's stream failed");
            // The peer refused a lane: it does not speak this protocol.
            link.close_with(close::PROTOCOL_VIOLATION);
            return;
        }
        if large {
            let _ = stream.finish();
            return;
        }
    }
}

/// Writes the control stream: what accumulated, in one write per wake-up. A write that
/// cannot complete within the send timeout means the peer stopped reading it: the
/// connection is closed as unresponsive.
async fn write_control(
    link: Arc<QuicLink>,
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Transmit>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut buf = BytesMut::new();
    loop {
        let n = tokio::select! {
            () = link.stop.cancelled() => return,
            n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        for t in batch.drain(..) {
            if let Err(e) = wire::frame_transmit(&t, &mut buf) {
                tracing::error!(error = %e, "cannot encode a control frame");
            }
        }
        match tokio::time::timeout(link.send_timeout, send.send(buf.split().freeze())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(peer = %link.listen, "control stream blocked for the send timeout; closing");
                link.close_with(close::UNRESPONSIVE);
                return;
            }
        }
    }
}

/// Serves a connection until it ends: the control stream, the streams the peer opens, its
/// datagrams. Then the session hears its link is gone.
pub(crate) async fn serve(
    host: Host,
    session: SessionHandle,
    link: Arc<QuicLink>,
    mut control: FrameReader,
    mut acceptor: StreamAcceptor,
    limits: Limits,
) {
    let stop = host.stopping();
    let reassembly = {
        let (cap, budgets, host) = (limits.partial(&host), host.budgets().clone(), host.clone());
        Reassembly::new(cap, Box::new(move || limits.partial(&host)), budgets)
    };
    // Agent streams are paced by their readers, not by the session's windows: only the
    // endpoint's budget bounds them.
    let streams = Reassembly::new(u64::MAX, Box::new(|| u64::MAX), host.budgets().clone());
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            read = control.batch(&mut frames) => match read {
                Ok(()) if frames.is_empty() => break,
                Ok(()) => {
                    // Datagrams that came before these frames go first: an agent's departure
                    // must not overtake what it sent just before.
                    if drain_datagrams(&host, &session, &link).is_err() {
                        break;
                    }
                    if let Err(rule) = host.frames(&session, frames.drain(..)) {
                        tracing::debug!(peer = %link.listen, rule, "protocol violation; closing");
                        link.close_with(close::PROTOCOL_VIOLATION);
                        break;
                    }
                }
                Err(Error::Stream { .. } | Error::ConnectionLost { .. }) => break,
                Err(e) => {
                    tracing::debug!(peer = %link.listen, error = %e, "malformed control frame; closing");
                    link.close_with(close::PROTOCOL_VIOLATION);
                    break;
                }
            },
            stream = acceptor.accept() => match stream {
                Ok(Some(PeerStream::Receive(recv))) => {
                    let mut reader = FrameReader::new(recv, FrameCodec::new(limits.control));
                    // Nothing is read yet: counting nothing cannot fail.
                    let _ = reader.account(reassembly.clone());
                    host.tasks().spawn(
                        read_stream(host.clone(), session.clone(), link.clone(), reader, limits, [reassembly.clone(), streams.clone()])
                            .instrument(link.span.clone()),
                    );
                }
                Ok(Some(PeerStream::Bidirectional(_))) => {
                    tracing::debug!(peer = %link.listen, "a peer opened a second bidirectional stream; closing");
                    link.close_with(close::PROTOCOL_VIOLATION);
                    break;
                }
                Ok(None) | Err(_) => break,
            },
            dgram = recv_datagram(&link.handle) => match dgram {
                Some(bytes) => {
                    if datagram_in(&host, &session, &link, &bytes).is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let why = peer_closed(&link.handle).unwrap_or(Ended::LinkLost);
    link.close_with(close::NORMAL);
    host.end(&session, why);
}

/// Hands the session the datagrams already received; `Err` when the connection was closed
/// for a violation.
fn drain_datagrams(host: &Host, session: &SessionHandle, link: &QuicLink) -> Result<(), ()> {
    // At most a receive queue's worth: a peer that keeps sending cannot hold the reader here.
    for _ in 0..DATAGRAM_QUEUE {
        match link
            .handle
            .datagram_mut(|r: &mut datagram::Receiver| r.recv_datagram())
        {
            Ok(Some(bytes)) => datagram_in(host, session, link, &bytes)?,
            _ => break,
        }
    }
    Ok(())
}

/// One datagram for the session: malformed ones are dropped; `Err` when the session found
/// a violation (the connection is closed).
fn datagram_in(
    host: &Host,
    session: &SessionHandle,
    link: &QuicLink,
    bytes: &[u8],
) -> Result<(), ()> {
    match wire::decode_datagram(bytes) {
        Ok(f @ Frame::Datagram { .. }) => {
            if host.frames(session, [f]).is_err() {
                link.close_with(close::PROTOCOL_VIOLATION);
                return Err(());
            }
        }
        Ok(_) | Err(_) => {
            tracing::debug!(peer = %link.listen, "malformed datagram dropped");
        }
    }
    Ok(())
}

/// How the session ended when the peer closed the connection itself with a clean code: a
/// goodbye (`NORMAL`), or another session between the two endpoints is kept (`DUPLICATE`:
/// what this one leaves waits for that one to announce its agents).
fn peer_closed(handle: &Handle) -> Option<Ended> {
    let mut handle = handle.clone();
    match futures::FutureExt::now_or_never(handle.open_send_stream()) {
        Some(Err(s2n_quic::connection::Error::Application { error, .. })) => {
            match u64::from(error) {
                c if c == u64::from(close::NORMAL) => Some(Ended::Goodbye),
                c if c == u64::from(close::DUPLICATE) => Some(Ended::Superseded),
                _ => None,
            }
        }
        _ => None,
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

/// Whether `frame` may travel on a stream that began with `preamble`.
fn fits(preamble: &Preamble, frame: &Frame) -> bool {
    match (preamble, frame) {
        (
            Preamble::Channel(ch),
            Frame::Message { envelope, .. } | Frame::Fanout { envelope, .. },
        ) => &envelope.channel == ch,
        (Preamble::Unordered, Frame::Message { .. } | Frame::Fanout { .. })
        | (Preamble::Requests, Frame::Request { .. } | Frame::Cancel { .. })
        | (Preamble::Answers, Frame::Response { .. } | Frame::NoAnswer { .. })
        | (
            Preamble::Large,
            Frame::Message { .. }
            | Frame::Fanout { .. }
            | Frame::Request { .. }
            | Frame::Response { .. },
        ) => true,
        _ => false,
    }
}

/// Reads a stream the peer opened: a lane's frames for the session, or an agent stream.
async fn read_stream(
    host: Host,
    session: SessionHandle,
    link: Arc<QuicLink>,
    mut reader: FrameReader,
    limits: Limits,
    [windowed, streams]: [Arc<Reassembly>; 2],
) {
    let outcome = async {
        let Some(preamble) = reader.next::<Preamble>().await? else {
            return Ok(());
        };
        if let Preamble::Stream { header, generation } = preamble {
            reader.account(streams)?;
            return agent_stream(&host, &session, reader, header, generation).await;
        }
        if preamble == Preamble::Large {
            // Only a message is within the session's windows. A request is not (its
            // responder refuses what would pass its room, with `Overflow`, once it has it)
            // nor is an answer: their partial frames count against the endpoint's budget
            // alone, as an agent stream's do, so that a burst of large requests is no
            // violation. The frame's kind is its first byte after the header; anything but
            // a request or an answer stays within the windows' cap.
            reader.account(streams)?;
            let kind = reader.peek(FRAME_HEADER_LEN).await?;
            if !kind.is_some_and(|k| REQUEST_VARIANTS.contains(&k)) {
                reader.account(windowed)?;
            }
        }
        let data = matches!(preamble, Preamble::Channel(_) | Preamble::Large);
        let mut limit = if data {
            Limits::data(&host)
        } else {
            limits.small
        };
        reader.set_limit(FrameCodec::new(limit));
        let mut frames: Vec<Frame> = Vec::new();
        loop {
            match reader.batch(&mut frames).await {
                // An agent with a larger channel may have come since the limit was read:
                // the frame's bytes are still unread, so it is read again under the new one.
                Err(Error::FrameTooLarge { size, .. }) if data && size > limit => {
                    let now = Limits::data(&host);
                    if size > now || now == limit {
                        return Err(Error::FrameTooLarge { size, max: now });
                    }
                    limit = now;
                    reader.set_limit(FrameCodec::new(limit));
                    continue;
                }
                r => r?,
            }
            if frames.is_empty() {
                return Ok(());
            }
            if !frames.iter().all(|f| fits(&preamble, f)) {
                return Err(Error::Protocol {
                    detail: "a frame on a stream that does not carry it",
                });
            }
            host.frames(&session, frames.drain(..))
                .map_err(|detail| Error::Protocol { detail })?;
        }
    }
    .await;
    if let Err(e) = outcome {
        tracing::debug!(peer = %link.listen, error = %e, "incoming stream failed");
        if matches!(e, Error::Busy { .. }) {
            tracing::warn!(peer = %link.listen, "the endpoint holds all the bytes it may; closing the connection whose frame did not fit");
            link.close_with(close::OVERLOADED);
        } else if matches!(
            e,
            Error::Malformed { .. }
                | Error::FrameTooLarge { .. }
                | Error::UnsupportedVersion { .. }
                | Error::Protocol { .. }
                | Error::Truncated { .. }
        ) {
            link.close_with(close::PROTOCOL_VIOLATION);
        }
    }
}

/// An agent stream the peer opened: refused (STOP_SENDING, REFUSED) unless its opener is an
/// agent the peer announced and its receiver is hosted here and listens on its channel.
async fn agent_stream(
    host: &Host,
    session: &SessionHandle,
    mut reader: FrameReader,
    header: StreamHeader,
    generation: u64,
) -> Result<()> {
    let local = host
        .local(&header.to)
        .filter(|l| l.reg.has_channel(&header.options.channel));
    let allowed = local.is_some()
        && host
            .sender_registered(session, &header.from, generation)
            .await;
    let Some(local) = local.filter(|_| allowed) else {
        reader.stop(reset::REFUSED);
        return Ok(());
    };
    reader.set_limit(FrameCodec::new(Limits::data(host)));
    local.stats.stream_delta(true);
    let source = QuicSource::new(header.id, reader, local.stats.clone());
    let item = Inbound::Stream(IncomingStream::new(header, source));
    if let Err((_, item)) = local.inbox.deliver_now(item, || {}) {
        item.abandon();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use aqe_core::{Envelope, MessageKind, Priority, Recipient};
    use aqe_session::{Frame, Lane, MessageHeader};

    use super::*;

    #[test]
    fn a_batch_is_framed_as_each_frame_alone_its_large_payloads_uncopied() {
        let message = |seq: u64, len: usize| {
            let e = Envelope::new(
                "a".into(),
                Recipient::Agent("b".into()),
                "c".into(),
                MessageKind::Direct,
                Bytes::from(vec![seq as u8; len]),
            );
            Transmit::Message {
                lane: Lane::Ordered("c".into()),
                header: MessageHeader {
                    seq,
                    after: seq - 1,
                    low: 1,
                    generation: 3,
                    confirm: seq.is_multiple_of(2),
                },
                priority: Priority::DEFAULT,
                body: aqe_core::encode_envelope(&e).expect("encode"),
            }
        };
        let mut batch = vec![
            message(1, 10),
            message(2, 5000),
            message(3, 20),
            Transmit::Frame(
                Lane::Control,
                Frame::Ping {
                    nonce: 7,
                    generation: 3,
                    low: 1,
                },
            ),
            message(4, 70_000),
            Transmit::Frame(
                Lane::Requests,
                Frame::Request {
                    generation: 3,
                    envelope: Envelope::new(
                        "a".into(),
                        Recipient::Agent("b".into()),
                        "c".into(),
                        MessageKind::Request,
                        Bytes::from(vec![9u8; 3000]),
                    ),
                },
            ),
            message(5, 30),
        ];
        let mut alone = BytesMut::new();
        for t in &batch {
            wire::frame_transmit(t, &mut alone).expect("frame");
        }
        let tails: Vec<*const u8> = batch
            .iter()
            .filter_map(|t| match t {
                Transmit::Message { body, .. } if !body.tail().is_empty() => {
                    Some(body.tail().as_ptr())
                }
                Transmit::Frame(_, Frame::Request { envelope, .. }) => {
                    Some(envelope.payload.as_ptr())
                }
                _ => None,
            })
            .collect();
        let (mut head, mut chunks, mut tally) = (BytesMut::new(), Vec::new(), Tally::default());
        frame_batch(&mut batch, &mut head, &mut chunks, &mut tally);
        assert!(batch.is_empty() && head.is_empty());
        assert_eq!(chunks.concat(), alone.as_ref());
        // Frames before each large payload, the payload; the small frames after the last.
        assert_eq!(chunks.len(), 7);
        for (i, tail) in tails.iter().enumerate() {
            assert_eq!(chunks[2 * i + 1].as_ptr(), *tail, "shared, not copied");
        }
        assert_eq!(tally.top(), Priority::MAX);
    }
}
