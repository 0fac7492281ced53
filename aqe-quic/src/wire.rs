//! The QUIC wire (PROTOCOL.md, sections 1, 2 and 5): ALPN, how streams say what they carry,
//! agent stream chunks, close and reset codes, and reading frames off a stream. What the
//! frames say is the session protocol of `aqe-session`.
//!
//! The items are `pub` only so that the `testing` feature can expose them to tests and fuzz
//! targets; the module itself is private.
#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use aqe_core::{ChannelName, Error, Result, StreamHeader};
use aqe_session::{Budgets, Ended, Frame, Transmit};

pub use crate::codec::{FrameCodec, MAX_FRAME_LEN, WIRE_VERSION};

/// The ALPN identifier of this protocol: version 4 (sessions between endpoint
/// incarnations).
pub const ALPN: &[u8] = b"aqe/4";

/// The first frame of every unidirectional stream: what it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Preamble {
    /// Long-lived: the `Message` frames of one ordered reliable channel, in order.
    Channel(ChannelName),
    /// Long-lived, one of a pool: `Message` frames of unordered reliable channels.
    Unordered,
    /// Long-lived: the sender's `Request` and `Cancel` frames.
    Requests,
    /// Long-lived: the sender's `Response` and `NoAnswer` frames.
    Answers,
    /// One frame too large to hold back the others on its lane (a `Message`, `Request` or
    /// `Response` whose payload is above [`LARGE`]), then the end of the stream.
    Large,
    /// An agent stream: [`Chunk`]s follow. `generation` is the opener's membership
    /// generation when it opened it (as in `Message`).
    Stream {
        /// Who opens it to whom, and how.
        header: StreamHeader,
        /// The opener's membership generation.
        generation: u64,
    },
}

/// Payloads above this many bytes take a stream of their own ([`Preamble::Large`]), so that
/// a large message or request never holds back the small ones of its lane.
pub const LARGE: usize = 64 * 1024;

/// The largest datagram frame sent: it fits in one packet on any QUIC path (the minimum
/// path MTU is 1200 bytes; headers, packet protection and the frame header take the rest).
/// A fixed limit keeps "too large" predictable.
pub const MAX_DATAGRAM: usize = 1100;

/// One piece of agent stream data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The bytes written.
    #[serde(deserialize_with = "aqe_core::plumbing::shared_bytes")]
    pub data: Bytes,
    /// Whether this is the last chunk.
    pub fin: bool,
}

/// Chunks up to this many bytes are copied into the frame that carries them; larger ones go
/// to QUIC as they are, between their header and their end mark.
const COPY_MAX: usize = 4 * 1024;

impl Chunk {
    /// How many bytes the frame of a chunk of `len` bytes counts in its length field (the
    /// version, the data's length, the data, the end mark).
    pub fn frame_len(len: usize) -> usize {
        let mut varint = [0u8; 10];
        let prefix = postcard::to_slice(&(len as u64), &mut varint).map_or(10, |b| b.len());
        1 + prefix + len + 1
    }

    /// Appends the frame of a chunk (exactly what [`FrameCodec::encode`] makes of it) to
    /// `head`; a large chunk's data is not copied: what `head` holds so far and the data go to
    /// `parts`, and `head` goes on with the end mark.
    pub fn encode_into(data: Bytes, fin: bool, head: &mut BytesMut, parts: &mut Vec<Bytes>) {
        let len = data.len();
        head.put_u32(Self::frame_len(len) as u32);
        head.put_u8(WIRE_VERSION);
        let mut varint = [0u8; 10];
        if let Ok(prefix) = postcard::to_slice(&(len as u64), &mut varint) {
            head.put_slice(prefix);
        }
        if len <= COPY_MAX {
            head.put_slice(&data);
        } else {
            parts.push(head.split().freeze());
            parts.push(data);
        }
        head.put_u8(u8::from(fin));
    }
}

