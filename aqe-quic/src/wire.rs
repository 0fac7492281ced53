//! The aqe wire protocol over QUIC: ALPN, hello, control messages, stream preambles, close
//! codes. PROTOCOL.md at the repository root is the reference for all of this.
//!
//! The items are `pub` only so that the `testing` feature can expose them to tests and fuzz
//! targets; the module itself is private.
// Every item is protocol; tests and fuzz targets reach them through `testing`.
#![allow(unreachable_pub)]

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use aqe_core::plumbing::FrameCodec;
use aqe_core::{AgentId, ChannelName, Error, Registration, Result, StreamHeader};

/// The ALPN identifier of this protocol.
pub const ALPN: &[u8] = b"aqe/3";
/// The version carried in the hello; a peer with another version is refused.
pub const PROTOCOL_VERSION: u8 = 3;

/// The first message on a connection, in both directions, on the first bidirectional stream
/// (the control stream) opened by the dialer. It authenticates the sender (token) and is
/// small, so that a peer not authenticated yet can make the receiver hold little; the
/// sender's membership follows in `Snapshot` frames once both hellos passed their checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// The sender's endpoint id (random per endpoint).
    pub endpoint: u64,
    /// Chosen by the dialer for this connection and echoed by the listener; with the dialer's
    /// endpoint id it ranks the connections of one endpoint pair (the smallest is kept).
    pub nonce: u64,
    /// Where the sender accepts connections.
    pub listen: SocketAddr,
    /// The shared token, when token authentication is on.
    pub token: Option<String>,
    /// Reliable messages the sender of this hello accepts unacknowledged per receiving agent
    /// on this connection.
    pub window: u32,
}

/// Membership of another endpoint, as the endpoint connected to it tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Relayed {
    /// All of it: where it listens (with the IP its connection comes from), its membership
    /// generation and its agents.
    Snapshot {
        /// The endpoint told of.
        endpoint: u64,
        /// Where it listens.
        listen: SocketAddr,
        /// Its membership generation.
        generation: u64,
        /// Its agents.
        agents: Vec<Registration>,
    },
    /// An agent started there.
    Joined {
        /// The endpoint told of.
        endpoint: u64,
        /// Its membership generation now.
        generation: u64,
        /// The agent.
        agent: Registration,
    },
    /// An agent stopped there.
    Left {
        /// The endpoint told of.
        endpoint: u64,
        /// Its membership generation now.
        generation: u64,
        /// The agent.
        agent: AgentId,
    },
    /// The sender's connection to it ended.
    Gone {
        /// The endpoint told of.
        endpoint: u64,
    },
}

/// Why reliable messages were not taken by their agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unprocessed {
    /// The receiving agent is not hosted here (it left, or never was), or lacks the channel.
    NotHere,
    /// The receiving agent stopped with the messages still queued.
    Stopped,
}

/// Inclusive ranges of sequence numbers, `(first, last)`.
pub type SeqRanges = Vec<(u64, u64)>;

/// What each side sends on its half of the control stream after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Part of the sender's membership as of a generation: the agents it hosts. Sent right
    /// after the hello (split over several frames when large); applied when `last` arrives.
    /// Membership generations are bumped by every attach and detach, carried by `Joined` and
    /// `Left`; a receiver applies only what is newer than what it has.
    Snapshot {
        /// The sender's membership generation.
        generation: u64,
        /// Agents it hosts (some of them, unless `last` and no frame came before).
        agents: Vec<Registration>,
        /// Whether this completes the snapshot.
        last: bool,
    },
    /// An agent started on the sender's endpoint, making its membership this generation.
    Joined(u64, Registration),
    /// An agent stopped on the sender's endpoint, making its membership this generation.
    Left(u64, AgentId),
    /// What the sender knows first-hand about another endpoint it is connected to (peer
    /// exchange); never relayed further.
    Relay(Relayed),
    /// The reliable messages with these sequence numbers (the receiver's, on this
    /// connection) were taken by their agents.
    Ack(SeqRanges),
    /// These will never be taken, for this reason.
    Unprocessed(SeqRanges, Unprocessed),
    /// A heartbeat; its number only tells heartbeats apart.
    Ping(u64),
    /// On a connection being retired: the sender needs nothing more from it (no request of
    /// its own awaits an answer, no message of its own awaits an acknowledgement).
    Drained,
}

