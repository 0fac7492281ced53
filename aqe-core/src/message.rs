//! The message envelope and its typed payload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{AgentId, ChannelName, Error, MessageId, Priority, Result};

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipient {
    /// One agent.
    Agent(AgentId),
    /// Several named agents.
    Agents(Vec<AgentId>),
    /// Every agent of the fleet listening on the channel.
    Fleet,
}

/// What a message is, which decides how the receiver treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageKind {
    /// A message to one agent.
    Direct,
    /// A message to the fleet.
    Broadcast,
    /// A request that expects one response.
    Request,
    /// The successful answer to a request (`correlation_id` names the request).
    Response,
    /// Data on a stream.
    Stream,
    /// Liveness signal between endpoints.
    Heartbeat,
    /// Membership information.
    Discovery,
    /// Protocol control.
    Control,
    /// The failed answer to a request; the payload is an [`ErrorBody`].
    Error,
}

/// How a payload is encoded, carried in its envelope so that any receiver (a Rust agent
/// decoding its own type, a tool printing JSON) decodes it the way it was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// postcard: compact, for typed Rust values. Not self-describing: decode it into the
    /// sender's type (or one of the same shape).
    #[default]
    Postcard,
    /// JSON text (UTF-8): self-describing; decodes into any matching type, including dynamic
    /// values such as `serde_json::Value`.
    Json,
    /// Bytes as they are: decode into `Bytes` (or `String`, when they are UTF-8).
    Raw,
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoding::Postcard => "postcard",
            Encoding::Json => "JSON",
            Encoding::Raw => "raw",
        })
    }
}

/// A payload with its encoding, for callers that choose it (JSON from a command line, raw
/// bytes); typed Rust values go through [`encode`] (postcard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// How `bytes` is encoded.
    pub encoding: Encoding,
    /// The encoded value.
    pub bytes: Bytes,
}

impl Payload {
    /// `value` in postcard.
    ///
    /// # Errors
    /// [`Error::Encode`] when serde refuses the value.
    pub fn postcard<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Ok(Self {
            encoding: Encoding::Postcard,
            bytes: encode(value)?,
        })
    }

    /// `value` as JSON.
    ///
    /// # Errors
    /// [`Error::Encode`] when serde refuses the value.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        serde_json::to_vec(value)
            .map(|v| Self {
                encoding: Encoding::Json,
                bytes: Bytes::from(v),
            })
            .map_err(|e| Error::Encode {
                what: "JSON payload",
                source: Box::new(e),
            })
    }

    /// JSON text as it is, checked to be JSON.
    ///
    /// # Errors
    /// [`Error::Undecodable`] when `text` is not JSON.
    pub fn json_text(text: impl Into<Bytes>) -> Result<Self> {
        let bytes = text.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
            Error::Undecodable {
                encoding: Encoding::Json,
                into: "JSON",
                source: Box::new(e),
            }
        })?;
        Ok(Self {
            encoding: Encoding::Json,
            bytes,
        })
    }

    /// Bytes as they are.
    pub fn raw(bytes: impl Into<Bytes>) -> Self {
        Self {
            encoding: Encoding::Raw,
            bytes: bytes.into(),
        }
    }
}

/// Decodes `bytes`, encoded as `encoding`, into a `T`.
///
/// # Errors
/// [`Error::Undecodable`], saying why: not a `T`, or (postcard) a type that needs a
/// self-describing encoding.
pub fn decode_as<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T> {
    let into = std::any::type_name::<T>();
    let fail = |source: crate::BoxError| Error::Undecodable {
        encoding,
        into,
        source,
    };
    copying(bytes.len(), || match encoding {
        Encoding::Postcard => match postcard::take_from_bytes::<T>(bytes) {
            Ok((value, [])) => Ok(value),
            Ok(_) => Err(fail("bytes left over after the value".into())),
            Err(postcard::Error::WontImplement) => Err(fail(
                "postcard is not self-describing: decode it into the sender's type (dynamic \
                 values such as JSON values need a JSON payload)"
                    .into(),
            )),
            Err(e) => Err(fail(Box::new(e))),
        },
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| fail(Box::new(e))),
        Encoding::Raw => {
            let de = serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(bytes);
            T::deserialize(de).map_err(|e| fail(Box::new(e)))
        }
    })
}

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        )
    }

    /// As a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

