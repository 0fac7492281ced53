//! The aqe wire protocol over QUIC: ALPN, hello, control messages, stream preambles, close
//! codes. PROTOCOL.md at the repository root is the reference for all of this.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use aqe_core::{AgentId, ChannelName, Error, FrameCodec, Registration, Result, StreamHeader};

/// The ALPN identifier of this protocol.
pub(crate) const ALPN: &[u8] = b"aqe/1";
/// The version carried in the hello; a peer with another version is refused.
pub(crate) const PROTOCOL_VERSION: u8 = 1;

/// The first message on a connection, in both directions, on the first bidirectional stream
/// (the control stream) opened by the dialer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub(crate) version: u8,
    /// The sender's endpoint id (random per endpoint; breaks ties between simultaneous dials).
    pub(crate) endpoint: u64,
    /// Where the sender accepts connections.
    pub(crate) listen: SocketAddr,
    /// The shared token, when token authentication is on.
    pub(crate) token: Option<String>,
    /// The agents the sender hosts.
    pub(crate) agents: Vec<Registration>,
    /// Listen addresses of the other endpoints the sender is connected to (peer exchange).
    pub(crate) known: Vec<SocketAddr>,
}

/// Membership updates, on the control stream after the hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Control {
    /// An agent started on the sender's endpoint.
    Joined(Registration),
    /// An agent stopped on the sender's endpoint.
    Left(AgentId),
    /// The sender connected to these endpoints (peer exchange).
    Peers(Vec<SocketAddr>),
}

/// The first frame of every stream other than the control stream: what the stream carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Preamble {
    /// Unidirectional, long-lived: envelopes of one ordered reliable channel, in order.
    Channel(ChannelName),
    /// Unidirectional: one envelope of an unordered reliable channel, then the end.
    Message,
    /// Bidirectional: the request envelope; the response envelope comes back on the same stream.
    Request,
    /// Unidirectional: an agent stream; [`Chunk`] frames follow.
    Stream(StreamHeader),
    /// Bidirectional, long-lived: the request lane (see `lane.rs`).
    Lane,
}

/// One piece of agent stream data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Chunk {
    pub(crate) data: Bytes,
    pub(crate) fin: bool,
}

/// Application close codes (CONNECTION_CLOSE of type 0x1d).
pub(crate) mod close {
    /// Graceful shutdown of the endpoint.
    pub(crate) const NORMAL: u32 = 0x0;
    /// This connection duplicates another between the same endpoints and is retired.
    pub(crate) const DUPLICATE: u32 = 0x1;
    /// The token did not match.
    pub(crate) const TOKEN_REJECTED: u32 = 0x2;
    /// Token authentication is on and the hello carried none.
    pub(crate) const TOKEN_MISSING: u32 = 0x3;
    /// The hello carried another protocol version.
    pub(crate) const VERSION_MISMATCH: u32 = 0x4;
    /// A frame was malformed or out of place.
    pub(crate) const PROTOCOL_VIOLATION: u32 = 0x5;
    /// No hello within the connection timeout.
    pub(crate) const HELLO_TIMEOUT: u32 = 0x6;
    /// The peer connected to itself.
    pub(crate) const SELF_CONNECTION: u32 = 0x7;
}

/// Application codes for stream resets (RESET_STREAM, STOP_SENDING).
pub(crate) mod reset {
    /// The requester gave up on a request.
    pub(crate) const CANCELLED: u32 = 0x10;
    /// The receiver refused the stream (unknown agent or channel, bad preamble).
    pub(crate) const REFUSED: u32 = 0x11;
}

/// Encodes several values as consecutive frames in one buffer, to send in one write.
pub(crate) fn frames(codec: &FrameCodec, values: &[&dyn ErasedFrame]) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    for v in values {
        v.encode_into(codec, &mut buf)?;
    }
    Ok(buf.freeze())
}

/// A value that can be framed, whatever its type.
pub(crate) trait ErasedFrame {
    fn encode_into(&self, codec: &FrameCodec, buf: &mut BytesMut) -> Result<()>;
}

impl<T: Serialize> ErasedFrame for T {
    fn encode_into(&self, codec: &FrameCodec, buf: &mut BytesMut) -> Result<()> {
        codec.encode(self, buf)
    }
}

/// Reads frames off a QUIC receive stream.
pub(crate) struct FrameReader {
    recv: s2n_quic::stream::ReceiveStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl FrameReader {
    pub(crate) fn new(recv: s2n_quic::stream::ReceiveStream, codec: FrameCodec) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            codec,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    ///
    /// # Errors
    /// Codec errors, [`Error::Truncated`] for a stream that ends inside a frame, and
    /// [`Error::Stream`] when the stream was reset or its connection went away.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(v) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(v));
            }
            match self.recv.receive().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(Error::Truncated {
                        what: "frame",
                        needed: self.buf.len() + 1,
                        have: self.buf.len(),
                    });
                }
                Err(e) => return Err(stream_error(self.recv.id(), e)),
            }
        }
    }

    /// Waits for the end of the stream (clean or not), discarding data.
    pub(crate) async fn closed(&mut self) {
        while let Ok(Some(_)) = self.recv.receive().await {}
    }

    pub(crate) fn stop(&mut self, code: u32) {
        let _ = self
            .recv
            .stop_sending(s2n_quic::application::Error::from(code));
    }
}

/// Maps an s2n stream error to ours.
pub(crate) fn stream_error(id: u64, e: s2n_quic::stream::Error) -> Error {
    use aqe_core::StreamFailure;
    let reason = match e {
        s2n_quic::stream::Error::StreamReset { error, .. } => {
            StreamFailure::Reset(u64::from(error))
        }
        s2n_quic::stream::Error::SendAfterFinish { .. } => StreamFailure::Finished,
        _ => StreamFailure::ClosedByPeer,
    };
    Error::Stream {
        stream: aqe_core::StreamId(id),
        reason,
    }
}
