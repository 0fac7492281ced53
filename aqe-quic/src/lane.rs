//! The request lane: requests and their answers on one long-lived bidirectional stream per
//! connection and direction, correlated by message id.
//!
//! Opening a QUIC stream per request costs s2n-quic about as much again as the round trip
//! itself; the lane avoids it. Cancellation, which a per-request stream gets from its own end,
//! is explicit here: a requester that gives up sends [`Up::Cancel`], a responder that goes
//! away answers [`Down::Dropped`]. Requests larger than [`LANE_MAX_PAYLOAD`] still take a
//! stream of their own, so that a large request never holds back the small ones behind it.
//!
//! Each direction of a lane has one writer task that owns its half of the stream and writes
//! what accumulated in one write per wake-up; requesters and responders only enqueue. A
//! responder holds at most `limits.requestsInHand` requests of a lane in hand at once and
//! answers [`Down::Busy`] beyond that, so a peer cannot make it queue work without limit.
#![cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
// `Up`, `Down` and `LANE_MAX_PAYLOAD` are `pub` for the `testing` feature only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use dashmap::DashMap;
use s2n_quic::stream::SendStream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::plumbing::{FrameCodec, Respond};
use aqe_core::{AgentId, Envelope, Error, Inbound, MessageId, Result, SendFailure};

use crate::conn::{Conn, admit};
use crate::endpoint::Shared;
use crate::wire::FrameReader;

/// Requests with larger payloads get a stream of their own.
pub const LANE_MAX_PAYLOAD: usize = 16 * 1024;
/// Frames a lane writer sends in one write, at most.
const LANE_BATCH: usize = 128;

/// Requester to responder.
#[derive(Debug, Serialize, Deserialize)]
pub enum Up {
    /// A request (kind Request).
    Request(Envelope),
    /// The requester gave up on this request.
    Cancel(MessageId),
}

/// Responder to requester.
#[derive(Debug, Serialize, Deserialize)]
pub enum Down {
    /// The answer (kind Response or Error; `correlation_id` names the request).
    Response(Envelope),
    /// Unknown recipient or channel, or a sender the peer does not host.
    Refused(MessageId),
    /// The recipient dropped the request without answering (it stopped).
    Dropped(MessageId),
    /// The responder holds too many of this lane's requests in hand; nothing was run.
    Busy(MessageId),
}

/// The requesting half, one per connection.
pub(crate) struct Lane {
    up: mpsc::UnboundedSender<Up>,
    pending: DashMap<MessageId, oneshot::Sender<Down>>,
    broken: AtomicBool,
}

impl Lane {
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Whether no request awaits an answer.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Opens the lane on `conn`: its stream, its writer, and the task that routes answers to
    /// requests.
    pub(crate) async fn open(shared: &Arc<Shared>, conn: &Conn) -> Result<Arc<Lane>> {
        let stream = conn
            .handle
            .clone()
            .open_bidirectional_stream()
            .await
            .map_err(|e| conn.lost(e))?;
        let (recv, mut send) = stream.split();
        let preamble = shared.codec.encode_to_bytes(&crate::wire::Preamble::Lane)?;
        send.send(preamble).await.map_err(|e| conn.lost(e))?;
        let (up, rx) = mpsc::unbounded_channel();
        let lane = Arc::new(Lane {
            up,
            pending: DashMap::new(),
            broken: AtomicBool::new(false),
        });
        let timeout = shared.config.send_timeout;
        shared.tasks.spawn(write_frames(
            send,
            rx,
            shared.codec,
            timeout,
            shared.shutdown.clone(),
        ));
        shared.tasks.spawn(route_answers(
            lane.clone(),
            // Answers may be as large as their channel allows, requests on the lane are small.
            FrameReader::new(recv, shared.frame_limit(crate::endpoint::Frames::Data)),
            shared.shutdown.clone(),
        ));
        Ok(lane)
    }

    /// Sends a request and returns the receiver of its answer, with a guard that cancels the
    /// request if dropped before the answer.
    pub(crate) async fn request(
        self: &Arc<Self>,
        _tasks: &TaskTracker,
        envelope: Envelope,
    ) -> Result<(oneshot::Receiver<Down>, Pending)> {
        let id = envelope.id;
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx);
        let guard = Pending {
            lane: self.clone(),
            id,
            armed: true,
        };
        self.up
            .send(Up::Request(envelope))
            .map_err(|_| Error::Stream {
                stream: aqe_core::StreamId(0),
                reason: aqe_core::StreamFailure::ClosedByPeer,
            })?;
        Ok((rx, guard))
    }
}

/// A request waiting for its answer; dropping it unanswered cancels the request.
pub(crate) struct Pending {
    lane: Arc<Lane>,
    id: MessageId,
    armed: bool,
}

impl Pending {
    /// The answer came: nothing to cancel.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.lane.pending.remove(&self.id);
        if !self.lane.is_broken() {
            let _ = self.lane.up.send(Up::Cancel(self.id));
        }
    }
}