/// A message as it travels: addressing, kind, priority, timing and an opaque payload.
///
/// The payload is bytes so that the envelope can be routed without knowing its type;
/// [`Envelope::decode`] and [`encode`] give typed access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per sender.
    pub id: MessageId,
    /// The sending agent.
    pub from: AgentId,
    /// The receiver(s).
    pub to: Recipient,
    /// The channel it travels on.
    pub channel: ChannelName,
    /// What it is.
    pub kind: MessageKind,
    /// Its priority (the channel's, unless the sender chose otherwise).
    pub priority: Priority,
    /// When it was sent.
    pub timestamp: Timestamp,
    /// For responses and errors: the id of the request answered.
    pub correlation_id: Option<MessageId>,
    /// How long it stays worth delivering; an expired message is dropped and counted.
    pub ttl: Option<Duration>,
    /// Set on a copy sent again after its first transmission went unconfirmed (the
    /// receiver's endpoint went away): the receiving agent, or a previous incarnation of it,
    /// may already have processed this message. Duplicates within one receiving process are
    /// suppressed; across a crash of the receiver they cannot be, and this flag says so.
    pub redelivered: bool,
    /// The W3C trace context of the work it belongs to, when its sender traces: what its
    /// receiver does for it is a span of the same trace. Boxed: most messages are untraced,
    /// and every envelope moves through queues.
    pub trace: Option<Box<crate::TraceParent>>,
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// The encoded content.
    #[serde(
        serialize_with = "crate::encoded::split_payload",
        deserialize_with = "shared_bytes"
    )]
    pub payload: Bytes,
}

impl Envelope {
    /// A new envelope with a fresh id, the current time, the default priority, no TTL and no
    /// correlation.
    pub fn new(
        from: AgentId,
        to: Recipient,
        channel: ChannelName,
        kind: MessageKind,
        payload: Bytes,
    ) -> Self {
        Self {
            id: MessageId::next(),
            from,
            to,
            channel,
            kind,
            priority: Priority::DEFAULT,
            timestamp: Timestamp::now(),
            correlation_id: None,
            ttl: None,
            redelivered: false,
            trace: None,
            encoding: Encoding::Postcard,
            payload,
        }
    }

    /// Carries `payload` in its own encoding.
    pub fn with_payload(mut self, payload: Payload) -> Self {
        self.encoding = payload.encoding;
        self.payload = payload.bytes;
        self
    }

    /// The envelope answering this one, from `responder`, carrying `payload`.
    pub fn reply(&self, responder: AgentId, kind: MessageKind, payload: Bytes) -> Self {
        let mut reply = Envelope::new(
            responder,
            Recipient::Agent(self.from.clone()),
            self.channel.clone(),
            kind,
            payload,
        );
        reply.priority = self.priority;
        reply.correlation_id = Some(self.id);
        reply.trace = self.trace.as_ref().map(|t| Box::new(t.child()));
        reply
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the time to live.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Whether the TTL has run out at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        match self.ttl {
            Some(ttl) => now.0.saturating_sub(self.timestamp.0) > ttl.as_millis() as u64,
            None => false,
        }
    }

    /// The single agent this envelope is for, if it names exactly one.
    pub fn target(&self) -> Option<&AgentId> {
        match &self.to {
            Recipient::Agent(id) => Some(id),
            Recipient::Agents(ids) if ids.len() == 1 => ids.first(),
            _ => None,
        }
    }

    /// Decodes the payload as `T`, in the encoding the envelope says it has: a typed Rust
    /// value (postcard), JSON (into any matching type, `serde_json::Value` included) or raw
    /// bytes (into `Bytes` or a UTF-8 `String`).
    ///
    /// # Errors
    /// [`Error::Undecodable`] when the payload is not a `T`, saying why.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_as(self.encoding, &self.payload)
    }
}

