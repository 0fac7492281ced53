//! Agent streams over QUIC: each one QUIC stream of [`Chunk`] frames, with QUIC's flow
//! control.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use s2n_quic::stream::SendStream;
use tokio::sync::{Notify, oneshot};

use aqe_core::plumbing::{StatsRecorder, StreamSource};
use aqe_core::{
    AgentId, Error, Result, SendFailure, StreamChunk, StreamFailure, StreamId, StreamSink,
};

use crate::wire::{Chunk, FrameReader, MAX_FRAME_LEN, reset};

/// Bytes of chunks a stream queues for its writer, beyond what s2n-quic buffers (a larger
/// chunk waits for the queue to empty).
const QUEUED: usize = 256 * 1024;
/// Commands a stream queues for its writer, whatever their bytes.
const MAX_COMMANDS: usize = 256;

/// What a sink hands its writer: one lock per chunk, and a wake-up of the writer only when it
/// waits. (A tokio channel with a byte semaphore beside it cost a stream of small chunks
/// about a sixth of its time: two semaphores, a list push and a wake per chunk.)
struct Queue {
    state: Mutex<Pending>,
    /// Wakes the writer, when it waits for commands.
    work: Notify,
    /// Wakes a sink waiting for room.
    room: Notify,
}

#[derive(Default)]
struct Pending {
    commands: Vec<Command>,
    /// Bytes of the chunks queued or being written, given back once s2n-quic took them.
    bytes: usize,
    /// The writer waits for commands: the next one wakes it.
    idle: bool,
    /// The writer ended: nothing is taken any more.
    closed: bool,
}

