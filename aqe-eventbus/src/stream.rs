//! Streams on the bus: a bounded channel of chunks between two agents.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use aqe_core::{Error, Result, SendFailure, StreamChunk, StreamFailure, StreamHeader, StreamId};

use crate::bus::Member;

/// Makes the two ends of a stream and counts it as active on both agents.
pub(crate) fn pair(
    header: &StreamHeader,
    max_chunk: usize,
    capacity: usize,
    send_timeout: Duration,
    writer: Arc<Member>,
    reader: Arc<Member>,
) -> (BusSink, BusSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    writer.stats.stream_delta(true);
    reader.stats.stream_delta(true);
    (
        BusSink {
            id: header.id,
            tx: Some(tx),
            reliable: header.options.reliable,
            max_chunk,
            send_timeout,
            writer,
            reader_id: header.to.clone(),
        },
        BusSource {
            rx,
            reader,
            open: true,
        },
    )
}

pub(crate) struct BusSink {
    id: StreamId,
    /// `None` once finished.
    tx: Option<mpsc::Sender<StreamChunk>>,
    reliable: bool,
    max_chunk: usize,
    send_timeout: Duration,
    writer: Arc<Member>,
    reader_id: aqe_core::AgentId,
}

impl BusSink {
    fn finish(&mut self) {
        if self.tx.take().is_some() {
            self.writer.stats.stream_delta(false);
        }
    }
}

#[async_trait]
impl aqe_core::StreamSink for BusSink {
    async fn write(&mut self, data: Bytes, fin: bool) -> Result<()> {
        let id = self.id;
        let failed = move |reason| Error::Stream { stream: id, reason };
        let Some(tx) = &self.tx else {
            return Err(failed(StreamFailure::Finished));
        };
        if data.len() > self.max_chunk {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: self.max_chunk,
            });
        }
        let len = data.len();
        let chunk = StreamChunk { data, fin };
        // The final mark is always delivered reliably, or the reader could never tell the
        // end from a stall.
        if self.reliable || fin {
            match tx.send_timeout(chunk, self.send_timeout).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                    self.finish();
                    return Err(failed(StreamFailure::ClosedByPeer));
                }
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    return Err(Error::SendFailed {
                        to: self.reader_id.clone(),
                        reason: SendFailure::QueueFull(self.send_timeout),
                    });
                }
            }
        } else {
            match tx.try_send(chunk) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.writer.stats.dropped();
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.finish();
                    return Err(failed(StreamFailure::ClosedByPeer));
                }
            }
        }
        self.writer.stats.sent(len);
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

impl Drop for BusSink {
    fn drop(&mut self) {
        // Dropping the sender without a final chunk ends the reader with an error.
        self.finish();
    }
}

pub(crate) struct BusSource {
    rx: mpsc::Receiver<StreamChunk>,
    reader: Arc<Member>,
    open: bool,
}

impl BusSource {
    fn end(&mut self) {
        if std::mem::take(&mut self.open) {
            self.reader.stats.stream_delta(false);
        }
    }
}

#[async_trait]
impl aqe_core::StreamSource for BusSource {
    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        let chunk = self.rx.recv().await;
        match &chunk {
            Some(c) => {
                self.reader.stats.received(c.data.len());
                if c.fin {
                    self.end();
                }
            }
            None => self.end(),
        }
        chunk.map(Ok)
    }
}

impl Drop for BusSource {
    fn drop(&mut self) {
        self.end();
    }
}