/// The payload of a [`MessageKind::Error`] response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The class of failure.
    pub kind: crate::RemoteErrorKind,
    /// A description for humans.
    pub message: String,
}

/// Encodes a value as a payload (postcard).
///
/// # Errors
/// [`Error::Encode`] when serde refuses the value (for example a sequence of unknown length).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    // Measured first, so the buffer is allocated once rather than grown by doubling.
    postcard::experimental::serialized_size(value)
        .and_then(|size| {
            copying(size, || {
                postcard::serialize_with_flavor(value, Presized(Vec::with_capacity(size)))
            })
        })
        .map(Bytes::from)
        .map_err(|source| Error::Encode {
            what: "payload",
            source: Box::new(source),
        })
}

/// postcard's output into a `Vec` sized beforehand, each run of bytes appended with one copy
/// (postcard's `to_extend` appends bytes one at a time: several times slower on a large
/// payload).
struct Presized(Vec<u8>);

impl postcard::ser_flavors::Flavor for Presized {
    type Output = Vec<u8>;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Decoding a large frame without copying its payload: see [`sharing`].
mod shared {
    use std::cell::RefCell;

    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};

    thread_local! {
        /// The buffer being decoded by [`sharing`] on this thread, if any.
        pub(super) static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    }

    /// The visitor of [`super::shared_bytes`].
    pub(super) struct Payload;

    impl<'de> Visitor<'de> for Payload {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte array")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
            // Whether postcard lends the bytes or not, they lie in the buffer it decodes.
            let shared = SOURCE.with_borrow(|src| {
                src.as_ref().and_then(|src| {
                    let range = src.as_ptr_range();
                    let inside = range.start <= v.as_ptr() && v.as_ptr_range().end <= range.end;
                    (inside && !v.is_empty() && 16 * v.len() >= 15 * src.len())
                        .then(|| src.slice_ref(v))
                })
            });
            Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(v)))
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v.as_bytes()))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(Bytes::from(v))
        }
    }
}

/// Runs `f`, which decodes (postcard) from `source` or a part of it, so that bytes decoded
/// with [`shared_bytes`] (an envelope's payload) that are nearly all of `source` (15/16 or
/// more) are a slice of it rather than a copy. A 16 MiB message is then copied once less on
/// arrival, and is held once, not twice, while it is copied. Smaller parts of `source` are
/// copied, so that what is held stays within 1/15 of what is counted: a payload never keeps
/// a much larger buffer alive.
pub fn sharing<R>(source: &Bytes, f: impl FnOnce() -> R) -> R {
    /// Puts back what was there, on every exit (a panic too: the buffer is not kept).
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            shared::SOURCE.set(self.0.take());
        }
    }
    let _restore = Restore(shared::SOURCE.replace(Some(source.clone())));
    f()
}

/// Deserializes bytes (`#[serde(deserialize_with = "shared_bytes")]`): within [`sharing`],
/// as a slice of its source when they are nearly all of it; otherwise copied, as `Bytes`
/// itself deserializes.
///
/// # Errors
/// The deserializer's, for anything that is not bytes.
pub fn shared_bytes<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Bytes, D::Error> {
    use serde::de::Error as _;
    // Decoding the head of an [`Encoded`](crate::Encoded): the bytes are the part after it.
    if crate::encoded::TAIL.with_borrow(Option::is_some) {
        let len = <u64 as Deserialize>::deserialize(d)?;
        let tail = crate::encoded::TAIL.take().unwrap_or_default();
        if tail.len() as u64 != len {
            return Err(D::Error::invalid_length(
                tail.len(),
                &"the payload length its head announces",
            ));
        }
        return Ok(tail);
    }
    d.deserialize_bytes(shared::Payload)
}

/// From this many bytes, encoding or decoding a message is a blocking section.
pub const BLOCKING_COPY: usize = 1 << 20;