/// The first frame of every stream other than the control stream: what the stream carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Preamble {
    /// Unidirectional, long-lived: [`Sequenced`] envelopes of one ordered reliable channel,
    /// in order.
    Channel(ChannelName),
    /// Unidirectional: [`Sequenced`] envelopes of unordered reliable channels (one of a pool
    /// of streams, or a stream of its own for a large message).
    Unordered,
    /// Bidirectional: the request envelope; the response envelope comes back on the same stream.
    Request,
    /// Unidirectional: an agent stream; [`Chunk`] frames follow.
    Stream(StreamHeader),
    /// Bidirectional, long-lived: the request lane (see `lane.rs`).
    Lane,
}

/// A reliable envelope with its sender's sequence number on this connection, by which the
/// receiver acknowledges it. Its postcard encoding is the varint `seq` followed by the
/// envelope's encoding, which lets the sender encode the envelope once and frame it again
/// with a new number when it redelivers it (see `sequenced_header`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sequenced {
    /// The sender's number for it on this connection.
    pub seq: u64,
    /// The message.
    pub envelope: aqe_core::Envelope,
}

/// One piece of agent stream data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    /// The bytes written.
    pub data: Bytes,
    /// Whether this is the last chunk.
    pub fin: bool,
}

/// Application close codes (CONNECTION_CLOSE of type 0x1d).
pub mod close {
    /// Graceful shutdown of the endpoint.
    pub const NORMAL: u32 = 0x0;
    /// This connection duplicates another between the same endpoints and is retired.
    pub const DUPLICATE: u32 = 0x1;
    /// The token did not match.
    pub const TOKEN_REJECTED: u32 = 0x2;
    /// Token authentication is on and the hello carried none.
    pub const TOKEN_MISSING: u32 = 0x3;
    /// The hello carried another protocol version.
    pub const VERSION_MISMATCH: u32 = 0x4;
    /// A frame was malformed or out of place.
    pub const PROTOCOL_VIOLATION: u32 = 0x5;
    /// No hello within the connection timeout.
    pub const HELLO_TIMEOUT: u32 = 0x6;
    /// The peer connected to itself.
    pub const SELF_CONNECTION: u32 = 0x7;
    /// Nothing was heard from the peer for the liveness timeout, or it stopped reading its
    /// control stream: it is declared unreachable.
    pub const UNRESPONSIVE: u32 = 0x8;
    /// Another endpoint now listens at the peer's address (it restarted): this connection
    /// is to an endpoint that no longer exists.
    pub const REPLACED: u32 = 0x9;
    /// The hello's endpoint id is not the one the peer's certificate gives.
    pub const IDENTITY_MISMATCH: u32 = 0xa;
    /// The peer presents this endpoint's own certificate.
    pub const SHARED_CERTIFICATE: u32 = 0xb;
}

/// Application codes for stream resets (RESET_STREAM, STOP_SENDING).
pub mod reset {
    /// The requester or writer gave up.
    pub const CANCELLED: u32 = 0x10;
    /// The receiver refused the stream (unknown agent or channel, bad preamble), or the
    /// reader of an agent stream dropped it.
    pub const REFUSED: u32 = 0x11;
}

/// Encodes several values as consecutive frames in one buffer, to send in one write.
pub fn frames(codec: &FrameCodec, values: &[&dyn ErasedFrame]) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    for v in values {
        v.encode_into(codec, &mut buf)?;
    }
    Ok(buf.freeze())
}

/// A value that can be framed, whatever its type.
pub trait ErasedFrame {
    fn encode_into(&self, codec: &FrameCodec, buf: &mut BytesMut) -> Result<()>;
}

impl<T: Serialize> ErasedFrame for T {
    fn encode_into(&self, codec: &FrameCodec, buf: &mut BytesMut) -> Result<()> {
        codec.encode(self, buf)
    }
}

