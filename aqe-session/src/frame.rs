//! What sessions say to each other: the hello, then [`Frame`]s. These are values; each wire
//! carries them in its own versioned envelope (a QUIC stream frame, a NATS message) and
//! PROTOCOL.md gives their exact encoding (postcard).

use std::net::SocketAddr;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use aqe_core::{AgentId, ChannelName, Encoded, Envelope, MessageId, Priority, Registration};

use crate::EndpointId;

/// The version of the session protocol, carried in every hello.
pub const SESSION_VERSION: u8 = 7;

/// Inclusive ranges of sequence numbers, `(first, last)`, ascending.
pub type Ranges = Vec<(u64, u64)>;

/// The first thing each side says: who it is, what it proves, and what the other side must
/// respect. Small, so that a peer not yet authenticated makes the receiver hold little.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`SESSION_VERSION`].
    pub version: u8,
    /// The sender.
    pub endpoint: EndpointId,
    /// Chosen by the side that opened the link, echoed by the other: with the opener's
    /// endpoint it ranks two links of one pair of endpoints (the smaller is kept).
    pub nonce: u64,
    /// Where the sender accepts links, if it does (QUIC: its listen port; the receiver
    /// takes the IP the link comes from).
    pub listen: Option<SocketAddr>,
    /// The shared token, when token authentication is on.
    pub token: Option<String>,
    /// Unsettled reliable messages the sender accepts per receiving agent of its own.
    pub window: u32,
    /// Unsettled reliable payload bytes the sender accepts from this session, all agents
    /// together (a single message may exceed it when nothing else is unsettled).
    pub session_bytes: u64,
    /// How often the sender sends a heartbeat, in milliseconds.
    pub heartbeat_ms: u32,
    /// After how many milliseconds of silence the sender declares the peer gone: the peer
    /// must send something at least every third of it.
    pub liveness_ms: u32,
}

/// Why a reliable message, or a request, was not taken: sent back instead of an
/// acknowledgement (or an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// The receiving agent is not hosted by the receiver, or lacks the channel.
    NotHere,
    /// The receiving agent stopped with it still queued; for a request, it was dropped
    /// unanswered.
    Stopped,
    /// The sending agent is not one the sender registered in its membership.
    NotRegistered,
    /// The sender ignored a limit the receiver announced (the window, the session's bytes),
    /// or the receiver holds all it may; for a request, too many requests are in hand.
    Overflow,
    /// Its time-to-live ran out before the receiving agent took it: dropped unread.
    Expired,
    /// The receiving agent's inbox was full and the channel's slow-consumer policy dropped
    /// it unread.
    Dropped,
}

/// What an endpoint knows first-hand about another endpoint it has a session with (peer
/// exchange); never relayed further.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Relayed {
    /// What it hosts now: where it listens (with the IP its link comes from) and its
    /// agents. Sent again, whole, whenever they change.
    Endpoint {
        /// The endpoint told of.
        endpoint: EndpointId,
        /// Where it listens.
        listen: SocketAddr,
        /// Grows with every change the sender saw: a receiver ignores older news.
        generation: u64,
        /// Its agents.
        agents: Vec<Registration>,
    },
    /// The sender's session with it ended.
    Gone {
        /// The endpoint told of.
        endpoint: EndpointId,
    },
}

