//! An envelope's encoding in two parts, so that a large payload is sent without being
//! copied into it.
//!
//! The payload is an envelope's last field, and postcard writes bytes as their length then
//! the bytes themselves. So the encoding of an envelope is its *head* (every field, ending
//! with the payload's length) followed by the payload as it is: a transport writes the two
//! parts one after the other (a vectored write) and the peer reads exactly what postcard
//! makes of the whole envelope. A 16 MiB message is then held once by its sender, not twice,
//! and costs no copy to be encoded, re-flagged or handed to another transport.

use std::cell::{Cell, RefCell};

use bytes::{Bytes, BytesMut};
use serde::{Serialize, Serializer};

use crate::message::pack;
use crate::{Envelope, Result};

/// Payloads from this many bytes are not copied into their envelope's encoding: they
/// follow it as a part of their own. Below it, a copy costs less than another part.
pub const SPLIT_FROM: usize = 1024;

thread_local! {
    /// Encoding within [`splitting`] on this thread: payloads of [`SPLIT_FROM`] bytes or more
    /// are left out of the head.
    static SPLITTING: Cell<bool> = const { Cell::new(false) };
    /// The payload left out of the head being encoded.
    static SPLIT_OFF: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    /// Decoding with [`Encoded::decode`] on this thread: the payload that follows the head.
    pub(crate) static TAIL: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// An envelope's postcard encoding as a head and, for a payload of [`SPLIT_FROM`] bytes or
/// more, the payload itself (shared with the envelope it came from, not copied). The
/// encoding is `head` then `tail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    head: Bytes,
    tail: Bytes,
}

impl Encoded {
    /// Its length in bytes, both parts.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first part: every field, ending with the payload's length when the payload is
    /// [`tail`](Encoded::tail).
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The second part: the payload, when it was split off; empty otherwise.
    pub fn tail(&self) -> &Bytes {
        &self.tail
    }

    /// Whether `other` is this very encoding (a clone of it, sharing its bytes), not merely
    /// an equal one: cheap, for telling the copies of one encoded envelope apart from others.
    pub fn same_bytes(&self, other: &Encoded) -> bool {
        let same = |a: &Bytes, b: &Bytes| a.as_ptr() == b.as_ptr() && a.len() == b.len();
        same(&self.head, &other.head) && same(&self.tail, &other.tail)
    }

    /// Appends the whole encoding to `dst`.
    pub fn write_to(&self, dst: &mut BytesMut) {
        dst.extend_from_slice(&self.head);
        dst.extend_from_slice(&self.tail);
    }

    /// The envelope, its payload shared with the encoding rather than copied when it is a
    /// part of its own or nearly all of one.
    ///
    /// # Errors
    /// [`Error::Malformed`] when the parts are not one envelope's encoding.
    pub fn decode(&self) -> Result<Envelope> {
        if self.tail.is_empty() {
            return crate::plumbing::sharing(&self.head, || crate::decode(&self.head));
        }
        /// Clears the tail on every exit, a panic's too.
        struct Clear(Option<Bytes>);
        impl Drop for Clear {
            fn drop(&mut self) {
                TAIL.set(self.0.take());
            }
        }
        let _clear = Clear(TAIL.replace(Some(self.tail.clone())));
        // The payload's field takes the tail, checking that it is as long as the head says.
        crate::decode(&self.head)
    }
}

/// Encodes `envelopes` as [`encode_each`](crate::encode_each) does (small ones share
/// buffers), each payload of [`SPLIT_FROM`] bytes or more left out of its head and shared,
/// not copied.
///
/// # Errors
/// [`Error::Encode`] when an envelope cannot be encoded.
pub fn encode_envelopes(envelopes: &[Envelope]) -> Result<Vec<Encoded>> {
    splitting(|| {
        pack(
            envelopes,
            || SPLIT_OFF.take().unwrap_or_default(),
            |head, tail| Encoded { head, tail },
        )
    })
    .0
}

/// Runs `f`, which encodes (postcard) a value whose last field is an envelope, leaving a
/// payload of [`SPLIT_FROM`] bytes or more out of what it writes: that payload (shared, not
/// copied) is returned beside `f`'s result, to be written right after. A frame that carries
/// an envelope is framed so, its payload never copied.
pub fn splitting<R>(f: impl FnOnce() -> R) -> (R, Option<Bytes>) {
    /// Puts back the mode and what was set aside before, on every exit (a panic's too), so
    /// that a split encoding within another leaves the outer one as it was.
    struct Restore(bool, Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SPLITTING.set(self.0);
            SPLIT_OFF.set(self.1.take());
        }
    }
    let _restore = Restore(SPLITTING.replace(true), SPLIT_OFF.take());
    let r = f();
    (r, SPLIT_OFF.take())
}