/// Application close codes (CONNECTION_CLOSE of type 0x1d).
pub mod close {
    /// The endpoint shuts down (or has nothing more to say on this connection).
    pub const NORMAL: u32 = 0x0;
    /// Another session between the same endpoints is kept; this one is not.
    pub const DUPLICATE: u32 = 0x1;
    /// The token did not match.
    pub const TOKEN_REJECTED: u32 = 0x2;
    /// Token authentication is on and the hello carried none.
    pub const TOKEN_MISSING: u32 = 0x3;
    /// The hello carried another session version.
    pub const VERSION_MISMATCH: u32 = 0x4;
    /// A frame was malformed or out of place, or broke a rule of the session protocol.
    pub const PROTOCOL_VIOLATION: u32 = 0x5;
    /// No hello within the connection timeout.
    pub const HELLO_TIMEOUT: u32 = 0x6;
    /// The peer is this endpoint (same key, same incarnation).
    pub const SELF_CONNECTION: u32 = 0x7;
    /// Nothing was heard from the peer for the liveness timeout.
    pub const UNRESPONSIVE: u32 = 0x8;
    /// A newer incarnation of the peer's key appeared and this one did not answer its probe.
    pub const REPLACED: u32 = 0x9;
    /// The hello's key is not the one the peer's certificate gives.
    pub const IDENTITY_MISMATCH: u32 = 0xa;
    /// The endpoint holds all the partial frames it may (`endpointBytes`, shared with what
    /// its sessions hold): a frame of this connection did not fit.
    pub const OVERLOADED: u32 = 0xb;
}

/// Application codes for stream resets (RESET_STREAM, STOP_SENDING).
pub mod reset {
    /// The writer of an agent stream gave up.
    pub const CANCELLED: u32 = 0x10;
    /// The receiver refused the stream (unknown agent or channel, an opener its peer did
    /// not announce), or the reader of an agent stream dropped it.
    pub const REFUSED: u32 = 0x11;
}

/// The close code a session's end is told with.
pub fn close_code(why: Ended) -> u32 {
    match why {
        Ended::Goodbye | Ended::Shutdown | Ended::LinkLost | Ended::Reset => close::NORMAL,
        Ended::Superseded => close::DUPLICATE,
        Ended::Unresponsive => close::UNRESPONSIVE,
        Ended::Replaced => close::REPLACED,
        Ended::Violation(_) => close::PROTOCOL_VIOLATION,
    }
}

/// Appends one frame holding what `t` stands for to `dst`: the length, the version, the
/// postcard encoding of the session frame.
///
/// # Errors
/// When it cannot be encoded or is larger than a frame may be.
pub fn frame_transmit(t: &Transmit, dst: &mut BytesMut) -> Result<()> {
    if let Some(tail) = frame_parts(t, dst)? {
        dst.extend_from_slice(&tail);
    }
    Ok(())
}

/// As [`frame_transmit`], but an envelope's payload of [`aqe_core::SPLIT_FROM`] bytes or more
/// (the last thing a frame carries) is left out of `dst` and returned, shared and not
/// copied: the frame is `dst`'s new bytes, then it.
///
/// # Errors
/// When it cannot be encoded or is larger than a frame may be.
pub(crate) fn frame_parts(t: &Transmit, dst: &mut BytesMut) -> Result<Option<Bytes>> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(WIRE_VERSION);
    let (encoded, tail) = aqe_core::plumbing::splitting(|| t.encode(dst));
    if let Err(e) = encoded {
        dst.truncate(start);
        return Err(Error::Encode {
            what: "frame",
            source: Box::new(e),
        });
    }
    let len = dst.len() - start - 4 + tail.as_ref().map_or(0, Bytes::len);
    if len > MAX_FRAME_LEN {
        dst.truncate(start);
        return Err(Error::MessageTooLarge {
            size: len,
            max: MAX_FRAME_LEN,
        });
    }
    dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(tail)
}