/// Everything a session sends after its hello. Variant numbers are the postcard enum
/// indices, in this order (PROTOCOL.md lists them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Part `part` of `parts` of the sender's membership at `generation`; applied when every
    /// part of that generation arrived.
    Snapshot {
        /// The sender's membership generation.
        generation: u64,
        /// This part's number, from 0.
        part: u16,
        /// How many parts (1 to 256).
        parts: u16,
        /// Some of its agents.
        agents: Vec<Registration>,
    },
    /// An agent started at the sender, making its membership `generation`.
    Joined {
        /// The generation it makes.
        generation: u64,
        /// The agent.
        agent: Registration,
    },
    /// An agent stopped at the sender, making its membership `generation`.
    Left {
        /// The generation it makes.
        generation: u64,
        /// The agent.
        agent: AgentId,
    },
    /// The receiver missed part of the sender's membership: it asks for a snapshot.
    SnapshotRequest,
    /// Peer exchange.
    Relay(Relayed),
    /// A heartbeat, answered with a [`Frame::Pong`] of the same nonce: it also says the
    /// sender's membership generation (a receiver behind asks for a snapshot) and the
    /// oldest sequence number it has not settled (below it, the receiver forgets).
    Ping {
        /// Echoed in the pong.
        nonce: u64,
        /// The sender's membership generation.
        generation: u64,
        /// The sender's oldest unsettled sequence number (its next one when none).
        low: u64,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// A reliable message.
    Message {
        /// The sender's number for it in this session, from 1.
        seq: u64,
        /// On an ordered channel, the number of the previous message of the same sender,
        /// receiver and channel in this session (0 when none): it is delivered first.
        after: u64,
        /// The sender's oldest unsettled sequence number.
        low: u64,
        /// The sender's membership generation when it sent it: if its agent is unknown to
        /// the receiver at an older generation, the announcement is still on its way.
        generation: u64,
        /// The sender waits for its confirmation: acknowledge it without delay.
        confirm: bool,
        /// The message.
        envelope: Envelope,
    },
    /// Acknowledgements, as ranges of the receiver's view of the sender's numbers.
    Acks {
        /// Received (held or delivered): the sender need not send them again. Empty on
        /// wires that never lose a frame.
        received: Ranges,
        /// Taken by their agents: settled.
        taken: Ranges,
    },
    /// These reliable messages will never be taken, for this reason: settled.
    Refused {
        /// The messages.
        seqs: Ranges,
        /// Why.
        reason: Refusal,
    },
    /// An unreliable message: at most once, never acknowledged.
    Datagram {
        /// As in [`Frame::Message`].
        generation: u64,
        /// The message.
        envelope: Envelope,
    },
    /// A request (kind Request).
    Request {
        /// As in [`Frame::Message`].
        generation: u64,
        /// The request.
        envelope: Envelope,
    },
    /// The requester gave up on this request.
    Cancel {
        /// The request's id.
        id: MessageId,
    },
    /// The answer to a request (kind Response, or Error with an `ErrorBody`), matched by its
    /// `correlation_id`.
    Response {
        /// The answer.
        envelope: Envelope,
    },
    /// The request was not run, or not answered, for this reason.
    NoAnswer {
        /// The request's id.
        id: MessageId,
        /// Why: `NotHere`, `NotRegistered`, `Overflow` (busy: nothing ran), `Stopped` (dropped
        /// unanswered).
        reason: Refusal,
    },
    /// Reliable messages that are copies of one envelope (a broadcast's) to agents of the
    /// receiver: the envelope travels once, each copy is numbered as a [`Frame::Message`]
    /// of its own. The receiver takes it as one `Message` per copy, in order, each with the
    /// envelope addressed to the copy's agent (the envelope's own `to` is not read).
    Fanout {
        /// As in [`Frame::Message`], for every copy.
        low: u64,
        /// As in [`Frame::Message`], for every copy.
        generation: u64,
        /// As in [`Frame::Message`], for every copy.
        confirm: bool,
        /// The copies, 1 to [`MAX_FANOUT`].
        copies: Vec<FanoutCopy>,
        /// The message; the sender says `to: Fleet`.
        envelope: Envelope,
    },
}

/// The most copies a [`Frame::Fanout`] carries; more is a protocol violation.
pub const MAX_FANOUT: usize = 1024;

/// The most bytes a sender lets a [`Frame::Fanout`]'s copies take (encoded), so that the
/// frame fits every limit its envelope alone would (the room each wire leaves for an
/// envelope's fields besides its payload).
pub const FANOUT_COPY_BYTES: usize = 2048;

/// One copy of a [`Frame::Fanout`]: its numbers, and its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutCopy {
    /// As in [`Frame::Message`].
    pub seq: u64,
    /// As in [`Frame::Message`].
    pub after: u64,
    /// The receiving agent.
    pub to: AgentId,
}

