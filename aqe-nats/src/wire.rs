//! What aqe puts on NATS (PROTOCOL.md, section "NATS"): the subjects of a fleet and the
//! packets published on them. What sessions say inside packets is the session protocol of
//! `aqe-session`, the same frames as over QUIC.
//!
//! Every NATS message is one packet: the version byte [`NATS_WIRE_VERSION`], the postcard
//! encoding of a [`Packet`], and for [`Packet::Frames`] the session frames that follow it,
//! each a postcard-encoded [`Frame`] (postcard values delimit themselves).
//!
//! The items are `pub` only so that the `testing` feature can expose them to tests and fuzz
//! targets; the module itself is private.
#![allow(unreachable_pub)]

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use aqe_core::{StreamHeader, StreamId};
use aqe_session::{EndpointId, Frame, Hello};

/// The version byte that starts every packet: 3 (sessions between endpoint incarnations,
/// as QUIC's `aqe/4`). A packet of another version is dropped.
pub const NATS_WIRE_VERSION: u8 = 3;

/// The subjects of one fleet.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `aqe.<fleet>.`; `fleet` is a checked subject token.
    pub fn new(fleet: &str) -> Self {
        Self {
            prefix: format!("aqe.{fleet}."),
        }
    }

    /// An endpoint's own subject, `aqe.<fleet>.ep.<32 hex digits>`: everything addressed to
    /// it (hellos, session frames, resets, streams).
    pub fn endpoint(&self, ep: EndpointId) -> String {
        format!("{}ep.{ep}", self.prefix)
    }

    /// The fleet's presence subject, `aqe.<fleet>.presence`: heartbeats and departures.
    pub fn presence(&self) -> String {
        format!("{}presence", self.prefix)
    }
}

/// What one NATS message carries. Variant numbers are postcard's (PROTOCOL.md walks them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Packet {
    /// 0, on `to`'s subject: the sender's hello (its `endpoint` is the sender). `reply`: it
    /// answers the hello of the same nonce.
    Hello {
        /// The endpoint it is for.
        to: EndpointId,
        /// Whether it answers a hello.
        reply: bool,
        /// The hello.
        hello: Hello,
    },
    /// 1, on `to`'s subject: frames of the session whose rank has nonce `session`; the
    /// frames follow the packet, in the order sent.
    Frames {
        /// The sender.
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The session's nonce.
        session: u64,
    },
    /// 2, on `to`'s subject: the sender has no session `session` with `to` (any more).
    Reset {
        /// The sender.
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The session's nonce.
        session: u64,
    },
    /// 3, on the presence subject: the sender lives, its membership is at `generation`.
    Alive {
        /// The sender.
        from: EndpointId,
        /// Its membership generation.
        generation: u64,
    },
    /// 4, on the presence subject: the sender shuts down.
    Gone {
        /// The sender.
        from: EndpointId,
    },
    /// 5, on `to`'s subject: an agent stream opened over session `session`; `generation`
    /// is the opener's membership generation then.
    StreamOpen {
        /// The sender.
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The session's nonce.
        session: u64,
        /// Who opens it to whom, and how.
        header: StreamHeader,
        /// The opener's membership generation.
        generation: u64,
    },
    /// 6, on `to`'s subject: stream data, numbered from 1; a gap breaks the stream.
    StreamData {
        /// The sender.
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The stream.
        stream: StreamId,
        /// Its number.
        seq: u64,
        /// The bytes written.
        data: Bytes,
        /// Whether it is the last.
        fin: bool,
    },
    /// 7, on the writer's subject: the reader consumed up to `up_to`; the writer may send up
    /// to `up_to` plus the stream window.
    StreamCredit {
        /// The sender (the reader).
        from: EndpointId,
        /// The endpoint it is for (the writer).
        to: EndpointId,
        /// The stream.
        stream: StreamId,
        /// Chunks consumed.
        up_to: u64,
    },
    /// 8, on the reader's subject: the writer gave up.
    StreamCancel {
        /// The sender (the writer).
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The stream.
        stream: StreamId,
    },
    /// 9, on the writer's subject: the reader refused or dropped the stream, or it broke.
    StreamReset {
        /// The sender (the reader).
        from: EndpointId,
        /// The endpoint it is for.
        to: EndpointId,
        /// The stream.
        stream: StreamId,
    },
}

/// Why a packet does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Empty.
    #[error("an empty packet")]
    Empty,
    /// Another version.
    #[error("packet version {0}, this endpoint speaks {NATS_WIRE_VERSION}")]
    Version(u8),
    /// Not a packet of this version.
    #[error("a malformed packet: {0}")]
    Malformed(postcard::Error),
    /// Bytes after a packet that carries no frames.
    #[error("bytes after a packet that carries no frames")]
    Trailing,
}

/// Appends `packet`, with its version byte, to `dst`.
///
/// # Errors
/// When postcard refuses it (a registration with a map inside a hello never: hellos hold
/// none).
pub fn encode_into(packet: &Packet, dst: &mut BytesMut) -> Result<(), postcard::Error> {
    dst.put_u8(NATS_WIRE_VERSION);
    aqe_session::encode_into(packet, dst)
}