/// A datagram: the version byte, then one session frame (a QUIC datagram delimits it).
///
/// # Errors
/// When it cannot be encoded.
pub fn datagram(t: &Transmit) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(t.size_hint() + 1);
    buf.put_u8(WIRE_VERSION);
    t.encode(&mut buf).map_err(|e| Error::Encode {
        what: "datagram",
        source: Box::new(e),
    })?;
    Ok(buf.freeze())
}

/// The first byte of a `Request` and of a `Response` frame's body (their variants,
/// PROTOCOL.md's `enum Frame`): on a `Large` stream, it tells them from a message, which is
/// within the session's windows.
pub(crate) const REQUEST_VARIANTS: [u8; 2] = [11, 13];

/// Decodes a datagram: exactly one session frame after the version byte.
///
/// # Errors
/// Another version, or bytes that are not exactly one frame.
pub fn decode_datagram(bytes: &[u8]) -> Result<Frame> {
    match bytes.split_first() {
        Some((&WIRE_VERSION, body)) => match postcard::take_from_bytes::<Frame>(body) {
            Ok((f, [])) => Ok(f),
            Ok(_) => Err(Error::Malformed {
                what: "datagram",
                source: "bytes after the frame".into(),
            }),
            Err(e) => Err(Error::Malformed {
                what: "datagram",
                source: Box::new(e),
            }),
        },
        Some((&v, _)) => Err(Error::UnsupportedVersion {
            found: v,
            supported: WIRE_VERSION,
        }),
        None => Err(Error::Truncated {
            what: "datagram",
            needed: 1,
            have: 0,
        }),
    }
}

/// Reads frames off a QUIC receive stream.
pub struct FrameReader {
    recv: s2n_quic::stream::ReceiveStream,
    buf: BytesMut,
    codec: FrameCodec,
    peer: SocketAddr,
    /// What this reader's buffer counts against, and how much it counts now.
    account: Option<(Arc<Reassembly>, u64)>,
}

/// The room an idle reader keeps for the next frame.
const RETAINED: usize = 64 * 1024;

impl Drop for FrameReader {
    fn drop(&mut self) {
        if let Some((r, counted)) = &self.account {
            r.shrink(*counted);
        }
    }
}

/// What a connection's cap on partial frames is now (it follows the local agents' largest
/// channel).
pub(crate) type Cap = Box<dyn Fn() -> u64 + Send + Sync>;

/// The bytes of partial frames one connection's streams hold: at most a cap for the
/// connection (a peer within its windows never needs more), all of them drawn from the
/// endpoint's budget of held bytes.
pub(crate) struct Reassembly {
    held: AtomicU64,
    /// The cap as last read: read again only when something would pass it.
    cap: AtomicU64,
    now: Cap,
    budgets: Arc<Budgets>,
}

impl Reassembly {
    pub(crate) fn new(cap: u64, now: Cap, budgets: Arc<Budgets>) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            cap: AtomicU64::new(cap),
            now,
            budgets,
        })
    }

    fn grow(&self, n: u64) -> Result<()> {
        let held = self.held.fetch_add(n, Ordering::AcqRel) + n;
        if held > self.cap.load(Ordering::Acquire)
            && held > {
                let cap = (self.now)();
                self.cap.store(cap, Ordering::Release);
                cap
            }
        {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return Err(Error::Protocol {
                detail: "partial frames beyond what the session's windows allow",
            });
        }
        if !self.budgets.held.take(n) {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return Err(Error::Busy {
                peer: aqe_core::AgentId::from("the endpoint"),
            });
        }
        Ok(())
    }

    fn shrink(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.budgets.held.give(n);
    }
}

