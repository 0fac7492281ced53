//! Agent streams over NATS: numbered data on the reader's endpoint subject, credit from the
//! reader on the writer's.
//!
//! The writer may send chunk `n` once the reader has granted credit up to `n` (the stream
//! window at first, then what it consumed plus the window), so a reader holds at most a
//! window of chunks. A gap in the numbering (a lost packet) breaks the stream on both sides:
//! NATS does not resend, and a stream that silently skipped data would be worse than one
//! that fails. A stream lives within its session: when the session ends, so does it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use aqe_core::plumbing::{FastMap, StatsRecorder, StreamSource};
use aqe_core::{
    Address, Error, Inbound, IncomingStream, Result, SendFailure, StreamChunk, StreamFailure,
    StreamHeader, StreamId, StreamSink,
};
use aqe_link::{Host, SessionHandle};
use aqe_session::EndpointId;

use crate::endpoint::{NatsWire, lock};
use crate::wire::Packet;

/// Why a stream opened from here broke.
#[derive(Debug, Clone)]
enum Failure {
    Stream(StreamFailure),
    Lost(Address),
}

#[derive(Debug, Clone)]
struct OutState {
    /// Chunks up to this number may be sent.
    credit: u64,
    failed: Option<Failure>,
}

/// What the endpoint knows of a stream opened from here: the credit granted and whether it
/// broke.
#[derive(Debug)]
struct OutStream {
    session: u64,
    window: u64,
    state: watch::Sender<OutState>,
}

impl OutStream {
    fn credit(&self, up_to: u64) {
        let credit = up_to.saturating_add(self.window);
        self.state.send_if_modified(|s| {
            let more = credit > s.credit;
            s.credit = s.credit.max(credit);
            more
        });
    }

    fn fail(&self, failure: Failure) {
        self.state.send_modify(|s| {
            s.failed.get_or_insert(failure);
        });
    }
}

/// What the endpoint holds of a stream opened to one of its agents: where its chunks go
/// and which one comes next.
#[derive(Debug)]
struct InStream {
    session: u64,
    tx: mpsc::Sender<Result<StreamChunk>>,
    next: AtomicU64,
}

impl InStream {
    /// Chunk `seq`; `false` breaks the stream (a gap, more than the credit allowed, or a
    /// reader gone).
    fn push(&self, seq: u64, chunk: StreamChunk) -> bool {
        let expected = self.next.load(Ordering::Acquire);
        if seq != expected {
            let _ = self.tx.try_send(Err(Error::Stream {
                stream: StreamId(0),
                reason: StreamFailure::Reset(1),
            }));
            return false;
        }
        match self.tx.try_send(Ok(chunk)) {
            Ok(()) => {
                self.next.store(expected + 1, Ordering::Release);
                true
            }
            Err(_) => false,
        }
    }

    fn fail(&self, error: Error) {
        let _ = self.tx.try_send(Err(error));
    }
}

type Key = (EndpointId, StreamId);

/// The streams of one endpoint, both ways.
#[derive(Default)]
pub(crate) struct Streams {
    out: Mutex<FastMap<Key, Arc<OutStream>>>,
    incoming: Mutex<FastMap<Key, InStream>>,
}

impl Streams {
    /// A stream packet from `from`.
    pub(crate) fn on_packet(wire: &Arc<NatsWire>, host: &Host, from: EndpointId, packet: Packet) {
        let streams = &wire.streams;
        match packet {
            Packet::StreamOpen {
                session,
                header,
                generation,
                ..
            } => match wire.session(host, &from, session) {
                Some(s) => open_incoming(wire, host, s, header, generation),
                None => wire.post(Some(from), reset(wire, from, header.id)),
            },
            Packet::StreamData {
                stream,
                seq,
                data,
                fin,
                ..
            } => {
                let key = (from, stream);
                let mut incoming = lock(&streams.incoming);
                let Some(s) = incoming.get(&key) else {
                    return;
                };
                let ok = s.push(seq, StreamChunk { data, fin });
                if fin || !ok {
                    incoming.remove(&key);
                }
                drop(incoming);
                if !ok {
                    wire.post(Some(from), reset(wire, from, stream));
                } else if fin {
                    // The whole stream is here, queued for its reader: credit through the
                    // last chunk tells the writer, whose close waits for it.
                    wire.post(
                        Some(from),
                        Packet::StreamCredit {
                            from: wire.me,
                            to: from,
                            stream,
                            up_to: seq,
                        },
                    );
                }
            }
            Packet::StreamCredit { stream, up_to, .. } => {
                if let Some(s) = lock(&streams.out).get(&(from, stream)) {
                    s.credit(up_to);
                }
            }
            Packet::StreamCancel { stream, .. } => {
                if let Some(s) = lock(&streams.incoming).remove(&(from, stream)) {
                    s.fail(Error::Stream {
                        stream,
                        reason: StreamFailure::Cancelled,
                    });
                }
            }
            Packet::StreamReset { stream, .. } => {
                if let Some(s) = lock(&streams.out).remove(&(from, stream)) {
                    s.fail(Failure::Stream(StreamFailure::ClosedByPeer));
                }
            }
            _ => {}
        }
    }