/// `packet` alone, with its version byte.
///
/// # Errors
/// As [`encode_into`].
pub fn encode(packet: &Packet) -> Result<Bytes, postcard::Error> {
    let mut buf = BytesMut::new();
    encode_into(packet, &mut buf)?;
    Ok(buf.freeze())
}

/// Decodes a packet: it and, for [`Packet::Frames`], the bytes of the frames after it.
///
/// # Errors
/// [`PacketError`].
pub fn decode(bytes: &[u8]) -> Result<(Packet, &[u8]), PacketError> {
    let (&version, body) = bytes.split_first().ok_or(PacketError::Empty)?;
    if version != NATS_WIRE_VERSION {
        return Err(PacketError::Version(version));
    }
    let (packet, rest) =
        postcard::take_from_bytes::<Packet>(body).map_err(PacketError::Malformed)?;
    if !rest.is_empty() && !matches!(packet, Packet::Frames { .. }) {
        return Err(PacketError::Trailing);
    }
    Ok((packet, rest))
}

/// The frames after a [`Packet::Frames`], in order, all or none.
///
/// # Errors
/// When the bytes are not a whole number of frames.
pub fn frames(rest: &[u8]) -> Result<Vec<Frame>, postcard::Error> {
    aqe_core::plumbing::copying(rest.len(), || {
        let (mut rest, mut out) = (rest, Vec::new());
        while !rest.is_empty() {
            let (frame, more) = postcard::take_from_bytes::<Frame>(rest)?;
            out.push(frame);
            rest = more;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_session::Transmit;

    #[test]
    fn subjects_name_the_fleet_and_the_endpoint_incarnation() {
        let s = Subjects::new("qe");
        assert_eq!(
            s.endpoint(EndpointId::new(0xab, 1)),
            "aqe.qe.ep.00000000000000ab0000000000000001"
        );
        assert_eq!(s.presence(), "aqe.qe.presence");
    }

    #[test]
    fn frames_follow_their_packet_and_garbage_is_refused() {
        let (a, b) = (EndpointId::new(1, 2), EndpointId::new(3, 4));
        let packet = Packet::Frames {
            from: a,
            to: b,
            session: 9,
        };
        let mut buf = BytesMut::new();
        encode_into(&packet, &mut buf).expect("encode");
        let sent = [
            Frame::Pong { nonce: 5 },
            Frame::SnapshotRequest,
            Frame::Cancel {
                id: aqe_core::MessageId(7),
            },
        ];
        for f in &sent {
            Transmit::Frame(aqe_session::Lane::Control, f.clone())
                .encode(&mut buf)
                .expect("frame");
        }
        let (got, rest) = decode(&buf).expect("decode");
        assert_eq!(got, packet);
        assert_eq!(frames(rest).expect("frames"), sent);
        assert_eq!(decode(&[]), Err(PacketError::Empty));
        assert_eq!(decode(&[2, 0]), Err(PacketError::Version(2)));
        assert!(matches!(
            decode(&[NATS_WIRE_VERSION, 200, 1]),
            Err(PacketError::Malformed(_))
        ));
        let mut gone = encode(&Packet::Gone { from: a }).expect("gone").to_vec();
        gone.push(0);
        assert_eq!(decode(&gone), Err(PacketError::Trailing));
        for cut in 1..buf.len() {
            let whole = decode(&buf[..cut]).and_then(|(_, rest)| {
                frames(rest)
                    .map_err(PacketError::Malformed)
                    .map(|f| f.len())
            });
            assert!(whole != Ok(sent.len()), "cut at {cut} reads as whole");
        }
    }

    /// Every byte of valid packets flipped, dropped or cut, by a seeded generator: decoding
    /// answers, never panics (the fuzz target `nats_packet` goes further).
    #[test]
    fn mangled_packets_never_panic() {
        let (a, b) = (EndpointId::new(1, 2), EndpointId::new(3, 4));
        let mut frames_packet = BytesMut::new();
        encode_into(
            &Packet::Frames {
                from: a,
                to: b,
                session: 1,
            },
            &mut frames_packet,
        )
        .expect("encode");
        Transmit::Frame(
            aqe_session::Lane::Control,
            Frame::Acks {
                received: vec![(1, 9)],
                taken: vec![(1, 3)],
            },
        )
        .encode(&mut frames_packet)
        .expect("frame");
        let samples = [
            frames_packet.freeze(),
            encode(&Packet::Alive {
                from: a,
                generation: 7,
            })
            .expect("alive"),
            encode(&Packet::StreamData {
                from: a,
                to: b,
                stream: StreamId(3),
                seq: 1,
                data: Bytes::from_static(b"chunk"),
                fin: false,
            })
            .expect("data"),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for sample in &samples {
            for _ in 0..2000 {
                let mut bytes = sample.to_vec();
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(at),
                }
                if let Ok((_, rest)) = decode(&bytes) {
                    let _ = frames(rest);
                }
            }
        }
    }
}
