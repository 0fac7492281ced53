//! One connection to another endpoint: what arrives on it, and the ways of sending on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use s2n_quic::connection::{Handle, StreamAcceptor};
use s2n_quic::provider::datagram::default as datagram;
use s2n_quic::stream::{PeerStream, SendStream};

use aqe_core::{
    AgentId, ChannelName, Delivered, Envelope, Error, FrameCodec, Inbound, IncomingStream, Result,
    StreamHeader,
};

use crate::endpoint::{Local, Shared};
use crate::link::{self, LinkStats};
use crate::stream::{QuicResponder, QuicSource};
use crate::wire::{self, Control, FrameReader, Preamble, close, reset};

/// How long a delivery waits for room in a full inbox before re-checking whether the
/// connection or endpoint went away. Reliable data is never dropped for lack of room: the
/// stream stalls, and QUIC flow control pushes back on the sender.
const INBOX_WAIT: Duration = Duration::from_secs(1);

/// The largest datagram frame sent: it fits in one packet on any QUIC path (the minimum
/// path MTU is 1200 bytes; headers, packet protection and the frame header take the rest).
/// A fixed limit keeps "too large" predictable instead of depending on path MTU discovery.
pub(crate) const MAX_DATAGRAM: usize = 1100;

pub(crate) struct Conn {
    /// The remote endpoint's id.
    pub(crate) endpoint: u64,
    /// Where the remote endpoint listens.
    pub(crate) listen: SocketAddr,
    /// The id of the endpoint that dialed this connection.
    pub(crate) initiator: u64,
    pub(crate) handle: Handle,
    control_tx: tokio::sync::Mutex<SendStream>,
    /// The long-lived stream of each ordered reliable channel.
    ordered: tokio::sync::Mutex<HashMap<ChannelName, Arc<tokio::sync::Mutex<SendStream>>>>,
    link: Arc<LinkStats>,
    /// The request lane this side opened, once used.
    lane: tokio::sync::Mutex<Option<Arc<crate::lane::Lane>>>,
}

