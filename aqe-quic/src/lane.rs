//! The request lane: requests and their answers on one long-lived bidirectional stream per
//! connection and direction, correlated by message id.
//!
//! Opening a QUIC stream per request costs s2n-quic about as much again as the round trip
//! itself; the lane avoids it. Cancellation, which a per-request stream gets from its own end,
//! is explicit here: a requester that gives up sends [`Up::Cancel`], a responder that goes
//! away answers [`Down::Dropped`]. Requests larger than [`LANE_MAX_PAYLOAD`] still take a
//! stream of their own, so that a large request never holds back the small ones behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;
use s2n_quic::stream::SendStream;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::{
    AgentId, Envelope, Error, FrameCodec, Inbound, MessageId, Respond, Result, SendFailure,
};

use crate::conn::{Conn, admit, deliver_reliably};
use crate::endpoint::{Local, Shared};
use crate::wire::FrameReader;

/// Requests with larger payloads get a stream of their own.
pub(crate) const LANE_MAX_PAYLOAD: usize = 16 * 1024;

/// Requester to responder.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Up {
    /// A request (kind Request).
    Request(Envelope),
    /// The requester gave up on this request.
    Cancel(MessageId),
}

/// Responder to requester.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Down {
    /// The answer (kind Response or Error; `correlation_id` names the request).
    Response(Envelope),
    /// Unknown recipient or channel, or a sender the peer does not host.
    Refused(MessageId),
    /// The recipient dropped the request without answering (it stopped).
    Dropped(MessageId),
}

/// The requesting half, one per connection.
pub(crate) struct Lane {
    send: tokio::sync::Mutex<SendStream>,
    pending: DashMap<MessageId, oneshot::Sender<Down>>,
    broken: AtomicBool,
    codec: FrameCodec,
}

impl Lane {
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    async fn send(&self, frame: &Up) -> Result<()> {
        let bytes = self.codec.encode_to_bytes(frame)?;
        self.send
            .lock()
            .await
            .send(bytes)
            .await
            .map_err(|e| crate::wire::stream_error(0, e))
    }

    /// Opens the lane on `conn`: its stream, and the task that routes answers to requests.
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
        let lane = Arc::new(Lane {
            send: tokio::sync::Mutex::new(send),
            pending: DashMap::new(),
            broken: AtomicBool::new(false),
            codec: shared.codec,
        });
        shared.tasks.spawn(route_answers(
            lane.clone(),
            FrameReader::new(recv, shared.codec),
            shared.shutdown.clone(),
        ));
        Ok(lane)
    }

    /// Sends a request and returns the receiver of its answer, with a guard that cancels the
    /// request if dropped before the answer.
    pub(crate) async fn request(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        envelope: Envelope,
    ) -> Result<(oneshot::Receiver<Down>, Pending)> {
        let id = envelope.id;
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx);
        let guard = Pending {
            lane: self.clone(),
            id,
            tasks: tasks.clone(),
            armed: true,
        };
        self.send(&Up::Request(envelope)).await?;
        Ok((rx, guard))
    }
}

/// A request waiting for its answer; dropping it unanswered cancels the request.
pub(crate) struct Pending {
    lane: Arc<Lane>,
    id: MessageId,
    tasks: TaskTracker,
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
            let (lane, id) = (self.lane.clone(), self.id);
            self.tasks.spawn(async move {
                let _ = lane.send(&Up::Cancel(id)).await;
            });
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
            Ok(Some(d @ (Down::Refused(id) | Down::Dropped(id)))) => (id, d),
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
    let send = Arc::new(tokio::sync::Mutex::new(send));
    let cancels: Arc<DashMap<MessageId, CancellationToken>> = Arc::new(DashMap::new());
    let down = |d: Down| {
        let send = send.clone();
        let codec = shared.codec;
        async move {
            let bytes = codec.encode_to_bytes(&d)?;
            send.lock()
                .await
                .send(bytes)
                .await
                .map_err(|e| crate::wire::stream_error(0, e))
        }
    };
    let outcome = loop {
        let frame = tokio::select! {
            () = shared.shutdown.cancelled() => break Ok(()),
            f = reader.next::<Up>() => f,
        };
        match frame {
            Ok(Some(Up::Request(envelope))) => {
                let Some(local) = admit(&shared, &conn, &envelope) else {
                    down(Down::Refused(envelope.id)).await?;
                    continue;
                };
                let token = CancellationToken::new();
                cancels.insert(envelope.id, token.clone());
                let responder = LaneResponder {
                    id: envelope.id,
                    requester: envelope.from.clone(),
                    send: send.clone(),
                    codec: shared.codec,
                    local: local.clone(),
                    token,
                    cancels: cancels.clone(),
                    tasks: shared.tasks.clone(),
                    answered: false,
                };
                let len = envelope.payload.len();
                let item = Inbound::Request {
                    envelope,
                    responder: aqe_core::Responder::new(responder),
                };
                // Never let one full inbox stall the lane for every other agent.
                match local.inbox.try_reserve() {
                    Ok(Some(permit)) => {
                        local.stats.received(len);
                        permit.send(item);
                    }
                    Ok(None) => {
                        let shared = shared.clone();
                        shared.tasks.clone().spawn(async move {
                            deliver_reliably(&shared, &local, item, len).await;
                        });
                    }
                    // The agent is stopping: dropping the item answers Dropped.
                    Err(_) => drop(item),
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
    outcome
}

/// Answers one request on a lane.
struct LaneResponder {
    id: MessageId,
    requester: AgentId,
    send: Arc<tokio::sync::Mutex<SendStream>>,
    codec: FrameCodec,
    local: Arc<Local>,
    token: CancellationToken,
    cancels: Arc<DashMap<MessageId, CancellationToken>>,
    tasks: TaskTracker,
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
        let bytes = self.codec.encode_to_bytes(&Down::Response(response))?;
        self.send.lock().await.send(bytes).await.map_err(|_| gone)?;
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
        if self.token.is_cancelled() {
            return;
        }
        // Tell the requester at once rather than let it time out.
        let (send, codec, id) = (self.send.clone(), self.codec, self.id);
        self.tasks.spawn(async move {
            if let Ok(bytes) = codec.encode_to_bytes(&Down::Dropped(id)) {
                let _ = send.lock().await.send(bytes).await;
            }
        });
    }
}