/// Runs `f`, which copies about `bytes` bytes, without holding up other tasks: from
/// [`BLOCKING_COPY`] bytes on a multi-threaded runtime, as a blocking section
/// ([`tokio::task::block_in_place`]: the worker's queued tasks move to another thread).
/// Copying megabytes takes milliseconds, and the tasks queued behind it, a higher-priority
/// message's among them, would wait that long.
pub fn copying<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let threaded = || {
        tokio::runtime::Handle::try_current().is_ok_and(|h| {
            matches!(
                h.runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread
            )
        })
    };
    if bytes >= BLOCKING_COPY && threaded() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Encodes each value (postcard) into buffers shared by consecutive payloads, up to 64 KiB
/// each: a batch of small payloads costs an allocation per 64 KiB instead of one per value,
/// and a payload kept long keeps at most its 64 KiB neighbourhood alive.
///
/// # Errors
/// [`Error::Encode`] when a value cannot be encoded.
pub fn encode_each<T: Serialize>(values: &[T]) -> Result<Vec<Bytes>> {
    pack(values, || (), |b, ()| b)
}

/// Encodes each value as [`encode_each`] says, and makes an item of each encoding with what
/// `aside` returned right after that value was written (what its serialization set aside).
pub(crate) fn pack<T: Serialize, X, I>(
    values: &[T],
    mut aside: impl FnMut() -> X,
    mut make: impl FnMut(Bytes, X) -> I,
) -> Result<Vec<I>> {
    const SHARED: usize = 64 * 1024;
    let fail = |source: postcard::Error| Error::Encode {
        what: "payload",
        source: Box::new(source),
    };
    let sizes = values
        .iter()
        .map(postcard::experimental::serialized_size)
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(fail)?;
    let mut out = Vec::with_capacity(values.len());
    // What the values of one buffer set aside (no allocation when that is nothing, `()`).
    let mut set_aside = Vec::with_capacity(values.len());
    let mut i = 0;
    while i < values.len() {
        // The values that share the next buffer (at least one).
        let mut end = i + 1;
        let mut total = sizes[i];
        while end < values.len() && total + sizes[end] <= SHARED {
            total += sizes[end];
            end += 1;
        }
        let mut buf = vec![0u8; total];
        let mut at = 0;
        for (v, size) in values[i..end].iter().zip(&sizes[i..end]) {
            postcard::to_slice(v, &mut buf[at..at + size]).map_err(fail)?;
            set_aside.push(aside());
            at += size;
        }
        let shared = Bytes::from(buf);
        let mut at = 0;
        for (size, x) in sizes[i..end].iter().zip(set_aside.drain(..)) {
            out.push(make(shared.slice(at..at + size), x));
            at += size;
        }
        i = end;
    }
    Ok(out)
}

