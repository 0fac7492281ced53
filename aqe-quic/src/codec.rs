//! The QUIC wire's framing: postcard values in length-prefixed, versioned frames.
//!
//! A frame is `length: u32 big-endian`, then `version: u8`, then the postcard encoding of the
//! value; `length` counts the version byte and the body. The decoder checks the announced
//! length against the maximum *before* buffering the body and never reserves room for what a
//! header claims, so a hostile length costs nothing.
// Public for the `testing` feature only; the module itself is private.
#![allow(unreachable_pub)]

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use aqe_core::{Error, Result};

/// The frame version this build speaks (PROTOCOL.md, section 2).
pub const WIRE_VERSION: u8 = 4;
/// Bytes before the body: the length (4) and the version (1).
pub const FRAME_HEADER_LEN: usize = 5;
/// The hard ceiling on a frame's length field: 16 MiB.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Frames longer than this are decoded from their own buffer, their payload shared with it
/// (a reader allocates a frame this large exactly: `wire::make_room`).
const SHARED_FROM: usize = 64 * 1024;

/// Frames values with a maximum frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self {
            max_frame_len: MAX_FRAME_LEN,
        }
    }
}

impl FrameCodec {
    /// A codec accepting frames up to `max_frame_len` (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len: max_frame_len.clamp(1, MAX_FRAME_LEN),
        }
    }

    /// The largest frame accepted (its body, after the length).
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Appends one frame holding `value` to `dst`. On error `dst` is left as it was.
    ///
    /// # Errors
    /// [`Error::Encode`] if serde refuses the value, [`Error::MessageTooLarge`] if the frame
    /// would exceed the maximum.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T, dst: &mut BytesMut) -> Result<()> {
        let start = dst.len();
        dst.put_u32(0);
        dst.put_u8(WIRE_VERSION);
        if let Err(source) = postcard::to_io(value, (&mut *dst).writer()) {
            dst.truncate(start);
            return Err(Error::Encode {
                what: "frame",
                source: Box::new(source),
            });
        }
        let len = dst.len() - start - 4;
        if len > self.max_frame_len {
            dst.truncate(start);
            return Err(Error::MessageTooLarge {
                size: len,
                max: self.max_frame_len,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// Encodes `value` as one standalone frame.
    ///
    /// # Errors
    /// As [`FrameCodec::encode`].
    pub fn encode_to_bytes<T: Serialize + ?Sized>(&self, value: &T) -> Result<bytes::Bytes> {
        let mut buf = BytesMut::new();
        self.encode(value, &mut buf)?;
        Ok(buf.freeze())
    }

    /// Takes one complete frame off the front of `src`, if there is one.
    ///
    /// Returns `Ok(None)` when more bytes are needed; the bytes stay in `src`.
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`] (checked from the header alone), [`Error::UnsupportedVersion`],
    /// [`Error::Protocol`] for a zero length, [`Error::Malformed`] for a body that is not
    /// exactly one `T`. After an error the stream is out of sync and must be dropped.
    pub fn decode<T: DeserializeOwned>(&self, src: &mut BytesMut) -> Result<Option<T>> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_len {
            return Err(Error::FrameTooLarge {
                size: len,
                max: self.max_frame_len,
            });
        }
        if len == 0 {
            return Err(Error::Protocol {
                detail: "frame of length zero",
            });
        }
        if src.len() < 4 + len {
            // Nothing is reserved here for what the header claims (a reader that does
            // counts it against its connection's cap first).
            return Ok(None);
        }
        let version = src[4];
        if version != WIRE_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: WIRE_VERSION,
            });
        }
        // A large frame is taken off as it is and its payload shared with it, not copied
        // (its reader allocated it exactly: nothing else lives in that room to keep alive).
        let large = (len > SHARED_FROM).then(|| src.split_to(4 + len).freeze());
        let value = {
            let body = match &large {
                Some(frame) => &frame[FRAME_HEADER_LEN..],
                None => &src[FRAME_HEADER_LEN..4 + len],
            };
            let decode = || postcard::take_from_bytes::<T>(body);
            let decoded = match &large {
                Some(frame) => aqe_core::plumbing::sharing(frame, decode),
                None => decode(),
            };
            match decoded {
                Ok((value, [])) => value,
                Ok(_) => {
                    return Err(Error::Malformed {
                        what: "frame",
                        source: "bytes after the value".into(),
                    });
                }
                Err(source) => {
                    return Err(Error::Malformed {
                        what: "frame",
                        source: Box::new(source),
                    });
                }
            }
        };
        if large.is_none() {
            src.advance(4 + len);
        }
        Ok(Some(value))
    }

    /// Decodes a buffer that must hold exactly one frame.
    ///
    /// # Errors
    /// As [`FrameCodec::decode`], plus [`Error::Truncated`] when the frame is incomplete and
    /// [`Error::Protocol`] when bytes follow it.
    #[cfg(test)]
    pub fn decode_exact<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        let mut buf = BytesMut::from(bytes);
        match self.decode(&mut buf)? {
            Some(v) if buf.is_empty() => Ok(v),
            Some(_) => Err(Error::Protocol {
                detail: "bytes after the frame",
            }),
            None => {
                let needed = if bytes.len() < 4 {
                    4
                } else {
                    4 + u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
                };
                Err(Error::Truncated {
                    what: "frame",
                    needed,
                    have: bytes.len(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{Envelope, MessageKind, Recipient};
    use bytes::Bytes;
    use proptest::prelude::*;

    fn envelope(payload: Vec<u8>, to: Recipient, ttl: Option<u64>) -> Envelope {
        let mut e = Envelope::new(
            "sender".into(),
            to,
            "coordination".into(),
            MessageKind::Direct,
            Bytes::from(payload),
        );
        e.ttl = ttl.map(std::time::Duration::from_millis);
        e
    }

    fn recipient() -> impl Strategy<Value = Recipient> {
        prop_oneof![
            "[a-z]{1,12}".prop_map(|s| Recipient::Agent(s.as_str().into())),
            proptest::collection::vec("[a-z]{1,8}", 0..4)
                .prop_map(|v| Recipient::Agents(v.iter().map(|s| s.as_str().into()).collect())),
            Just(Recipient::Fleet),
        ]
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048),
                                to in recipient(), ttl in proptest::option::of(0u64..1_000_000)) {
            let codec = FrameCodec::default();
            let e = envelope(payload, to, ttl);
            let mut buf = BytesMut::new();
            codec.encode(&e, &mut buf).expect("encode");
            codec.encode(&e, &mut buf).expect("encode");
            let a: Envelope = codec.decode(&mut buf).expect("decode").expect("complete");
            let b: Envelope = codec.decode(&mut buf).expect("decode").expect("complete");
            prop_assert_eq!(&a, &e);
            prop_assert_eq!(&b, &e);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn split_input_decodes_once_complete(payload in proptest::collection::vec(any::<u8>(), 0..512),
                                             cut in 0usize..600) {
            let codec = FrameCodec::default();
            let e = envelope(payload, Recipient::Fleet, None);
            let frame = codec.encode_to_bytes(&e).expect("encode");
            let cut = cut.min(frame.len());
            let mut buf = BytesMut::from(&frame[..cut]);
            let first: Option<Envelope> = codec.decode(&mut buf).expect("prefix is not an error");
            if cut < frame.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&frame[cut..]);
                let second: Option<Envelope> = codec.decode(&mut buf).expect("decode");
                prop_assert_eq!(second, Some(e));
            } else {
                prop_assert_eq!(first, Some(e));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let codec = FrameCodec::new(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            // Any outcome but a panic is fine; errors must be typed.
            let _ = codec.decode::<Envelope>(&mut buf);
            let _ = codec.decode_exact::<Envelope>(&bytes);
        }

        #[test]
        fn flipped_bytes_give_a_value_or_a_typed_error(payload in proptest::collection::vec(any::<u8>(), 0..64),
                                                       at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let codec = FrameCodec::default();
            let frame = codec.encode_to_bytes(&envelope(payload, Recipient::Fleet, None)).expect("encode");
            let mut bytes = frame.to_vec();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            match codec.decode_exact::<Envelope>(&bytes) {
                Ok(_) | Err(Error::Malformed { .. } | Error::Truncated { .. } | Error::FrameTooLarge { .. }
                    | Error::UnsupportedVersion { .. } | Error::Protocol { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }

    /// The worked example of PROTOCOL.md, byte for byte.
    #[test]
    fn the_protocol_documents_example_frame() {
        let mut e = envelope(b"hi".to_vec(), Recipient::Agent("b".into()), None);
        e.id = aqe_core::MessageId(300);
        e.from = "a".into();
        e.timestamp = aqe_core::Timestamp(1_764_000_000_000);
        let frame = FrameCodec::default().encode_to_bytes(&e).expect("encode");
        let expected: Vec<u8> = [
            &[0x00, 0x00, 0x00, 0x25, 0x04][..],
            &[0xac, 0x02],
            &[0x01, 0x61],
            &[0x00, 0x01, 0x62],
            &[0x0c],
            b"coordination",
            &[0x00, 0x05],
            &[0x80, 0xd0, 0xdf, 0xb4, 0xab, 0x33],
            // correlation_id, ttl, redelivered, trace
            &[0x00, 0x00, 0x00, 0x00],
            &[0x00],
            &[0x02, 0x68, 0x69],
        ]
        .concat();
        assert_eq!(&frame[..], &expected[..]);
    }

    #[test]
    fn a_large_frames_payload_is_shared_with_its_frame_and_what_follows_stays() {
        let codec = FrameCodec::default();
        let (big, small) = (
            envelope(vec![5u8; 300_000], Recipient::Agent("a".into()), None),
            envelope(vec![6u8; 10], Recipient::Agent("a".into()), None),
        );
        let mut buf = BytesMut::new();
        codec.encode(&big, &mut buf).expect("encode");
        codec.encode(&small, &mut buf).expect("encode");
        let range = buf.as_ptr_range();
        let got: Envelope = codec.decode(&mut buf).expect("decode").expect("whole");
        assert_eq!(got, big);
        let p = got.payload.as_ptr_range();
        assert!(
            range.start <= p.start && p.end <= range.end,
            "the payload was copied"
        );
        let next: Envelope = codec.decode(&mut buf).expect("decode").expect("whole");
        assert_eq!(next, small);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_from_the_header() {
        let codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert!(matches!(
            codec.decode::<Envelope>(&mut buf),
            Err(Error::FrameTooLarge {
                size: 256,
                max: 100
            })
        ));
    }

    #[test]
    fn a_claimed_length_reserves_nothing() {
        let codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0x00u8, 0xff, 0xff, 0xf0, 2, 0][..]);
        let before = buf.capacity();
        assert!(
            codec
                .decode::<Envelope>(&mut buf)
                .expect("incomplete")
                .is_none()
        );
        assert_eq!(
            buf.capacity(),
            before,
            "no room reserved for 16 MiB not sent"
        );
    }

    #[test]
    fn oversized_value_is_not_encoded() {
        let codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let e = envelope(vec![0; 200], Recipient::Fleet, None);
        assert!(matches!(
            codec.encode(&e, &mut buf),
            Err(Error::MessageTooLarge { max: 100, .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn wrong_version_is_refused() {
        let codec = FrameCodec::default();
        let mut frame = codec.encode_to_bytes(&7u32).expect("encode").to_vec();
        frame[4] = 99;
        assert!(matches!(
            codec.decode_exact::<u32>(&frame),
            Err(Error::UnsupportedVersion {
                found: 99,
                supported: WIRE_VERSION
            })
        ));
    }

    #[test]
    fn truncated_and_trailing_input_are_errors() {
        let codec = FrameCodec::default();
        let frame = codec.encode_to_bytes(&"hello").expect("encode");
        assert!(matches!(
            codec.decode_exact::<String>(&frame[..frame.len() - 1]),
            Err(Error::Truncated { .. })
        ));
        let mut longer = frame.to_vec();
        longer.push(0);
        assert!(matches!(
            codec.decode_exact::<String>(&longer),
            Err(Error::Protocol { .. })
        ));
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode::<String>(&mut zero),
            Err(Error::Protocol { .. })
        ));
    }
}