/// Encodes one envelope as [`encode_envelopes`] does.
///
/// # Errors
/// [`Error::Encode`] when the envelope cannot be encoded.
pub fn encode_envelope(envelope: &Envelope) -> Result<Encoded> {
    // One allocation, the head's (a batch's bookkeeping would cost four more).
    let (head, tail) = splitting(|| crate::encode(envelope));
    Ok(Encoded {
        head: head?,
        tail: tail.unwrap_or_default(),
    })
}

/// Serializes a payload (`#[serde(serialize_with = "split_payload")]`): within
/// [`encode_envelopes`], a payload of [`SPLIT_FROM`] bytes or more as its length alone
/// (postcard's prefix of bytes), the payload set aside; otherwise as bytes.
pub(crate) fn split_payload<S: Serializer>(payload: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    if !SPLITTING.get() {
        return s.serialize_bytes(payload);
    }
    // Set for every envelope, so that what is left aside is always the last one's.
    let split = payload.len() >= SPLIT_FROM;
    SPLIT_OFF.set(split.then(|| payload.clone()));
    if split {
        (payload.len() as u64).serialize(s)
    } else {
        s.serialize_bytes(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentId, Error, MessageKind, Recipient};

    fn envelope(payload: usize) -> Envelope {
        Envelope::new(
            AgentId::from("a"),
            Recipient::Agent(AgentId::from("b")),
            "results".into(),
            MessageKind::Direct,
            Bytes::from(vec![7u8; payload]),
        )
    }

    #[test]
    fn a_large_payload_follows_its_head_uncopied_and_the_two_are_what_postcard_makes() {
        for len in [0, 1, SPLIT_FROM - 1, SPLIT_FROM, 70_000] {
            let e = envelope(len);
            let encoded = encode_envelope(&e).expect("encode");
            let mut whole = BytesMut::new();
            encoded.write_to(&mut whole);
            assert_eq!(whole.as_ref(), crate::encode(&e).expect("encode").as_ref());
            assert_eq!(encoded.len(), whole.len());
            let split = len >= SPLIT_FROM;
            assert_eq!(encoded.tail().is_empty(), !split, "{len}");
            if split {
                assert_eq!(
                    encoded.tail().as_ptr(),
                    e.payload.as_ptr(),
                    "shared, not copied"
                );
            }
            let back = encoded.decode().expect("decode");
            assert_eq!(back, e);
            if split {
                assert_eq!(
                    back.payload.as_ptr(),
                    e.payload.as_ptr(),
                    "decoded uncopied"
                );
            }
            // The split mode ends with the call: a plain encoding is whole again.
            assert_eq!(crate::encode(&e).expect("encode").len(), whole.len());
            // Within another split encoding, it leaves the outer one's payload as it was.
            let outer = envelope(2000);
            let (_, aside) = splitting(|| {
                let head = crate::encode(&outer).expect("encode");
                assert_eq!(encode_envelope(&e).expect("encode"), encoded);
                head
            });
            assert_eq!(aside.map(|b| b.len()), Some(2000));
        }
    }

    #[test]
    fn a_batch_splits_only_its_large_payloads() {
        let es = [envelope(10), envelope(5000), envelope(20)];
        let encoded = encode_envelopes(&es).expect("encode");
        let tails: Vec<usize> = encoded.iter().map(|e| e.tail().len()).collect();
        assert_eq!(tails, [0, 5000, 0]);
        for (e, enc) in es.iter().zip(&encoded) {
            assert_eq!(&enc.decode().expect("decode"), e);
        }
    }

    #[test]
    fn parts_that_are_not_one_envelope_are_malformed_and_the_tail_is_not_kept() {
        let e = envelope(4000);
        let encoded = encode_envelope(&e).expect("encode");
        let short = Encoded {
            head: encoded.head().clone(),
            tail: encoded.tail().slice(1..),
        };
        assert!(matches!(short.decode(), Err(Error::Malformed { .. })));
        assert!(TAIL.with_borrow(Option::is_none));
        // A whole encoding given a tail it does not announce.
        let extra = Encoded {
            head: crate::encode(&envelope(3)).expect("encode"),
            tail: Bytes::from_static(b"xyz"),
        };
        assert!(matches!(extra.decode(), Err(Error::Malformed { .. })));
        assert!(TAIL.with_borrow(Option::is_none));
    }
}
