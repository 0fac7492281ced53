//! In-process building blocks for transports: a request's answer over a one-shot channel,
//! and a stream as a bounded channel of chunks. The event bus is made of them, and a network
//! transport uses them between agents it hosts side by side.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::{
    AgentId, Envelope, Error, IncomingStream, Respond, Responder, Result, SendFailure,
    StatsRecorder, StreamChunk, StreamFailure, StreamHeader, StreamId, StreamSink, StreamSource,
};

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
    async fn write(&mut self, data: Bytes, fin: bool) -> Result<()> {
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
}

#[async_trait]
impl StreamSource for LocalSource {
    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        let chunk = self.rx.recv().await;
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

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.end();
    }
}