impl Queue {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes an agent stream: one QUIC stream, [`Chunk`] frames, QUIC flow control.
///
/// A writer task of its own hands the chunks to s2n-quic: all that was written while it
/// was busy goes in one call, one lock of the connection and one wake-up of its endpoint,
/// instead of one per chunk. A lone chunk goes at once: nothing waits for a batch to fill.
pub(crate) struct QuicSink {
    id: StreamId,
    queue: Arc<Queue>,
    /// Why the writer stopped, when it failed.
    failed: Arc<Mutex<Option<Error>>>,
    /// Dropped with the sink: the writer resets an unfinished stream and ends.
    _stop: oneshot::Sender<()>,
    max_chunk: usize,
    finished: bool,
    stats: Arc<StatsRecorder>,
    to: AgentId,
    send_timeout: Duration,
}

/// Whether [`QuicSink::queue_now`] queued a command.
enum Queued {
    Yes,
    /// The writer stopped (it failed).
    Closed,
    /// No room now: the command back.
    NoRoom(Command),
}

/// What the sink asks of its writer.
enum Command {
    /// A chunk; after a final one, the writer reports (to `done`) that everything went to
    /// s2n-quic.
    Chunk {
        data: Bytes,
        fin: bool,
        done: Option<oneshot::Sender<Result<()>>>,
    },
    /// End the stream and wait until the receiver's endpoint acknowledged all of it.
    Close(oneshot::Sender<Result<()>>),
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
        let queue = Arc::new(Queue {
            state: Mutex::new(Pending::default()),
            work: Notify::new(),
            room: Notify::new(),
        });
        let failed = Arc::new(Mutex::new(None));
        let (stop, stopped) = oneshot::channel();
        let writer = Writer {
            id: header.id,
            peer: send
                .connection()
                .remote_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            send,
            queue: queue.clone(),
            failed: failed.clone(),
            stats: stats.clone(),
        };
        // Owned by the sink: it ends when the stream ends, fails, or the sink is dropped.
        tokio::spawn(writer.run(stopped));
        Self {
            id: header.id,
            queue,
            failed,
            _stop: stop,
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

    /// The writer's failure (the stream is over).
    fn failure(&mut self) -> Error {
        self.finish();
        self.failed
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or(Error::Stream {
                stream: self.id,
                reason: StreamFailure::Finished,
            })
    }

    /// Queues `command` (of `bytes` bytes) if there is room now, without waiting and without
    /// spending the task's scheduling budget: a writer that does not yield lets the chunks
    /// pile up for one hand-over.
    fn queue_now(&self, bytes: usize, command: Command) -> Queued {
        let mut q = self.queue.pending();
        if q.closed {
            return Queued::Closed;
        }
        if q.commands.len() >= MAX_COMMANDS || q.bytes + bytes > QUEUED {
            return Queued::NoRoom(command);
        }
        q.bytes += bytes;
        q.commands.push(command);
        let wake = std::mem::take(&mut q.idle);
        drop(q);
        if wake {
            self.queue.work.notify_one();
        }
        Queued::Yes
    }

    /// Queues `command` once there is room; `false` when the writer ended.
    async fn queue(&self, bytes: usize, mut command: Command) -> bool {
        loop {
            let room = self.queue.room.notified();
            tokio::pin!(room);
            // Registered before looking, so that room made in between is not missed.
            room.as_mut().enable();
            match self.queue_now(bytes, command) {
                Queued::Yes => return true,
                Queued::Closed => return false,
                Queued::NoRoom(c) => command = c,
            }
            room.await;
        }
    }

    fn queue_full(&self) -> Error {
        Error::SendFailed {
            to: self.to.clone(),
            reason: SendFailure::QueueFull(self.send_timeout),
        }
    }

    /// Waits for the writer's answer, up to the send timeout; past it the stream is given up
    /// (reset when the sink goes), so nothing reported failed arrives after all.
    async fn answer(&mut self, done: oneshot::Receiver<Result<()>>) -> Result<()> {
        match tokio::time::timeout(self.send_timeout, done).await {
            Ok(Ok(r)) => {
                self.finish();
                r
            }
            Ok(Err(_)) => Err(self.failure()),
            Err(_) => {
                self.finish();
                Err(self.queue_full())
            }
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
        if data.len() > self.max_chunk || Chunk::frame_len(data.len()) > MAX_FRAME_LEN {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: self.max_chunk.min(MAX_FRAME_LEN - Chunk::frame_len(0)),
            });
        }
        let bytes = Chunk::frame_len(data.len()).min(QUEUED);
        let (done, answer) = if fin {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let command = Command::Chunk { data, fin, done };
        let fast = match self.queue_now(bytes, command) {
            Queued::Yes => None,
            Queued::Closed => return Err(self.failure()),
            Queued::NoRoom(command) => Some(command),
        };
        if let Some(command) = fast {
            let queued = tokio::time::timeout(self.send_timeout, self.queue(bytes, command)).await;
            match queued {
                Ok(true) => {}
                Ok(false) => return Err(self.failure()),
                // The reader is not reading: nothing of this chunk was queued and the stream
                // stays usable: the caller may write again.
                Err(_) => return Err(self.queue_full()),
            }
        }
        match answer {
            Some(answer) => self.answer(answer).await,
            None => Ok(()),
        }
    }

    fn try_write(&mut self, data: Bytes) -> std::result::Result<Result<()>, Bytes> {
        if self.finished
            || data.len() > self.max_chunk
            || Chunk::frame_len(data.len()) > MAX_FRAME_LEN
        {
            // `write` reports it.
            return Err(data);
        }
        let bytes = Chunk::frame_len(data.len()).min(QUEUED);
        let command = Command::Chunk {
            data,
            fin: false,
            done: None,
        };
        match self.queue_now(bytes, command) {
            Queued::Yes => Ok(Ok(())),
            Queued::Closed => Ok(Err(self.failure())),
            Queued::NoRoom(Command::Chunk { data, .. }) => Err(data),
            // Not this command: it is the chunk given.
            Queued::NoRoom(Command::Close(_)) => Err(Bytes::new()),
        }
    }

    /// Ends the stream and waits (up to the send timeout) until the receiver's endpoint has
    /// acknowledged everything written: a caller that closes and then exits loses nothing.
    /// (A final `write` with `fin` does not wait.)
    async fn close(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        let queued =
            tokio::time::timeout(self.send_timeout, self.queue(0, Command::Close(done))).await;
        match queued {
            Ok(true) => self.answer(answer).await,
            Ok(false) => Err(self.failure()),
            Err(_) => {
                self.finish();
                Err(self.queue_full())
            }
        }
    }
}

impl Drop for QuicSink {
    fn drop(&mut self) {
        // Dropping `_stop` tells the writer: an unfinished stream is reset, so the reader
        // sees an error rather than an end.
        self.finish();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// The task that hands a sink's chunks to s2n-quic.
struct Writer {
    id: StreamId,
    peer: std::net::SocketAddr,
    send: SendStream,
    queue: Arc<Queue>,
    failed: Arc<Mutex<Option<Error>>>,
    /// Counts what went to s2n-quic, a batch at a time.
    stats: Arc<StatsRecorder>,
}

impl Writer {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let (mut commands, mut head, mut parts) = (Vec::new(), BytesMut::new(), Vec::new());
        loop {
            let waiting = {
                let mut q = self.queue.pending();
                q.idle = q.commands.is_empty();
                std::mem::swap(&mut q.commands, &mut commands);
                q.idle
            };
            if waiting {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return self.abandon(),
                    () = self.queue.work.notified() => continue,
                }
            }
            let (mut bytes, mut ended, mut closing) = (0usize, None, None);
            let (mut chunks, mut data_bytes) = (0u64, 0u64);
            for command in commands.drain(..) {
                let (data, fin) = match command {
                    Command::Chunk { data, fin, done } => {
                        if fin {
                            ended = done;
                        }
                        (data, fin)
                    }
                    Command::Close(done) => {
                        closing = Some(done);
                        (Bytes::new(), true)
                    }
                };
                if closing.is_none() {
                    // What its sink counted in (a close counts nothing).
                    bytes += Chunk::frame_len(data.len()).min(QUEUED);
                    chunks += 1;
                    data_bytes += data.len() as u64;
                }
                Chunk::encode_into(data, fin, &mut head, &mut parts);
                if fin {
                    break;
                }
            }
            if !head.is_empty() {
                parts.push(head.split().freeze());
            }
            let sent = tokio::select! {
                biased;
                _ = &mut stopped => return self.abandon(),
                r = self.send.send_vectored(&mut parts) => r,
            };
            parts.clear();
            {
                let mut q = self.queue.pending();
                q.bytes = q.bytes.saturating_sub(bytes);
            }
            self.queue.room.notify_waiters();
            if sent.is_ok() {
                self.stats.sent_many(chunks, data_bytes);
            }
            if let Err(e) = sent {
                // A final write or a close waiting on this batch hears why (its sink is over
                // after it); otherwise the next write does. A close reads the failure as a
                // close does (a receiver that left normally after the end is no failure).
                if let Some(done) = closing {
                    let _ = done.send(self.closed(Err(e)));
                } else if let Some(done) = ended {
                    let _ = done.send(Err(self.error(e)));
                } else if let Ok(mut f) = self.failed.lock() {
                    *f = Some(self.error(e));
                }
                // After the failure is kept: a write that finds the queue shut reads it.
                self.shut();
                return;
            }
            if let Some(done) = ended {
                let _ = self.send.finish();
                let _ = done.send(Ok(()));
                return;
            }
            if let Some(done) = closing {
                let closed = tokio::select! {
                    biased;
                    _ = &mut stopped => return,
                    r = self.send.close() => r,
                };
                let _ = done.send(self.closed(closed));
                return;
            }
        }
    }

