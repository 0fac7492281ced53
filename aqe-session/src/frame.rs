//! What sessions say to each other: the hello, then [`Frame`]s. These are values; each wire
//! carries them in its own versioned envelope (a QUIC stream frame, a NATS message) and
//! PROTOCOL.md gives their exact encoding (postcard).

use std::net::SocketAddr;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use aqe_core::{AgentId, ChannelName, Encoded, Envelope, MessageId, Priority, Registration};

use crate::EndpointId;

/// The version of the session protocol, carried in every hello.
pub const SESSION_VERSION: u8 = 6;

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
}

/// The postcard index of [`Frame::Message`], written before its header fields.
const MESSAGE_VARIANT: u8 = 7;

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
        dst.extend_from_slice(&[MESSAGE_VARIANT]);
        for n in [self.seq, self.after, self.low, self.generation] {
            let mut buf = [0u8; 10];
            dst.extend_from_slice(postcard::to_slice(&n, &mut buf)?);
        }
        dst.extend_from_slice(&[u8::from(self.confirm)]);
        Ok(())
    }
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
}

impl Transmit {
    /// The lane it goes on.
    pub fn lane(&self) -> &Lane {
        match self {
            Transmit::Frame(lane, _) | Transmit::Message { lane, .. } => lane,
        }
    }

    /// Its priority: a message's (a request's, an answer's, a datagram's) envelope's; other
    /// frames (cancellations, and everything of the control lane) the highest.
    pub fn priority(&self) -> Priority {
        match self {
            Transmit::Message { priority, .. } => *priority,
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
        }
    }

    /// Appends the postcard encoding of the frame (exactly what `postcard` makes of the
    /// [`Frame`] it stands for) to `dst`.
    ///
    /// # Errors
    /// When the frame cannot be encoded (a registration with a map postcard refuses).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), postcard::Error> {
        match self {
            Transmit::Frame(_, frame) => encode_into(frame, dst),
            Transmit::Message { header, body, .. } => {
                header.encode(dst)?;
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
}