/// The header of a [`Sequenced`] frame whose envelope encodes to `envelope_len` bytes: the
/// frame length, the wire version and the varint `seq`. Sent before the envelope's bytes.
pub fn sequenced_header(seq: u64, envelope_len: usize) -> Result<Bytes> {
    let mut varint = [0u8; 10];
    let seq_bytes = postcard::to_slice(&seq, &mut varint).map_err(|source| Error::Encode {
        what: "sequence number",
        source: Box::new(source),
    })?;
    let len = 1 + seq_bytes.len() + envelope_len;
    let len = u32::try_from(len).map_err(|_| Error::MessageTooLarge {
        size: len,
        max: aqe_core::plumbing::MAX_FRAME_LEN,
    })?;
    let mut buf = BytesMut::with_capacity(5 + seq_bytes.len());
    buf.put_u32(len);
    buf.put_u8(aqe_core::plumbing::WIRE_VERSION);
    buf.put_slice(seq_bytes);
    Ok(buf.freeze())
}

/// Reads frames off a QUIC receive stream.
pub struct FrameReader {
    recv: s2n_quic::stream::ReceiveStream,
    buf: BytesMut,
    codec: FrameCodec,
    peer: SocketAddr,
}

impl FrameReader {
    /// Reads `recv`, accepting frames up to `codec`'s limit.
    pub fn new(recv: s2n_quic::stream::ReceiveStream, codec: FrameCodec) -> Self {
        let peer = recv
            .connection()
            .remote_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Self {
            recv,
            buf: BytesMut::new(),
            codec,
            peer,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    ///
    /// # Errors
    /// Codec errors, [`Error::Truncated`] for a stream that ends inside a frame, and
    /// [`Error::Stream`] when the stream was reset or stopped, [`Error::ConnectionLost`] when
    /// its connection went away.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
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
                Err(e) => return Err(stream_error(self.peer, self.recv.id(), e)),
            }
        }
    }

    /// Waits for the end of the stream (clean or not), discarding data.
    pub async fn closed(&mut self) {
        while let Ok(Some(_)) = self.recv.receive().await {}
    }

    /// Changes the largest frame accepted from now on (a control stream after its hello, a
    /// data stream after its preamble).
    pub fn set_limit(&mut self, codec: FrameCodec) {
        self.codec = codec;
    }

    /// Tells the writer to stop (STOP_SENDING with `code`).
    pub fn stop(&mut self, code: u32) {
        let _ = self
            .recv
            .stop_sending(s2n_quic::application::Error::from(code));
    }
}

/// Maps an s2n stream error to ours: the codes of this protocol to the failures they mean
/// (PROTOCOL.md, section 6), a connection that went away to [`Error::ConnectionLost`].
pub fn stream_error(peer: SocketAddr, id: u64, e: s2n_quic::stream::Error) -> Error {
    use aqe_core::StreamFailure;
    let reason = match e {
        s2n_quic::stream::Error::StreamReset { error, .. } => match u64::from(error) {
            c if c == u64::from(reset::CANCELLED) => StreamFailure::Cancelled,
            c if c == u64::from(reset::REFUSED) => StreamFailure::ClosedByPeer,
            c => StreamFailure::Reset(c),
        },
        s2n_quic::stream::Error::SendAfterFinish { .. } => StreamFailure::Finished,
        s2n_quic::stream::Error::ConnectionError { error, .. } => {
            return Error::ConnectionLost {
                addr: peer.into(),
                source: Box::new(error),
            };
        }
        _ => StreamFailure::ClosedByPeer,
    };
    Error::Stream {
        stream: aqe_core::StreamId(id),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{Envelope, MessageKind, Recipient};

    #[test]
    fn a_sequenced_frame_is_its_header_then_the_envelope_encoding() {
        let env = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "coordination".into(),
            MessageKind::Direct,
            Bytes::from_static(b"hi"),
        );
        let codec = FrameCodec::default();
        for seq in [0, 127, 128, 300, u64::MAX] {
            let body = aqe_core::encode(&env).expect("encode");
            let mut frame = BytesMut::new();
            frame.extend_from_slice(&sequenced_header(seq, body.len()).expect("header"));
            frame.extend_from_slice(&body);
            let expected = codec
                .encode_to_bytes(&Sequenced {
                    seq,
                    envelope: env.clone(),
                })
                .expect("encode");
            assert_eq!(&frame[..], &expected[..], "seq {seq}");
        }
    }
}