impl FanoutCopy {
    /// How many bytes its postcard encoding takes.
    pub fn encoded_len(&self) -> usize {
        /// A varint's length.
        fn varint(n: u64) -> usize {
            (64 - n.leading_zeros() as usize).max(1).div_ceil(7)
        }
        let len = self.to.as_str().len();
        varint(self.seq) + varint(self.after) + varint(len as u64) + len
    }
}

/// The postcard index of [`Frame::Message`], written before its header fields.
const MESSAGE_VARIANT: u8 = 7;
/// The postcard index of [`Frame::Fanout`], written before its header fields.
const FANOUT_VARIANT: u8 = 15;

/// Which of its peer's lanes a frame travels on. A wire keeps the frames of one lane in
/// order (QUIC: a stream each; NATS: one subject keeps everything in order); frames of
/// different lanes may overtake each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Membership, peer exchange, heartbeats, acknowledgements and refusals.
    Control,
    /// The messages of one ordered reliable channel.
    Ordered(ChannelName),
    /// The messages of unordered reliable channels.
    Unordered,
    /// Unreliable messages.
    Datagram,
    /// Requests and cancellations, from requester to responder.
    Requests,
    /// Answers, from responder to requester.
    Answers,
}

/// The fields of a [`Frame::Message`] before its envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    /// See [`Frame::Message`].
    pub seq: u64,
    /// See [`Frame::Message`].
    pub after: u64,
    /// See [`Frame::Message`].
    pub low: u64,
    /// See [`Frame::Message`].
    pub generation: u64,
    /// See [`Frame::Message`].
    pub confirm: bool,
}

impl MessageHeader {
    /// Appends what comes before the envelope in a [`Frame::Message`]'s postcard encoding:
    /// the variant index, the numbers, the confirm flag. The envelope's encoding follows.
    ///
    /// # Errors
    /// Never in practice (varints always fit); typed for the encoder's sake.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), postcard::Error> {
        let numbers = [self.seq, self.after, self.low, self.generation];
        put_head(dst, MESSAGE_VARIANT, &numbers, self.confirm)
    }
}

/// Appends a reliable frame's first fields as postcard writes them: the variant index, the
/// numbers (varints), the confirm flag.
fn put_head(
    dst: &mut BytesMut,
    variant: u8,
    numbers: &[u64],
    confirm: bool,
) -> Result<(), postcard::Error> {
    dst.extend_from_slice(&[variant]);
    for n in numbers {
        let mut buf = [0u8; 10];
        dst.extend_from_slice(postcard::to_slice(n, &mut buf)?);
    }
    dst.extend_from_slice(&[u8::from(confirm)]);
    Ok(())
}

/// Something to send, and on which lane.
#[derive(Debug, Clone)]
pub enum Transmit {
    /// A frame.
    Frame(Lane, Frame),
    /// A reliable message, its envelope encoded once when it was accepted: sent again, it is
    /// only framed again.
    Message {
        /// Its lane.
        lane: Lane,
        /// Its numbers.
        header: MessageHeader,
        /// Its envelope's priority (not on the wire in the header: the envelope holds it).
        priority: Priority,
        /// The envelope's postcard encoding.
        body: Encoded,
    },
    /// Reliable messages that are copies of one envelope, framed as a [`Frame::Fanout`]:
    /// the envelope's encoding (`to: Fleet`) is shared by every copy and every session.
    Fanout {
        /// Its lane.
        lane: Lane,
        /// See [`Frame::Fanout`].
        low: u64,
        /// See [`Frame::Fanout`].
        generation: u64,
        /// See [`Frame::Fanout`].
        confirm: bool,
        /// See [`Frame::Fanout`].
        copies: Vec<FanoutCopy>,
        /// What `copies` take encoded (within [`FANOUT_COPY_BYTES`] once joined).
        copy_bytes: usize,
        /// Its envelope's priority.
        priority: Priority,
        /// The envelope's postcard encoding.
        body: Encoded,
    },
}

impl Transmit {
    /// The lane it goes on.
    pub fn lane(&self) -> &Lane {
        match self {
            Transmit::Frame(lane, _)
            | Transmit::Message { lane, .. }
            | Transmit::Fanout { lane, .. } => lane,
        }
    }

