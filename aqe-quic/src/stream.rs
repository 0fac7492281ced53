//! Agent streams over QUIC: each one QUIC stream of [`Chunk`] frames, with QUIC's flow
//! control.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use s2n_quic::stream::SendStream;

use aqe_core::plumbing::{StatsRecorder, StreamSource};
use aqe_core::{
    AgentId, Error, Result, SendFailure, StreamChunk, StreamFailure, StreamId, StreamSink,
};

use crate::wire::{Chunk, FrameCodec, FrameReader, reset};

/// Writes an agent stream: one QUIC stream, [`Chunk`] frames, QUIC flow control.
pub(crate) struct QuicSink {
    id: StreamId,
    send: SendStream,
    codec: FrameCodec,
    max_chunk: usize,
    finished: bool,
    stats: Arc<StatsRecorder>,
    to: AgentId,
    send_timeout: Duration,
    peer: std::net::SocketAddr,
}

impl QuicSink {
    pub(crate) fn new(
        header: &aqe_core::StreamHeader,
        send: SendStream,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
        send_timeout: Duration,
    ) -> Self {
        stats.stream_delta(true);
        let peer = send
            .connection()
            .remote_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        Self {
            peer,
            id: header.id,
            send,
            codec: FrameCodec::default(),
            max_chunk,
            finished: false,
            stats,
            to: header.to.clone(),
            send_timeout,
        }
    }

    fn finish(&mut self) {
        if !std::mem::replace(&mut self.finished, true) {
            self.stats.stream_delta(false);
        }
    }
}

#[async_trait]
impl StreamSink for QuicSink {
    async fn write(&mut self, data: Bytes, fin: bool) -> Result<()> {
        if self.finished {
            return Err(Error::Stream {
                stream: self.id,
                reason: StreamFailure::Finished,
            });
        }
        if data.len() > self.max_chunk {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: self.max_chunk,
            });
        }
        let len = data.len();
        let frame = self.codec.encode_to_bytes(&Chunk { data, fin })?;
        let sent = match tokio::time::timeout(self.send_timeout, self.send.send(frame)).await {
            Ok(r) => r,
            // The reader is not reading. s2n-quic queues a chunk whole or not at all, so
            // nothing of this frame was sent and the stream stays usable: the caller may
            // write again.
            Err(_) => {
                return Err(Error::SendFailed {
                    to: self.to.clone(),
                    reason: SendFailure::QueueFull(self.send_timeout),
                });
            }
        };
        if let Err(e) = sent {
            self.finish();
            return Err(
                match crate::wire::stream_error(self.peer, self.send.id(), e) {
                    Error::Stream { reason, .. } => Error::Stream {
                        stream: self.id,
                        reason,
                    },
                    other => other,
                },
            );
        }
        self.stats.sent(len);
        if fin {
            let _ = self.send.finish();
            self.finish();
        }
        Ok(())
    }

    /// Ends the stream and waits (up to the send timeout) until the receiver's endpoint has
    /// acknowledged everything written: a caller that closes and then exits loses nothing.
    /// (A final `write` with `fin` does not wait.)
    async fn close(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        let frame = self.codec.encode_to_bytes(&Chunk {
            data: Bytes::new(),
            fin: true,
        })?;
        let sent = tokio::time::timeout(self.send_timeout, async {
            self.send.send(frame).await?;
            self.send.close().await
        })
        .await;
        self.finish();
        match sent {
            Ok(Ok(())) => Ok(()),
            // The receiver's endpoint said goodbye after the end was sent: it left normally,
            // having had the chance to read it all; not a failure of this stream.
            Ok(Err(s2n_quic::stream::Error::ConnectionError {
                error: s2n_quic::connection::Error::Application { error, .. },
                ..
            })) if u64::from(error) == u64::from(crate::wire::close::NORMAL) => Ok(()),
            Ok(Err(e)) => match crate::wire::stream_error(self.peer, self.send.id(), e) {
                // Stopped with code 0: the reader dropped the stream after reading its end
                // (an aqe reader that stops early says REFUSED).
                Error::Stream {
                    reason: StreamFailure::Reset(0),
                    ..
                } => Ok(()),
                Error::Stream { reason, .. } => Err(Error::Stream {
                    stream: self.id,
                    reason,
                }),
                other => Err(other),
            },
            Err(_) => Err(Error::SendFailed {
                to: self.to.clone(),
                reason: SendFailure::QueueFull(self.send_timeout),
            }),
        }
    }
}

impl Drop for QuicSink {
    fn drop(&mut self) {
        if !self.finished {
            // An abandoned stream is reset, so the reader sees an error rather than an end.
            let _ = self.send.reset(reset::CANCELLED.into());
            self.finish();
        }
    }
}

/// Reads an agent stream.
pub(crate) struct QuicSource {
    id: StreamId,
    reader: FrameReader,
    stats: Arc<StatsRecorder>,
    open: bool,
}

impl QuicSource {
    pub(crate) fn new(id: StreamId, reader: FrameReader, stats: Arc<StatsRecorder>) -> Self {
        Self {
            id,
            reader,
            stats,
            open: true,
        }
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.open) {
            self.stats.stream_delta(false);
        }
    }
}

#[async_trait]
impl StreamSource for QuicSource {
    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        match self.reader.next::<Chunk>().await {
            Ok(Some(c)) => {
                self.stats.received(c.data.len());
                if c.fin {
                    self.end();
                }
                Some(Ok(StreamChunk {
                    data: c.data,
                    fin: c.fin,
                }))
            }
            Ok(None) => {
                self.end();
                None
            }
            Err(e) => {
                self.end();
                Some(Err(match e {
                    Error::Stream { reason, .. } => Error::Stream {
                        stream: self.id,
                        reason,
                    },
                    other => other,
                }))
            }
        }
    }
}

impl Drop for QuicSource {
    fn drop(&mut self) {
        // Dropping the reader before the end tells the writer (STOP_SENDING) so its next
        // write fails; after the end there is nothing to refuse (the writer may be waiting
        // for its close to be acknowledged).
        if self.open {
            self.reader.stop(reset::REFUSED);
        }
        self.end();
    }
}
