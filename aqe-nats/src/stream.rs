//! Streams over NATS: numbered data frames on the receiver's agent subject, credit from the
//! reader on the writer's endpoint subject.
//!
//! The writer may send chunk `n` once the reader has granted credit up to `n` (the stream
//! window at first, then what it consumed plus the window), so a reader holds at most a
//! window of chunks. A gap in the numbering (a lost frame) breaks the stream on both sides:
//! NATS does not resend, and a stream that silently skipped data would be worse than one
//! that fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use aqe_core::plumbing::{StatsRecorder, StreamSource};
use aqe_core::{
    Address, Error, Result, SendFailure, StreamChunk, StreamFailure, StreamHeader, StreamId,
    StreamSink,
};

use crate::endpoint::{Control, Shared};
use crate::wire::{Ep, Frame};

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
pub(crate) struct OutStream {
    window: u64,
    state: watch::Sender<OutState>,
}

impl OutStream {
    fn new(window: u64) -> Self {
        Self {
            window,
            state: watch::Sender::new(OutState {
                credit: window,
                failed: None,
            }),
        }
    }

    /// The reader consumed up to `up_to`.
    pub(crate) fn credit(&self, up_to: u64) {
        let credit = up_to.saturating_add(self.window);
        self.state.send_if_modified(|s| {
            let more = credit > s.credit;
            s.credit = s.credit.max(credit);
            more
        });
    }

    /// The stream broke.
    pub(crate) fn fail(&self, error: Error) {
        let failure = match error {
            Error::Stream { reason, .. } => Failure::Stream(reason),
            Error::ConnectionLost { addr, .. } => Failure::Lost(addr),
            _ => Failure::Stream(StreamFailure::Reset(0)),
        };
        self.state.send_modify(|s| {
            s.failed.get_or_insert(failure);
        });
    }
}

/// The writing side of a stream to an agent of another endpoint.
pub(crate) struct NatsSink {
    shared: Arc<Shared>,
    header: StreamHeader,
    to: Ep,
    subject: async_nats::Subject,
    seq: u64,
    finished: bool,
    state: watch::Receiver<OutState>,
    max_chunk: usize,
    stats: Arc<StatsRecorder>,
}

impl NatsSink {
    /// Opens a stream to `header.to` at endpoint `to`.
    pub(crate) async fn open(
        shared: Arc<Shared>,
        header: StreamHeader,
        to: Ep,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
    ) -> Result<Self> {
        let key = (to, header.id);
        let out = Arc::new(OutStream::new(u64::from(
            shared.config.limits.stream_window,
        )));
        let state = out.state.subscribe();
        match shared.out_streams.entry(key) {
            dashmap::Entry::Occupied(_) => {
                return Err(Error::Protocol {
                    detail: "a stream with this id is already open to that endpoint",
                });
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(out);
            }
        }
        let subject = shared.agent_subject(&header.to);
        let frame = Frame::StreamOpen {
            to,
            from: shared.me,
            header: header.clone(),
        };
        let bytes = match shared.encode_checked(&frame, 0) {
            Ok(b) => b,
            Err(e) => {
                shared.out_streams.remove(&key);
                return Err(e);
            }
        };
        shared.publish(subject.clone(), bytes).await;
        stats.stream_delta(true);
        Ok(Self {
            shared,
            header,
            to,
            subject,
            seq: 0,
            finished: false,
            state,
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
                source: "the receiver's endpoint fell silent or left".into(),
            },
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.shared.out_streams.remove(&(self.to, self.header.id));
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
        let wait = self.shared.config.send_timeout;
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
        let frame = Frame::StreamData {
            to: self.to,
            from: self.shared.me,
            stream: self.header.id,
            seq,
            data,
            fin,
        };
        let bytes = self.shared.encode_checked(&frame, len)?;
        self.seq = seq;
        self.shared.publish(self.subject.clone(), bytes).await;
        self.stats.sent(len);
        if fin {
            self.finish();
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
            let _ = self.shared.control.send(Control::To(
                self.to,
                Frame::StreamCancel {
                    to: self.to,
                    from: self.shared.me,
                    stream: self.header.id,
                },
            ));
            self.finish();
        }
    }
}

/// What the endpoint holds of a stream opened to one of its agents: where its chunks go
/// and which one comes next.
#[derive(Debug)]
pub(crate) struct InStream {
    tx: mpsc::Sender<Result<StreamChunk>>,
    next: AtomicU64,
}

/// Chunks out of order or beyond the credit granted.
#[derive(Debug)]
pub(crate) struct Broken;

impl InStream {
    /// Chunk `seq`; an error breaks the stream (a gap, or more than the credit allowed).
    pub(crate) fn push(&self, seq: u64, chunk: StreamChunk) -> std::result::Result<(), Broken> {
        let expected = self.next.load(Ordering::Acquire);
        if seq != expected {
            let _ = self.tx.try_send(Err(Error::Stream {
                stream: StreamId(0),
                reason: StreamFailure::Reset(1),
            }));
            return Err(Broken);
        }
        match self.tx.try_send(Ok(chunk)) {
            Ok(()) => {
                self.next.store(expected + 1, Ordering::Release);
                Ok(())
            }
            // Full: the writer ignored its credit; closed: the reader is gone.
            Err(_) => Err(Broken),
        }
    }

    /// The stream broke for `error`.
    pub(crate) fn fail(&self, error: Error) {
        let _ = self.tx.try_send(Err(error));
    }
}

/// The reading side of a stream, handed to the agent.
pub(crate) struct NatsSource {
    shared: Arc<Shared>,
    from: Ep,
    stream: StreamId,
    rx: mpsc::Receiver<Result<StreamChunk>>,
    consumed: u64,
    credited: u64,
    window: u64,
    finished: bool,
    stats: Arc<StatsRecorder>,
}

impl NatsSource {
    /// The two sides of the receiving end of stream `stream` from endpoint `from`.
    pub(crate) fn open(
        shared: Arc<Shared>,
        from: Ep,
        stream: StreamId,
        window: usize,
        stats: Arc<StatsRecorder>,
    ) -> (InStream, Self) {
        let window = window.max(1);
        // One more than the window, for a failure report behind a full window.
        let (tx, rx) = mpsc::channel(window + 1);
        (
            InStream {
                tx,
                next: AtomicU64::new(1),
            },
            Self {
                shared,
                from,
                stream,
                rx,
                consumed: 0,
                credited: 0,
                window: window as u64,
                finished: false,
                stats,
            },
        )
    }
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
                    let _ = self.shared.control.send(Control::To(
                        self.from,
                        Frame::StreamCredit {
                            from: self.shared.me,
                            stream: self.stream,
                            up_to: self.consumed,
                        },
                    ));
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
            if self
                .shared
                .in_streams
                .remove(&(self.from, self.stream))
                .is_some()
            {
                let _ = self.shared.control.send(Control::To(
                    self.from,
                    Frame::StreamReset {
                        from: self.shared.me,
                        stream: self.stream,
                    },
                ));
            }
        }
    }
}