    /// Its priority: a message's (a request's, an answer's, a datagram's) envelope's; other
    /// frames (cancellations, and everything of the control lane) the highest.
    pub fn priority(&self) -> Priority {
        match self {
            Transmit::Message { priority, .. } | Transmit::Fanout { priority, .. } => *priority,
            Transmit::Frame(
                _,
                Frame::Datagram { envelope, .. }
                | Frame::Request { envelope, .. }
                | Frame::Response { envelope },
            ) => envelope.priority,
            Transmit::Frame(..) => Priority::MAX,
        }
    }

    /// How many bytes its encoding takes, about (to size buffers and batches).
    pub fn size_hint(&self) -> usize {
        match self {
            Transmit::Frame(_, Frame::Datagram { envelope, .. })
            | Transmit::Frame(_, Frame::Request { envelope, .. })
            | Transmit::Frame(_, Frame::Response { envelope }) => envelope.payload.len() + 64,
            Transmit::Frame(..) => 64,
            Transmit::Message { body, .. } => body.len() + 24,
            Transmit::Fanout {
                body, copy_bytes, ..
            } => body.len() + 32 + copy_bytes,
        }
    }

    /// A fanout of one copy, which adjacent copies of the same encoding may
    /// [`join`](Transmit::join).
    pub fn fanout(
        lane: Lane,
        header: MessageHeader,
        to: AgentId,
        priority: Priority,
        body: Encoded,
    ) -> Transmit {
        let copy = FanoutCopy {
            seq: header.seq,
            after: header.after,
            to,
        };
        Transmit::Fanout {
            lane,
            low: header.low,
            generation: header.generation,
            confirm: header.confirm,
            copy_bytes: copy.encoded_len(),
            copies: vec![copy],
            priority,
            body,
        }
    }

    /// A reliable message's envelope encoding (a [`Transmit::Message`]'s or a
    /// [`Transmit::Fanout`]'s): its frame is [`Transmit::encode_head`] then this.
    pub fn body(&self) -> Option<&Encoded> {
        match self {
            Transmit::Message { body, .. } | Transmit::Fanout { body, .. } => Some(body),
            Transmit::Frame(..) => None,
        }
    }

    /// Appends what comes before the envelope in the frame of a transmit with a
    /// [`body`](Transmit::body) (nothing for the others).
    ///
    /// # Errors
    /// When postcard refuses a value (an agent id longer than postcard allows).
    pub fn encode_head(&self, dst: &mut BytesMut) -> Result<(), postcard::Error> {
        match self {
            Transmit::Message { header, .. } => header.encode(dst),
            Transmit::Fanout {
                low,
                generation,
                confirm,
                copies,
                ..
            } => {
                put_head(dst, FANOUT_VARIANT, &[*low, *generation], *confirm)?;
                encode_into(copies, dst)
            }
            Transmit::Frame(..) => Ok(()),
        }
    }

    /// About how many bytes [`Transmit::encode_head`] writes, at most for numbers.
    pub fn head_hint(&self) -> usize {
        match self {
            Transmit::Message { .. } => 1 + 4 * 10 + 1,
            Transmit::Fanout { copy_bytes, .. } => 1 + 2 * 10 + 1 + 5 + copy_bytes,
            Transmit::Frame(..) => 0,
        }
    }

    /// Takes the copy `t` into this fanout when both are copies of one envelope (the same
    /// shared encoding) bound for the same lane with the same flags, and there is room:
    /// the two travel as one frame. `t` comes back when it cannot join.
    pub fn join(&mut self, t: Transmit) -> Option<Transmit> {
        let (
            Transmit::Fanout {
                lane,
                low,
                generation,
                confirm,
                copies,
                copy_bytes,
                priority,
                body,
            },
            Transmit::Fanout {
                lane: lane2,
                low: low2,
                generation: generation2,
                confirm: confirm2,
                copies: copies2,
                copy_bytes: copy_bytes2,
                priority: priority2,
                body: body2,
            },
        ) = (&mut *self, &t)
        else {
            return Some(t);
        };
        let same = body.same_bytes(body2)
            && generation == generation2
            && confirm == confirm2
            && priority == priority2
            && lane == lane2
            && copies.len() + copies2.len() <= MAX_FANOUT
            && *copy_bytes + copy_bytes2 <= FANOUT_COPY_BYTES;
        if !same {
            return Some(t);
        }
        *low = (*low).min(*low2);
        *copy_bytes += copy_bytes2;
        if let Transmit::Fanout { copies: more, .. } = t {
            copies.extend(more);
        }
        None
    }