/// Room in `buf` for `chunk`. A large frame's buffer is allocated once, to the length its
/// header declares (within `max_frame_len`), and counted against the connection's cap like
/// bytes that arrived: grown by doubling, it could hold up to twice what the frame needs,
/// past the cap for a peer within its windows (a window of large messages arriving together
/// closed the connection as hostile), and every doubling copied what was read so far.
fn make_room(buf: &mut BytesMut, chunk: &[u8], max_frame_len: usize) {
    let len = buf.len();
    let need = len + chunk.len();
    if need <= buf.capacity() {
        return;
    }
    let frame_end = (need >= 4)
        .then(|| {
            let mut header = [0u8; 4];
            let have = len.min(4);
            header[..have].copy_from_slice(&buf[..have]);
            header[have..].copy_from_slice(&chunk[..4 - have]);
            4 + u32::from_be_bytes(header) as usize
        })
        .filter(|&end| end <= 4 + max_frame_len);
    let want = frame_end.unwrap_or(0).max(need);
    if want <= RETAINED {
        // Small frames: the buffer's own growth, which reuses the room of frames taken.
        buf.reserve(chunk.len());
        return;
    }
    let mut grown = BytesMut::with_capacity(want);
    grown.extend_from_slice(buf);
    *buf = grown;
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
            account: None,
        }
    }

    /// Counts what this reader holds against `r` from now on.
    ///
    /// # Errors
    /// As [`FrameReader::next`], when what it holds does not fit in `r`.
    pub(crate) fn account(&mut self, r: Arc<Reassembly>) -> Result<()> {
        if let Some((old, counted)) = self.account.take() {
            old.shrink(counted);
        }
        self.account = Some((r, 0));
        self.recount()
    }

    /// The byte at `at` of what is still undecoded, reading until it is there; `None` at a
    /// clean end of stream.
    ///
    /// # Errors
    /// As [`FrameReader::next`].
    pub(crate) async fn peek(&mut self, at: usize) -> Result<Option<u8>> {
        while self.buf.len() <= at {
            if !self.fill().await? {
                return Ok(None);
            }
        }
        Ok(Some(self.buf[at]))
    }

    /// Brings the count in line with the buffer.
    fn recount(&mut self) -> Result<()> {
        if self.buf.is_empty() && self.buf.capacity() > RETAINED {
            // A large frame passed: its room is not kept for nothing.
            self.buf = BytesMut::new();
        }
        let Some((r, counted)) = &mut self.account else {
            return Ok(());
        };
        // What is allocated, not only what is used: that is the memory held.
        let now = self.buf.capacity() as u64;
        if now > *counted {
            r.grow(now - *counted)?;
        } else if now < *counted {
            r.shrink(*counted - now);
        }
        *counted = now;
        Ok(())
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    ///
    /// # Errors
    /// Codec errors, [`Error::Truncated`] for a stream that ends inside a frame,
    /// [`Error::Stream`] when the stream was reset or stopped, [`Error::ConnectionLost`] when
    /// its connection went away.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(v) = self.codec.decode(&mut self.buf)? {
                self.recount()?;
                return Ok(Some(v));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Every complete frame read so far, at least one (waiting for it); empty at a clean
    /// end of stream. What one read brought is decoded in one go.
    ///
    /// # Errors
    /// As [`FrameReader::next`].
    pub async fn batch<T: DeserializeOwned>(&mut self, out: &mut Vec<T>) -> Result<()> {
        self.batch_of(out, usize::MAX, usize::MAX).await
    }

    /// As [`FrameReader::batch`], but no frame more once `max` frames or `max_bytes` bytes
    /// of them are decoded (at least one is): what is left stays read but not decoded,
    /// counted against the connection's reassembly budget, so that what a reader holds
    /// outside that budget stays small.
    ///
    /// # Errors
    /// As [`FrameReader::next`].
    pub async fn batch_of<T: DeserializeOwned>(
        &mut self,
        out: &mut Vec<T>,
        max: usize,
        max_bytes: usize,
    ) -> Result<()> {
        loop {
            let before = self.buf.len();
            while out.len() < max
                && before - self.buf.len() < max_bytes
                && let Some(v) = self.codec.decode(&mut self.buf)?
            {
                out.push(v);
            }
            self.recount()?;
            if !out.is_empty() || !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Reads more; `false` at a clean end.
    async fn fill(&mut self) -> Result<bool> {
        match self.recv.receive().await {
            Ok(Some(chunk)) => {
                make_room(&mut self.buf, &chunk, self.codec.max_frame_len());
                self.buf.extend_from_slice(&chunk);
                self.recount()?;
                Ok(true)
            }
            Ok(None) if self.buf.is_empty() => Ok(false),
            Ok(None) => Err(Error::Truncated {
                what: "frame",
                needed: self.buf.len() + 1,
                have: self.buf.len(),
            }),
            Err(e) => Err(stream_error(self.peer, self.recv.id(), e)),
        }
    }

    /// Changes the largest frame accepted from now on (a stream after its preamble).
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

    /// Feeds `frames` to a buffer in chunks of `step` bytes as a reader does, taking each
    /// frame once complete; the largest capacity the buffer had.
    fn largest_room(frames: &[usize], step: usize) -> usize {
        let mut wire = Vec::new();
        for &len in frames {
            wire.extend_from_slice(&(len as u32).to_be_bytes());
            wire.extend(std::iter::repeat_n(7u8, len));
        }
        let (mut buf, mut largest) = (BytesMut::new(), 0);
        for chunk in wire.chunks(step) {
            make_room(&mut buf, chunk, MAX_FRAME_LEN);
            buf.extend_from_slice(chunk);
            largest = largest.max(buf.capacity());
            while buf.len() >= 4 {
                let end = 4 + u32::from_be_bytes(buf[..4].try_into().expect("4")) as usize;
                if buf.len() < end {
                    break;
                }
                let _ = buf.split_to(end);
            }
        }
        largest
    }

    #[test]
    fn a_request_and_an_answer_frame_begin_with_their_variants() {
        let envelope = aqe_core::Envelope::new(
            "a".into(),
            aqe_core::Recipient::Agent("b".into()),
            "c".into(),
            aqe_core::MessageKind::Direct,
            Bytes::from_static(b"x"),
        );
        let first = |f: &Frame| postcard::to_stdvec(f).expect("encode")[0];
        let message = Frame::Message {
            seq: 300,
            after: 0,
            low: 1,
            generation: 2,
            confirm: false,
            envelope: envelope.clone(),
        };
        assert!(!REQUEST_VARIANTS.contains(&first(&message)));
        let request = Frame::Request {
            generation: 2,
            envelope: envelope.clone(),
        };
        let response = Frame::Response { envelope };
        assert_eq!([first(&request), first(&response)], REQUEST_VARIANTS);
    }

    #[test]
    fn a_large_frame_is_held_in_exactly_its_own_room() {
        for len in [520 * 1024, 900 * 1024, 16 << 20] {
            for step in [1200, 16 * 1024, 64 * 1024 + 3] {
                assert_eq!(
                    largest_room(&[len], step),
                    4 + len,
                    "{len} in steps of {step}"
                );
            }
        }
        // Back to back, each frame gets its own room: never both at once, never doubled.
        let two = largest_room(&[600 * 1024, 700 * 1024], 10_000);
        assert!(two <= 4 + 700 * 1024 + 10_000, "{two}");
        // Small frames keep the buffer's own growth (no allocation per chunk).
        assert!(largest_room(&[100; 5000], 1500) <= 2 * RETAINED);
    }

    #[test]
    fn a_chunk_framed_by_hand_is_what_the_codec_makes() {
        for len in [0, 1, 64, 127, 128, COPY_MAX, COPY_MAX + 1, 300_000] {
            for fin in [false, true] {
                let data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
                let theirs = FrameCodec::default()
                    .encode_to_bytes(&Chunk {
                        data: data.clone(),
                        fin,
                    })
                    .expect("encode");
                let (mut head, mut parts) = (BytesMut::from(&b"before"[..]), Vec::new());
                Chunk::encode_into(data, fin, &mut head, &mut parts);
                parts.push(head.freeze());
                let ours: Vec<u8> = parts.concat();
                assert_eq!(&ours[..6], b"before");
                assert_eq!(&ours[6..], &theirs[..], "{len} bytes, fin {fin}");
                assert_eq!(Chunk::frame_len(len), theirs.len() - 4);
            }
        }
    }
}