/// Writes the frames of one direction of a lane as they come, all that accumulated in one
/// write. Ends when its queue is dropped, at shutdown, or when a write fails or cannot
/// complete within `timeout` (the peer stopped reading: the lane is abandoned, its stream
/// reset, and waiting requests fail).
///
/// The queue is unbounded because each entry stands for a request (or its answer) already
/// bounded elsewhere: requesters wait for their answers with a timeout, and responders hold
/// at most `limits.requestsInHand` requests.
async fn write_frames<T: Serialize>(
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<T>,
    codec: FrameCodec,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(LANE_BATCH);
    let mut buf = BytesMut::new();
    loop {
        let n = tokio::select! {
            () = shutdown.cancelled() => return,
            n = rx.recv_many(&mut batch, LANE_BATCH) => n,
        };
        if n == 0 {
            let _ = send.finish();
            return;
        }
        buf.clear();
        for frame in batch.drain(..) {
            if let Err(e) = codec.encode(&frame, &mut buf) {
                tracing::error!(error = %e, "cannot encode a lane frame");
            }
        }
        match tokio::time::timeout(timeout, send.send(buf.split().freeze())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!("lane blocked for the send timeout; abandoning it");
                let _ = send.reset(crate::wire::reset::CANCELLED.into());
                return;
            }
        }
    }
}

async fn route_answers(lane: Arc<Lane>, mut reader: FrameReader, shutdown: CancellationToken) {
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => break,
            f = reader.next::<Down>() => f,
        };
        let (id, down) = match frame {
            Ok(Some(Down::Response(env))) => match env.correlation_id {
                Some(id) => (id, Down::Response(env)),
                None => continue,
            },
            Ok(Some(d @ (Down::Refused(id) | Down::Dropped(id) | Down::Busy(id)))) => (id, d),
            Ok(None) | Err(_) => break,
        };
        // An answer nobody waits for any more (timed out) is discarded.
        if let Some((_, tx)) = lane.pending.remove(&id) {
            let _ = tx.send(down);
        }
    }
    lane.broken.store(true, Ordering::Release);
    // Waiters see their sender dropped: the connection is gone.
    lane.pending.clear();
}

/// Serves the responding half of a lane a peer opened, until it ends.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut reader: FrameReader,
    send: SendStream,
) -> Result<()> {
    let (down, rx) = mpsc::unbounded_channel();
    let writer = shared.tasks.spawn(write_frames(
        send,
        rx,
        shared.codec,
        shared.config.send_timeout,
        shared.shutdown.clone(),
    ));
    let cancels: Arc<DashMap<MessageId, CancellationToken>> = Arc::new(DashMap::new());
    let outcome = loop {
        let frame = tokio::select! {
            () = shared.shutdown.cancelled() => break Ok(()),
            f = reader.next::<Up>() => f,
        };
        match frame {
            Ok(Some(Up::Request(envelope))) => {
                let Some(local) = admit(&shared, &conn, &envelope) else {
                    let _ = down.send(Down::Refused(envelope.id));
                    continue;
                };
                if cancels.len() >= shared.config.limits.requests_in_hand as usize {
                    let _ = down.send(Down::Busy(envelope.id));
                    continue;
                }
                let token = CancellationToken::new();
                cancels.insert(envelope.id, token.clone());
                let responder = LaneResponder {
                    id: envelope.id,
                    requester: envelope.from.clone(),
                    down: down.clone(),
                    local: local.clone(),
                    token,
                    cancels: cancels.clone(),
                    answered: false,
                };
                let len = envelope.payload.len();
                let item = Inbound::Request {
                    envelope,
                    responder: aqe_core::Responder::new(responder),
                };
                // Never wait for room: one full inbox must not stall the lane for every
                // other agent. What is in hand is bounded above.
                if let Err((_, item)) = local.inbox.deliver_now(item, || local.stats.received(len))
                {
                    // The agent is stopping: dropping the request answers Dropped.
                    item.abandon();
                }
            }
            Ok(Some(Up::Cancel(id))) => {
                if let Some((_, token)) = cancels.remove(&id) {
                    token.cancel();
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // The requester side is gone: every request still running is abandoned.
    for entry in cancels.iter() {
        entry.value().cancel();
    }
    drop(down);
    let _ = writer.await;
    outcome
}

/// Answers one request on a lane.
struct LaneResponder {
    id: MessageId,
    requester: AgentId,
    down: mpsc::UnboundedSender<Down>,
    local: Arc<aqe_core::plumbing::LocalAgent>,
    token: CancellationToken,
    cancels: Arc<DashMap<MessageId, CancellationToken>>,
    answered: bool,
}

#[async_trait]
impl Respond for LaneResponder {
    async fn respond(mut self: Box<Self>, response: Envelope) -> Result<()> {
        self.answered = true;
        self.cancels.remove(&self.id);
        let gone = Error::SendFailed {
            to: self.requester.clone(),
            reason: SendFailure::ReceiverClosed,
        };
        if self.token.is_cancelled() {
            return Err(gone);
        }
        let len = response.payload.len();
        self.down.send(Down::Response(response)).map_err(|_| gone)?;
        self.local.stats.sent(len);
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.token.cancelled().await
    }
}

impl Drop for LaneResponder {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.cancels.remove(&self.id);
        if !self.token.is_cancelled() {
            // Tell the requester at once rather than let it time out.
            let _ = self.down.send(Down::Dropped(self.id));
        }
    }
}