impl Conn {
    pub(crate) fn new(
        endpoint: u64,
        listen: SocketAddr,
        initiator: u64,
        handle: Handle,
        control_tx: SendStream,
    ) -> Self {
        let link = link::of(&handle);
        Self {
            endpoint,
            listen,
            initiator,
            handle,
            control_tx: tokio::sync::Mutex::new(control_tx),
            ordered: tokio::sync::Mutex::new(HashMap::new()),
            link,
            lane: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn link(&self) -> &LinkStats {
        &self.link
    }

    pub(crate) fn lost(&self, e: impl Into<aqe_core::BoxError>) -> Error {
        Error::ConnectionLost {
            addr: self.listen,
            source: e.into(),
        }
    }

    fn stream_failed(&self, e: s2n_quic::stream::Error) -> Error {
        match e {
            s2n_quic::stream::Error::ConnectionError { .. } => self.lost(e),
            e => wire::stream_error(0, e),
        }
    }

    /// Sends a membership update on the control stream.
    pub(crate) async fn control(&self, codec: &FrameCodec, msg: &Control) -> Result<()> {
        let frame = codec.encode_to_bytes(msg)?;
        self.control_tx
            .lock()
            .await
            .send(frame)
            .await
            .map_err(|e| self.stream_failed(e))
    }

    /// Ordered reliable: on the channel's long-lived stream, opened on first use.
    pub(crate) async fn send_ordered(
        &self,
        codec: &FrameCodec,
        channel: &ChannelName,
        frame: Bytes,
    ) -> Result<()> {
        let stream = {
            let mut streams = self.ordered.lock().await;
            match streams.get(channel) {
                Some(s) => s.clone(),
                None => {
                    let s = self
                        .open_uni(codec.encode_to_bytes(&Preamble::Channel(channel.clone()))?)
                        .await?;
                    let s = Arc::new(tokio::sync::Mutex::new(s));
                    streams.insert(channel.clone(), s.clone());
                    s
                }
            }
        };
        let res = stream.lock().await.send(frame).await;
        if let Err(e) = res {
            // A broken channel stream is replaced on the next send.
            self.ordered.lock().await.remove(channel);
            return Err(self.stream_failed(e));
        }
        Ok(())
    }

    /// Unordered reliable: a stream of its own, so no message waits behind another.
    pub(crate) async fn send_message(&self, codec: &FrameCodec, envelope: &Envelope) -> Result<()> {
        let frames = wire::frames(codec, &[&Preamble::Message, envelope])?;
        let mut s = self.open_uni(frames).await?;
        s.finish().map_err(|e| self.stream_failed(e))
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
                    addr: self.listen,
                    source: format!("{e:?}").into(),
                }),
            })
            .map_err(|e| self.lost(e))?
    }

    /// A request: on the lane, or on a stream of its own when large.
    pub(crate) async fn request(
        &self,
        shared: &Arc<Shared>,
        envelope: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        if envelope.payload.len() > crate::lane::LANE_MAX_PAYLOAD {
            return self
                .request_on_stream(&shared.codec, &envelope, timeout)
                .await;
        }
        let target = envelope
            .target()
            .cloned()
            .unwrap_or_else(|| AgentId::from("?"));
        let exchange = async {
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
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(Error::Timeout {
                after: timeout,
                attempts: 1,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(crate::lane::Down::Response(response))) => Ok(response),
            Ok(Ok(crate::lane::Down::Refused(_))) => Err(Error::PeerNotFound { peer: target }),
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
        codec: &FrameCodec,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let target = envelope.target().cloned();
        let frames = wire::frames(codec, &[&Preamble::Request, envelope])?;
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
            FrameReader::new(recv, *codec).next::<Envelope>().await
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        match outcome {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(Error::Remote {
                agent: target.unwrap_or_else(|| AgentId::from("?")),
                kind: aqe_core::RemoteErrorKind::Dropped,
                message: "the request was dropped without an answer".to_owned(),
            }),
            Ok(Err(Error::Stream {
                reason: aqe_core::StreamFailure::Reset(code),
                ..
            })) if code == u64::from(reset::REFUSED) => Err(Error::PeerNotFound {
                peer: target.unwrap_or_else(|| AgentId::from("?")),
            }),
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

    /// Opens the stream of an agent stream and sends its preamble.
    pub(crate) async fn open_stream(
        &self,
        codec: &FrameCodec,
        header: &StreamHeader,
    ) -> Result<SendStream> {
        self.open_uni(codec.encode_to_bytes(&Preamble::Stream(header.clone()))?)
            .await
    }

    /// Opens a unidirectional stream and sends its first bytes (a preamble, or more).
    async fn open_uni(&self, first: Bytes) -> Result<SendStream> {
        let mut s = self
            .handle
            .clone()
            .open_send_stream()
            .await
            .map_err(|e| self.lost(e))?;
        s.send(first).await.map_err(|e| self.stream_failed(e))?;
        Ok(s)
    }
}

/// Serves a connection until it ends: membership updates, incoming streams, datagrams.
pub(crate) async fn drive(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut control: FrameReader,
    mut acceptor: StreamAcceptor,
) {
    let reason = loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            msg = control.next::<Control>() => match msg {
                Ok(Some(Control::Joined(reg))) => shared.remote_joined(reg, conn.endpoint),
                Ok(Some(Control::Left(id))) => shared.remote_left(&id, conn.endpoint),
                Ok(Some(Control::Peers(addrs))) => addrs.into_iter().for_each(|a| shared.dial_in_background(a)),
                Ok(None) => break "the peer closed its control stream".to_owned(),
                Err(e @ Error::Stream { .. }) => break e.to_string(),
                Err(e) => {
                    conn.handle.close(close::PROTOCOL_VIOLATION.into());
                    break format!("protocol violation on the control stream: {e}");
                }
            },
            stream = acceptor.accept() => match stream {
                Ok(Some(s)) => {
                    shared.tasks.spawn(serve(shared.clone(), conn.clone(), s));
                }
                Ok(None) => break "connection closed".to_owned(),
                Err(e) => break e.to_string(),
            },
            dgram = recv_datagram(&conn.handle) => match dgram {
                Some(bytes) => datagram_arrived(&shared, &conn, bytes).await,
                None => break "connection closed".to_owned(),
            },
        }
    };
    shared.connection_ended(&conn, reason);
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

/// Checks an envelope from `conn`: its sender must live behind this connection, its
/// receiver here, on a channel it has. Returns the receiver.
pub(crate) fn admit(shared: &Shared, conn: &Conn, envelope: &Envelope) -> Option<Arc<Local>> {
    let from_here = shared
        .remotes
        .get(&envelope.from)
        .is_some_and(|r| r.endpoint == conn.endpoint);
    if !from_here {
        tracing::debug!(from = %envelope.from, peer = %conn.listen, "envelope from an agent not hosted by that endpoint; dropped");
        return None;
    }
    let local = shared
        .locals
        .get(envelope.target()?)
        .map(|l| l.value().clone())?;
    local.reg.has_channel(&envelope.channel).then_some(local)
}

async fn datagram_arrived(shared: &Shared, conn: &Conn, bytes: Bytes) {
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
            local.stats.received(len);
            permit.send(Inbound::Message(envelope));
        }
        Ok(None) | Err(_) => local.stats.dropped(),
    }
}