    /// Takes nothing more: a sink's next write fails, and what waits in the queue goes (a
    /// final chunk's or a close's sink then hears the failure rather than waiting out its
    /// timeout).
    fn shut(&self) {
        let dropped = {
            let mut q = self.queue.pending();
            q.closed = true;
            std::mem::take(&mut q.commands)
        };
        drop(dropped);
        self.queue.room.notify_waiters();
    }

    /// The sink went without ending the stream: reset it, so the reader sees an error
    /// rather than an end.
    fn abandon(&mut self) {
        let _ = self.send.reset(reset::CANCELLED.into());
    }

    fn error(&self, e: s2n_quic::stream::Error) -> Error {
        match crate::wire::stream_error(self.peer, self.send.id(), e) {
            Error::Stream { reason, .. } => Error::Stream {
                stream: self.id,
                reason,
            },
            other => other,
        }
    }

    /// What the end of a close means for the writer.
    fn closed(&self, r: std::result::Result<(), s2n_quic::stream::Error>) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            // The receiver's endpoint said goodbye after the end was sent: it left normally,
            // having had the chance to read it all; not a failure of this stream.
            Err(s2n_quic::stream::Error::ConnectionError {
                error: s2n_quic::connection::Error::Application { error, .. },
                ..
            }) if u64::from(error) == u64::from(crate::wire::close::NORMAL) => Ok(()),
            Err(e) => match self.error(e) {
                // Stopped with code 0: the reader dropped the stream after reading its end
                // (an aqe reader that stops early says REFUSED).
                Error::Stream {
                    reason: StreamFailure::Reset(0),
                    ..
                } => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// Chunks a stream's reader decodes at a time (and counts in its statistics at once), at
/// most, and their bytes (held outside the connection's reassembly budget until taken).
const READ_BATCH: usize = 64;
const READ_BATCH_BYTES: usize = 64 * 1024;

/// Reads an agent stream.
pub(crate) struct QuicSource {
    id: StreamId,
    reader: FrameReader,
    stats: Arc<StatsRecorder>,
    open: bool,
    /// Chunks decoded and not yet handed out, in order (reversed: the next is last).
    decoded: Vec<Chunk>,
}

impl QuicSource {
    pub(crate) fn new(id: StreamId, reader: FrameReader, stats: Arc<StatsRecorder>) -> Self {
        Self {
            id,
            reader,
            stats,
            open: true,
            decoded: Vec::new(),
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
    fn try_next(&mut self) -> Option<Result<StreamChunk>> {
        let c = self.decoded.pop()?;
        if c.fin {
            self.end();
        }
        Some(Ok(StreamChunk {
            data: c.data,
            fin: c.fin,
        }))
    }

    async fn next(&mut self) -> Option<Result<StreamChunk>> {
        if self.decoded.is_empty() {
            match self
                .reader
                .batch_of(&mut self.decoded, READ_BATCH, READ_BATCH_BYTES)
                .await
            {
                Ok(()) if self.decoded.is_empty() => {
                    self.end();
                    return None;
                }
                Ok(()) => {
                    let bytes = self.decoded.iter().map(|c| c.data.len() as u64).sum();
                    self.stats.received_many(self.decoded.len() as u64, bytes);
                    self.decoded.reverse();
                }
                Err(e) => {
                    // Chunks decoded before the failure are not handed out after it.
                    self.decoded.clear();
                    self.end();
                    return Some(Err(match e {
                        Error::Stream { reason, .. } => Error::Stream {
                            stream: self.id,
                            reason,
                        },
                        other => other,
                    }));
                }
            }
        }
        self.try_next()
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