    /// Appends the postcard encoding of the frame (exactly what `postcard` makes of the
    /// [`Frame`] it stands for) to `dst`.
    ///
    /// # Errors
    /// When the frame cannot be encoded (a registration with a map postcard refuses).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), postcard::Error> {
        match self {
            Transmit::Frame(_, frame) => encode_into(frame, dst),
            Transmit::Message { body, .. } | Transmit::Fanout { body, .. } => {
                self.encode_head(dst)?;
                body.write_to(dst);
                Ok(())
            }
        }
    }
}

/// Appends the postcard encoding of `value` to `dst`, measured first so that `dst` grows
/// once.
///
/// # Errors
/// When postcard refuses the value.
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    dst: &mut BytesMut,
) -> Result<(), postcard::Error> {
    let size = postcard::experimental::serialized_size(value)?;
    let start = dst.len();
    dst.resize(start + size, 0);
    let written = postcard::to_slice(value, &mut dst[start..])?.len();
    dst.truncate(start + written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};

    #[test]
    fn a_message_framed_from_its_header_and_body_is_the_frame_postcard_makes() {
        // A small payload inside the body, a large one a part of its own.
        for (payload, seq, after, low, generation, confirm) in [
            (2, 1, 0, 1, 0, false),
            (2, 300, 299, 128, 7, true),
            (2, u64::MAX, 1, 2, u64::MAX, false),
            (5000, 9, 8, 3, 1, true),
        ] {
            let envelope = Envelope::new(
                "a".into(),
                Recipient::Agent("b".into()),
                "coordination".into(),
                MessageKind::Direct,
                bytes::Bytes::from(vec![7u8; payload]),
            );
            let body = aqe_core::encode_envelope(&envelope).expect("encode");
            assert_eq!(body.tail().is_empty(), payload < aqe_core::SPLIT_FROM);
            let header = MessageHeader {
                seq,
                after,
                low,
                generation,
                confirm,
            };
            let mut ours = BytesMut::new();
            Transmit::Message {
                lane: Lane::Unordered,
                header,
                priority: Priority::DEFAULT,
                body: body.clone(),
            }
            .encode(&mut ours)
            .expect("encode");
            let frame = Frame::Message {
                seq,
                after,
                low,
                generation,
                confirm,
                envelope: envelope.clone(),
            };
            let theirs = postcard::to_stdvec(&frame).expect("postcard");
            assert_eq!(&ours[..], &theirs[..], "seq {seq}");
            assert_eq!(postcard::from_bytes::<Frame>(&ours).expect("decode"), frame);
        }
    }

    #[test]
    fn a_fanout_framed_from_its_parts_is_the_frame_postcard_makes_and_joins_its_own_copies() {
        for payload in [2, 5000] {
            let envelope = Envelope::new(
                "a".into(),
                Recipient::Fleet,
                "news".into(),
                MessageKind::Broadcast,
                bytes::Bytes::from(vec![7u8; payload]),
            );
            let body = aqe_core::encode_envelope(&envelope).expect("encode");
            let copy = |seq: u64, to: &str| {
                let header = MessageHeader {
                    seq,
                    after: seq.saturating_sub(7),
                    low: seq,
                    generation: 4,
                    confirm: false,
                };
                let lane = Lane::Ordered("news".into());
                Transmit::fanout(lane, header, to.into(), Priority::DEFAULT, body.clone())
            };
            let mut t = copy(9, "b1");
            assert!(t.join(copy(10, "b2")).is_none());
            assert!(t.join(copy(300, "b3")).is_none());
            // Another envelope's encoding, even an equal one, is another frame.
            let mut twin = copy(301, "b4");
            if let Transmit::Fanout { body, .. } = &mut twin {
                *body = aqe_core::encode_envelope(&envelope).expect("encode");
            }
            assert!(t.join(twin).is_some());
            // So is a single message.
            let single = Transmit::Message {
                lane: Lane::Ordered("news".into()),
                header: MessageHeader {
                    seq: 302,
                    after: 0,
                    low: 9,
                    generation: 4,
                    confirm: false,
                },
                priority: Priority::DEFAULT,
                body: body.clone(),
            };
            assert!(t.join(single).is_some());
            let mut ours = BytesMut::new();
            t.encode(&mut ours).expect("encode");
            let frame = Frame::Fanout {
                low: 9,
                generation: 4,
                confirm: false,
                copies: [(9, 2, "b1"), (10, 3, "b2"), (300, 293, "b3")]
                    .map(|(seq, after, to)| FanoutCopy {
                        seq,
                        after,
                        to: to.into(),
                    })
                    .to_vec(),
                envelope,
            };
            assert_eq!(
                &ours[..],
                &postcard::to_stdvec(&frame).expect("postcard")[..]
            );
            assert_eq!(postcard::from_bytes::<Frame>(&ours).expect("decode"), frame);
            // The head hint holds what the head takes.
            let mut head = BytesMut::new();
            t.encode_head(&mut head).expect("encode");
            assert!(head.len() <= t.head_hint());
        }
    }

    #[test]
    fn a_fanout_joins_up_to_its_limit() {
        let e = Envelope::new(
            "a".into(),
            Recipient::Fleet,
            "news".into(),
            MessageKind::Broadcast,
            bytes::Bytes::new(),
        );
        let body = aqe_core::encode_envelope(&e).expect("encode");
        let copy = |seq: u64, to: &str| {
            let header = MessageHeader {
                seq,
                after: 0,
                low: 1,
                generation: 0,
                confirm: false,
            };
            Transmit::fanout(
                Lane::Unordered,
                header,
                to.into(),
                Priority::DEFAULT,
                body.clone(),
            )
        };
        let copies = |t: &Transmit| match t {
            Transmit::Fanout { copies, .. } => copies.len(),
            _ => 0,
        };
        // Copies join while their encoding stays within the budget, whatever their names.
        for name in ["b", &"n".repeat(200)] {
            let mut t = copy(1, name);
            let mut seq = 1;
            while t.join(copy(seq + 1, name)).is_none() {
                seq += 1;
            }
            let mut head = BytesMut::new();
            t.encode_head(&mut head).expect("encode");
            let Transmit::Fanout { copies: all, .. } = &t else {
                unreachable!("a fanout")
            };
            let bytes: usize = all.iter().map(FanoutCopy::encoded_len).sum();
            assert!(bytes <= FANOUT_COPY_BYTES, "{bytes}");
            assert!(bytes + all[0].encoded_len() > FANOUT_COPY_BYTES, "{bytes}");
            assert!(head.len() <= FANOUT_COPY_BYTES + 32, "{}", head.len());
        }
        // Nor beyond the count a receiver takes, had the bytes room.
        let mut t = copy(1, "b");
        if let Transmit::Fanout {
            copies, copy_bytes, ..
        } = &mut t
        {
            copies.resize(MAX_FANOUT, copies[0].clone());
            *copy_bytes = 0;
        }
        assert!(t.join(copy(2, "b")).is_some());
        assert_eq!(copies(&t), MAX_FANOUT);
    }

    #[test]
    fn a_copys_encoded_length_is_what_postcard_writes() {
        for (seq, after, to) in [(1, 0, ""), (127, 128, "b"), (u64::MAX, 1 << 40, "agent-7")] {
            let c = FanoutCopy {
                seq,
                after,
                to: to.into(),
            };
            assert_eq!(
                c.encoded_len(),
                postcard::to_stdvec(&c).expect("encode").len()
            );
        }
        let long = FanoutCopy {
            seq: 1,
            after: 0,
            to: "x".repeat(300).into(),
        };
        assert_eq!(
            long.encoded_len(),
            postcard::to_stdvec(&long).expect("encode").len()
        );
    }
}