/// Delivers reliably, counting `len` received bytes first: waits for room as long as the
/// endpoint and the agent live.
pub(crate) async fn deliver_reliably(
    shared: &Shared,
    local: &Local,
    item: Inbound,
    len: usize,
) -> bool {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return false,
            r = local.inbox.reserve(INBOX_WAIT) => match r {
                Ok(permit) => {
                    local.stats.received(len);
                    permit.send(item);
                    return true;
                }
                Err(Error::SendFailed { reason: aqe_core::SendFailure::QueueFull(_), .. }) => continue,
                Err(_) => return false,
            },
        }
    }
}

async fn serve(shared: Arc<Shared>, conn: Arc<Conn>, stream: PeerStream) {
    let outcome = match stream {
        PeerStream::Bidirectional(s) => {
            let (recv, send) = s.split();
            let mut reader = FrameReader::new(recv, shared.codec);
            match reader.next::<Preamble>().await {
                Ok(Some(Preamble::Request)) => serve_request(&shared, &conn, reader, send).await,
                Ok(Some(Preamble::Lane)) => {
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
            serve_receive(&shared, &conn, FrameReader::new(recv, shared.codec)).await
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
            conn.handle.close(close::PROTOCOL_VIOLATION.into());
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
    ));
    deliver_reliably(
        shared,
        &local,
        Inbound::Request {
            envelope,
            responder,
        },
        len,
    )
    .await;
    Ok(())
}

async fn serve_receive(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    mut reader: FrameReader,
) -> Result<()> {
    match reader.next::<Preamble>().await? {
        Some(Preamble::Channel(channel)) => {
            while let Some(envelope) = reader.next::<Envelope>().await? {
                if envelope.channel != channel {
                    return Err(Error::Protocol {
                        detail: "envelope on another channel's stream",
                    });
                }
                deliver_message(shared, conn, envelope).await;
            }
            Ok(())
        }
        Some(Preamble::Message) => {
            if let Some(envelope) = reader.next::<Envelope>().await? {
                deliver_message(shared, conn, envelope).await;
            }
            Ok(())
        }
        Some(Preamble::Stream(header)) => {
            let from_here = shared
                .remotes
                .get(&header.from)
                .is_some_and(|r| r.endpoint == conn.endpoint);
            let local = shared.locals.get(&header.to).map(|l| l.value().clone());
            let Some(local) =
                local.filter(|l| from_here && l.reg.has_channel(&header.options.channel))
            else {
                reader.stop(reset::REFUSED);
                return Ok(());
            };
            local.stats.stream_delta(true);
            let source = QuicSource::new(header.id, reader, local.clone());
            deliver_reliably(
                shared,
                &local,
                Inbound::Stream(IncomingStream::new(header, source)),
                0,
            )
            .await;
            Ok(())
        }
        Some(Preamble::Request | Preamble::Lane) => Err(Error::Protocol {
            detail: "a request on a unidirectional stream",
        }),
        None => Ok(()),
    }
}

async fn deliver_message(shared: &Shared, conn: &Conn, envelope: Envelope) {
    let Some(local) = admit(shared, conn, &envelope) else {
        return;
    };
    let len = envelope.payload.len();
    deliver_reliably(shared, &local, Inbound::Message(envelope), len).await;
}