/// Decodes a payload (postcard) as `T`; trailing bytes are an error.
///
/// # Errors
/// [`Error::Malformed`] when the bytes are not exactly one `T`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match copying(bytes.len(), || postcard::take_from_bytes::<T>(bytes)) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(Error::Malformed {
            what: "payload",
            source: "bytes after the value".into(),
        }),
        Err(source) => Err(Error::Malformed {
            what: "payload",
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `payload` lies inside `source`'s bytes.
    fn within(payload: &Bytes, source: &Bytes) -> bool {
        let r = source.as_ptr_range();
        r.start <= payload.as_ptr() && payload.as_ptr_range().end <= r.end
    }

    #[test]
    fn a_payload_that_is_most_of_its_source_is_shared_and_a_small_one_copied() {
        let envelope = |len: usize| {
            let mut e = Envelope::new(
                "a".into(),
                crate::Recipient::Agent("b".into()),
                "c".into(),
                MessageKind::Direct,
                Bytes::from(vec![7u8; len]),
            );
            e.timestamp = Timestamp(1);
            e.id = crate::MessageId(1);
            e
        };
        let big = encode(&envelope(100_000)).expect("encode");
        let e: Envelope = sharing(&big, || decode(&big)).expect("decode");
        assert_eq!(e, envelope(100_000));
        assert!(within(&e.payload, &big), "the payload was copied");
        // The same bytes outside `sharing`: copied.
        let e: Envelope = decode(&big).expect("decode");
        assert!(!within(&e.payload, &big));
        // A small payload in a large buffer is copied: it must not keep the buffer alive.
        let small = encode(&envelope(10)).expect("encode");
        let mut padded = small.to_vec();
        padded.extend(std::iter::repeat_n(0u8, 1000));
        let padded = Bytes::from(padded);
        let e: Envelope = sharing(&padded, || decode(&padded[..small.len()])).expect("decode");
        assert_eq!(e, envelope(10));
        assert!(!within(&e.payload, &padded));
        // Bytes from elsewhere are copied, whatever the source.
        let e: Envelope = sharing(&padded, || decode(&big)).expect("decode");
        assert!(!within(&e.payload, &big));
        // The source is let go after `sharing`, after a panic too.
        let before = big.clone();
        let _ = std::panic::catch_unwind(|| sharing(&before, || panic!("in the decoder")));
        assert!(shared::SOURCE.with_borrow(Option::is_none));
    }

    /// Whether another task of a one-worker runtime runs while `copying(bytes, ..)` is busy.
    fn others_run_while_copying(bytes: usize) -> bool {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::spawn(async move {
                let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let other = tokio::spawn({
                    let ran = ran.clone();
                    async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) }
                });
                let seen = copying(bytes, || {
                    let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
                    while std::time::Instant::now() < until {
                        if ran.load(std::sync::atomic::Ordering::SeqCst) {
                            return true;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    false
                });
                other.await.expect("other task");
                seen
            })
            .await
            .expect("task")
        })
    }

    #[test]
    fn a_large_copy_lets_the_workers_other_tasks_run_and_a_small_one_runs_in_place() {
        assert!(others_run_while_copying(BLOCKING_COPY));
        assert!(!others_run_while_copying(BLOCKING_COPY - 1));
        // On a current-thread runtime it runs in place (block_in_place would panic there).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(async { copying(BLOCKING_COPY, || 7) }), 7);
    }

    #[test]
    fn a_payload_is_encoded_exactly_as_postcard_encodes_it() {
        let values: (String, Bytes, Vec<u32>, u64) = (
            "é".repeat(300),
            Bytes::from(vec![5u8; 70_000]),
            vec![1, 300, 70_000],
            u64::MAX,
        );
        let ours = encode(&values).expect("encode");
        assert_eq!(
            ours.as_ref(),
            postcard::to_stdvec(&values).expect("postcard")
        );
        assert_eq!(
            decode::<(String, Bytes, Vec<u32>, u64)>(&ours).expect("decode"),
            values
        );
    }

    #[test]
    fn payloads_encoded_together_decode_alone_and_share_buffers_up_to_64_kib() {
        let values: Vec<Vec<u8>> = (0..600u32)
            .map(|i| vec![i as u8; (i % 7) as usize * 100])
            .collect();
        let encoded = encode_each(&values).expect("encode");
        assert_eq!(encoded.len(), values.len());
        for (v, b) in values.iter().zip(&encoded) {
            assert_eq!(&decode::<Vec<u8>>(b).expect("decode"), v);
            assert_eq!(
                b,
                &encode(v).expect("alone"),
                "the same bytes as one at a time"
            );
        }
        let shares = |a: &Bytes, b: &Bytes| a.as_ptr().wrapping_add(a.len()) == b.as_ptr();
        assert!(
            shares(&encoded[1], &encoded[2]),
            "neighbours share a buffer"
        );
        let buffers = 1 + encoded.windows(2).filter(|w| !shares(&w[0], &w[1])).count();
        let total: usize = encoded.iter().map(Bytes::len).sum();
        assert!(
            total > 128 * 1024 && buffers <= total / (60 * 1024) + 1,
            "{buffers} buffers for {total} bytes"
        );
        let big = vec![vec![1u8; 100_000], vec![2u8; 10]];
        let encoded = encode_each(&big).expect("a value larger than a buffer");
        assert_eq!(decode::<Vec<u8>>(&encoded[0]).expect("decode"), big[0]);
        assert!(encode_each::<u8>(&[]).expect("none").is_empty());
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Task {
        name: String,
        weight: u32,
    }

    #[test]
    fn each_encoding_decodes_as_it_was_written() {
        let json = Payload::json_text(r#"{"name":"build","weight":3}"#).expect("JSON");
        let env = Envelope::new(
            "cli".into(),
            Recipient::Agent("worker".into()),
            "coordination".into(),
            MessageKind::Direct,
            Bytes::new(),
        )
        .with_payload(json);
        assert_eq!(env.encoding, Encoding::Json);
        // A Rust handler decodes its own struct from JSON...
        assert_eq!(
            env.decode::<Task>().expect("struct"),
            Task {
                name: "build".into(),
                weight: 3
            }
        );
        // ...and a tool decodes a dynamic value.
        let v: serde_json::Value = env.decode().expect("value");
        assert_eq!(v["weight"], 3);

        // postcard into a dynamic value: refused, saying why.
        let typed = env.clone().with_payload(
            Payload::postcard(&Task {
                name: "x".into(),
                weight: 1,
            })
            .expect("encode"),
        );
        let err = typed
            .decode::<serde_json::Value>()
            .expect_err("not self-describing");
        assert!(matches!(
            err,
            Error::Undecodable {
                encoding: Encoding::Postcard,
                ..
            }
        ));
        assert!(err.to_string().contains("not self-describing"), "{err}");
        assert_eq!(typed.decode::<Task>().expect("typed").weight, 1);

        // Raw bytes: as bytes, or as text when UTF-8.
        let raw = env.with_payload(Payload::raw(Bytes::from_static(b"hello")));
        assert_eq!(
            raw.decode::<Bytes>().expect("bytes"),
            Bytes::from_static(b"hello")
        );
        assert_eq!(raw.decode::<String>().expect("text"), "hello");
        assert!(matches!(
            raw.decode::<Task>(),
            Err(Error::Undecodable {
                encoding: Encoding::Raw,
                ..
            })
        ));
        assert!(Payload::json_text("{not json").is_err());
    }

    #[test]
    fn payload_round_trips_and_rejects_other_types() {
        let t = Task {
            name: "lint".into(),
            weight: 3,
        };
        let env = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "coordination".into(),
            MessageKind::Direct,
            encode(&t).expect("encode"),
        );
        assert_eq!(env.decode::<Task>().expect("decode"), t);
        assert!(matches!(
            env.decode::<(u64, u64, u64)>(),
            Err(Error::Undecodable { .. })
        ));
    }

    #[test]
    fn ttl_expiry() {
        let mut env = Envelope::new(
            "a".into(),
            Recipient::Fleet,
            "m".into(),
            MessageKind::Broadcast,
            Bytes::new(),
        )
        .with_ttl(Duration::from_millis(100));
        env.timestamp = Timestamp(1_000);
        assert!(!env.is_expired(Timestamp(1_100)));
        assert!(env.is_expired(Timestamp(1_101)));
    }

    #[test]
    fn reply_is_correlated() {
        let req = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "c".into(),
            MessageKind::Request,
            Bytes::new(),
        );
        let rsp = req.reply("b".into(), MessageKind::Response, Bytes::from_static(b"x"));
        assert_eq!(rsp.correlation_id, Some(req.id));
        assert_eq!(rsp.to, Recipient::Agent("a".into()));
        assert_eq!(rsp.target(), Some(&AgentId::from("a")));
    }
}
#[cfg(test)]
mod sizes {
    /// Every message moves through several queues by value: a field that grows these is a
    /// cost per message (the hot-path profile's largest item is memory moves).
    #[test]
    fn what_moves_per_message_stays_small() {
        assert!(std::mem::size_of::<crate::Envelope>() <= 152);
        assert!(std::mem::size_of::<crate::Receipt>() <= 40);
        assert!(std::mem::size_of::<crate::transport::Inbound>() <= 192);
    }
}