    /// The session of nonce `session` with `peer` ended: so do its streams.
    pub(crate) fn session_ended(&self, peer: EndpointId, session: u64, address: &Address) {
        let out: Vec<Arc<OutStream>> = {
            let mut m = lock(&self.out);
            let keys: Vec<Key> = m
                .iter()
                .filter(|(k, s)| k.0 == peer && s.session == session)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for s in out {
            s.fail(Failure::Lost(address.clone()));
        }
        let incoming: Vec<InStream> = {
            let mut m = lock(&self.incoming);
            let keys: Vec<Key> = m
                .iter()
                .filter(|(k, s)| k.0 == peer && s.session == session)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for s in incoming {
            s.fail(Error::ConnectionLost {
                addr: address.clone(),
                source: "the writer's session ended".into(),
            });
        }
    }
}

fn reset(wire: &NatsWire, to: EndpointId, stream: StreamId) -> Packet {
    Packet::StreamReset {
        from: wire.me,
        to,
        stream,
    }
}

/// A stream opened to one of this endpoint's agents over `session`: refused unless its
/// receiver is hosted here and listens on its channel, its opener is an agent the peer
/// announced (by `generation`), and the peer has fewer streams open here than allowed.
fn open_incoming(
    wire: &Arc<NatsWire>,
    host: &Host,
    session: SessionHandle,
    header: StreamHeader,
    generation: u64,
) {
    let from = session.peer();
    let stream = header.id;
    let key = (from, stream);
    let local = host
        .local(&header.to)
        .filter(|l| l.listens(&header.options.channel).is_ok());
    let window = wire.config.limits.stream_window.max(1) as usize;
    let admitted = local.and_then(|local| {
        let mut incoming = lock(&wire.streams.incoming);
        let here = incoming.keys().filter(|k| k.0 == from).count();
        if here >= wire.config.limits.streams_per_endpoint as usize || incoming.contains_key(&key) {
            return None;
        }
        // One more than the window, for a failure report behind a full window.
        let (tx, rx) = mpsc::channel(window + 1);
        incoming.insert(
            key,
            InStream {
                session: session.rank().nonce,
                tx,
                next: AtomicU64::new(1),
            },
        );
        Some((local, rx))
    });
    let Some((local, rx)) = admitted else {
        wire.post(Some(from), reset(wire, from, stream));
        return;
    };
    // Chunks may arrive while the opener's announcement is on its way: they wait in the
    // stream's channel (bounded by the credit granted).
    let (wire, host) = (wire.clone(), host.clone());
    let tasks = wire.tasks.clone();
    tasks.spawn(async move {
        let admitted = tokio::select! {
            () = wire.stop.cancelled() => false,
            ok = host.sender_registered(&session, &header.from, generation) => ok,
        };
        if !admitted {
            lock(&wire.streams.incoming).remove(&key);
            wire.post(Some(from), reset(&wire, from, stream));
            return;
        }
        local.stats.stream_delta(true);
        let source = NatsSource {
            wire: wire.clone(),
            from,
            stream,
            rx,
            consumed: 0,
            credited: 0,
            window: window as u64,
            finished: false,
            stats: local.stats.clone(),
        };
        let item = Inbound::Stream(IncomingStream::new(header, source));
        if let Err((_, item)) = local.inbox.deliver_now(item, || {}) {
            drop(item);
        }
    });
}

/// The writing side of a stream to an agent of another endpoint.
pub(crate) struct NatsSink {
    wire: Arc<NatsWire>,
    header: StreamHeader,
    to: EndpointId,
    seq: u64,
    finished: bool,
    state: watch::Receiver<OutState>,
    /// The reader's window: its credit is what it took plus this.
    window: u64,
    max_chunk: usize,
    stats: Arc<StatsRecorder>,
}

impl NatsSink {
    /// Opens a stream to `header.to` at endpoint `to`, over the session of nonce `session`.
    pub(crate) async fn open(
        wire: Arc<NatsWire>,
        to: EndpointId,
        session: u64,
        header: StreamHeader,
        generation: u64,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
    ) -> Result<Self> {
        let key = (to, header.id);
        let window = u64::from(wire.config.limits.stream_window.max(1));
        let (state, rx) = watch::channel(OutState {
            credit: window,
            failed: None,
        });
        {
            let mut out = lock(&wire.streams.out);
            if out.contains_key(&key) {
                return Err(Error::Protocol {
                    detail: "a stream with this id is already open to that endpoint",
                });
            }
            out.insert(
                key,
                Arc::new(OutStream {
                    session,
                    window,
                    state,
                }),
            );
        }
        let packet = Packet::StreamOpen {
            from: wire.me,
            to,
            session,
            header: header.clone(),
            generation,
        };
        if let Err(e) = wire.publish_to(to, &packet, 0).await {
            lock(&wire.streams.out).remove(&key);
            return Err(e);
        }
        stats.stream_delta(true);
        Ok(Self {
            wire,
            header,
            to,
            seq: 0,
            finished: false,
            state: rx,
            window,
            max_chunk,
            stats,
        })
    }

    fn failure(&self, failure: &Failure) -> Error {
        match failure {
            Failure::Stream(reason) => Error::Stream {
                stream: self.header.id,
                reason: *reason,
            },
            Failure::Lost(addr) => Error::ConnectionLost {
                addr: addr.clone(),
                source: "the session with the receiver's endpoint ended".into(),
            },
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            lock(&self.wire.streams.out).remove(&(self.to, self.header.id));
            self.stats.stream_delta(false);
        }
    }
}

#[async_trait]
impl StreamSink for NatsSink {
    async fn write(&mut self, data: Bytes, fin: bool) -> Result<()> {
        if self.finished {
            return Err(Error::Stream {
                stream: self.header.id,
                reason: StreamFailure::Finished,
            });
        }
        if data.len() > self.max_chunk {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: self.max_chunk,
            });
        }
        let seq = self.seq + 1;
        let wait = self.wire.config.send_timeout;
        let failed = match tokio::time::timeout(
            wait,
            self.state
                .wait_for(|s| s.failed.is_some() || s.credit >= seq),
        )
        .await
        {
            Ok(Ok(s)) => s.failed.clone(),
            Ok(Err(_)) => Some(Failure::Stream(StreamFailure::Unknown)),
            Err(_) => {
                return Err(Error::SendFailed {
                    to: self.header.to.clone(),
                    reason: SendFailure::QueueFull(wait),
                });
            }
        };
        if let Some(f) = failed {
            let e = self.failure(&f);
            self.finish();
            return Err(e);
        }
        let len = data.len();
        let packet = Packet::StreamData {
            from: self.wire.me,
            to: self.to,
            stream: self.header.id,
            seq,
            data,
            fin,
        };
        self.wire.publish_to(self.to, &packet, len).await?;
        self.seq = seq;
        self.stats.sent(len);
        if fin {
            // Finished when the reader's endpoint has the last chunk (it grants credit through
            // it): a writer that exits at once loses nothing still on its way.
            let window = self.window;
            let failed = match tokio::time::timeout(
                wait,
                self.state
                    .wait_for(|s| s.failed.is_some() || s.credit >= seq.saturating_add(window)),
            )
            .await
            {
                Ok(Ok(s)) => s.failed.clone().map(Ok),
                Ok(Err(_)) => Some(Ok(Failure::Stream(StreamFailure::Unknown))),
                Err(_) => Some(Err(Error::Timeout {
                    after: wait,
                    attempts: 1,
                })),
            };
            let outcome = match failed {
                None => Ok(()),
                Some(Ok(f)) => Err(self.failure(&f)),
                Some(Err(e)) => Err(e),
            };
            self.finish();
            return outcome;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.write(Bytes::new(), true).await
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        if !self.finished {
            self.wire.post(
                Some(self.to),
                Packet::StreamCancel {
                    from: self.wire.me,
                    to: self.to,
                    stream: self.header.id,
                },
            );
            self.finish();
        }
    }
}

/// The reading side of a stream, handed to the agent.
struct NatsSource {
    wire: Arc<NatsWire>,
    from: EndpointId,
    stream: StreamId,
    rx: mpsc::Receiver<Result<StreamChunk>>,
    consumed: u64,
    credited: u64,
    window: u64,
    finished: bool,
    stats: Arc<StatsRecorder>,
}

#[async_trait]
impl StreamSource for NatsSource {
    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        if self.finished {
            return None;
        }
        let item = self.rx.recv().await;
        match &item {
            Some(Ok(chunk)) => {
                self.consumed += 1;
                self.stats.received(chunk.data.len());
                if chunk.fin {
                    self.finished = true;
                    self.stats.stream_delta(false);
                } else if self.consumed - self.credited >= (self.window / 2).max(1) {
                    self.credited = self.consumed;
                    let credit = Packet::StreamCredit {
                        from: self.wire.me,
                        to: self.from,
                        stream: self.stream,
                        up_to: self.consumed,
                    };
                    // Lost, the writer waits out its send timeout: as a lost chunk, a
                    // failure NATS may cause and the writer reports.
                    let _ = self.wire.publish_to(self.from, &credit, 0).await;
                }
            }
            Some(Err(_)) | None => {
                self.finished = true;
                self.stats.stream_delta(false);
            }
        }
        match item {
            Some(Err(Error::Stream { reason, .. })) => Some(Err(Error::Stream {
                stream: self.stream,
                reason,
            })),
            other => other,
        }
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.stream_delta(false);
            let key = (self.from, self.stream);
            if lock(&self.wire.streams.incoming).remove(&key).is_some() {
                self.wire
                    .post(Some(self.from), reset(&self.wire, self.from, self.stream));
            }
        }
    }
}
