//! What aqe puts on NATS: the subjects of a fleet and the frames published on them.
//! PROTOCOL.md, section "NATS", is the reference; this module is its implementation.
//!
//! Every NATS message aqe publishes is one frame: a version byte, then a postcard-encoded
//! [`Frame`]. Envelopes inside frames use the same encoding as on QUIC.

use std::fmt;
use std::fmt::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use aqe_core::{
    AgentId, ChannelName, Envelope, MessageId, Registration, RemoteErrorKind, StreamHeader,
    StreamId,
};

/// The version byte that starts every frame. A frame of another version is dropped.
pub(crate) const NATS_WIRE_VERSION: u8 = 2;

/// One endpoint (one NATS connection hosting agents), named by a random number chosen at
/// start, so that a restarted process is a new endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Ep(pub(crate) u64);

impl Ep {
    /// A fresh, random endpoint id.
    pub(crate) fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.write_u32(std::process::id());
        h.write_u64(MessageId::next().0);
        Ep(h.finish())
    }
}

impl fmt::Display for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ep({self})")
    }
}

/// The subjects of one fleet.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `aqe.<fleet>.`; `fleet` is a checked subject token.
    pub(crate) fn new(fleet: &str) -> Self {
        Self {
            prefix: format!("aqe.{fleet}."),
        }
    }

    /// Where an agent's messages, requests and stream data go.
    pub(crate) fn agent(&self, agent: &AgentId) -> String {
        let mut s = format!("{}agent.", self.prefix);
        push_token(&mut s, agent.as_str());
        s
    }

    /// An endpoint's own subject: acknowledgements, responses, cancellations, stream credit,
    /// membership snapshots.
    pub(crate) fn endpoint(&self, ep: Ep) -> String {
        format!("{}ep.{ep}", self.prefix)
    }

    /// Presence: heartbeats, joins and departures of every endpoint of the fleet.
    pub(crate) fn presence(&self) -> String {
        format!("{}presence", self.prefix)
    }

    /// Fleet broadcasts: one publication reaches every endpoint.
    pub(crate) fn broadcast(&self) -> String {
        format!("{}bcast", self.prefix)
    }
}

/// Writes `id` as one subject token: letters, digits, `-` and `_` as they are, every other
/// byte as `~` and two hex digits (so `~` itself, `.`, `*`, `>` and spaces never appear raw).
fn push_token(out: &mut String, id: &str) {
    if id.is_empty() {
        out.push('~');
        return;
    }
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "~{b:02x}");
        }
    }
}

/// A reliable message on its flow: `seq` numbers the messages of one (sender, receiver,
/// channel) flow from 1 within `epoch` (fresh for every life of the flow); `base` is the
/// oldest one the sender has not seen received, where a receiver without state for the flow
/// starts; `oldest` is the oldest one the sender has not seen taken, below which the
/// receiver forgets what became of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sequenced {
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    pub(crate) base: u64,
    pub(crate) oldest: u64,
}

/// One target of a fleet broadcast, with its place in the flow to it (none on an unreliable
/// channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BroadcastTarget {
    pub(crate) agent: AgentId,
    pub(crate) endpoint: Ep,
    pub(crate) flow: Option<Sequenced>,
}

/// A flow's messages received up to `up_to` (cumulative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Received {
    pub(crate) from: AgentId,
    pub(crate) to: AgentId,
    pub(crate) channel: ChannelName,
    pub(crate) epoch: u64,
    pub(crate) up_to: u64,
}

/// Everything published, by subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Frame {
    // On an agent's subject; `to` is the endpoint hosting it (others drop the frame).
    /// A one-way message on a reliable channel; `confirm`: its sender waits for the
    /// confirmation that it was taken (acknowledge it at once, not in the next batch).
    Message {
        to: Ep,
        from: Ep,
        flow: Sequenced,
        confirm: bool,
        envelope: Envelope,
    },
    /// A one-way message on an unreliable channel: at most once, never acknowledged.
    Datagram {
        to: Ep,
        from: Ep,
        envelope: Envelope,
    },
    /// A request; the answer goes to the requester's endpoint subject (the NATS reply
    /// subject) within `timeout_ms`.
    Request {
        to: Ep,
        from: Ep,
        timeout_ms: u64,
        envelope: Envelope,
    },
    /// A stream opened to the agent.
    StreamOpen {
        to: Ep,
        from: Ep,
        header: StreamHeader,
    },
    /// Stream data, numbered from 1; a gap breaks the stream.
    StreamData {
        to: Ep,
        from: Ep,
        stream: StreamId,
        seq: u64,
        data: Bytes,
        fin: bool,
    },
    /// The writer gave up on the stream.
    StreamCancel { to: Ep, from: Ep, stream: StreamId },
    // On the fleet's broadcast subject.
    /// One message for several agents, each endpoint delivering to the targets it hosts.
    Broadcast {
        from: Ep,
        envelope: Envelope,
        targets: Vec<BroadcastTarget>,
    },
    // On an endpoint's subject.
    /// Flows received up to a point; messages taken by their agent; messages dropped
    /// unread by a stopping agent. A message is named with the agent it went to: the copies
    /// of a broadcast share one message id.
    Acks {
        from: Ep,
        received: Vec<Received>,
        taken: Vec<(AgentId, MessageId)>,
        abandoned: Vec<(AgentId, MessageId)>,
    },
    /// The answer to a request.
    Response {
        from: Ep,
        request: MessageId,
        envelope: Envelope,
    },
    /// A request refused without running (busy, no such agent here).
    Refused {
        from: Ep,
        request: MessageId,
        kind: RemoteErrorKind,
        message: String,
    },
    /// The requested agent is not at this endpoint (any more).
    NotHere {
        from: Ep,
        request: MessageId,
        agent: AgentId,
    },
    /// The requester gave up.
    Cancel { from: Ep, request: MessageId },
    /// The reader consumed a stream up to `up_to`: the writer may send up to `up_to` plus
    /// the stream window.
    StreamCredit {
        from: Ep,
        stream: StreamId,
        up_to: u64,
    },
    /// The reader dropped the stream, or it broke.
    StreamReset { from: Ep, stream: StreamId },
    /// Asks for the agents the endpoint hosts.
    SnapshotRequest { from: Ep },
    /// The agents an endpoint hosts at `generation`, in `parts` frames.
    Snapshot {
        from: Ep,
        generation: u64,
        part: u16,
        parts: u16,
        agents: Vec<Registration>,
    },
    // On the fleet's presence subject.
    /// A heartbeat: the endpoint lives, its membership is at `generation`.
    Alive { from: Ep, generation: u64 },
    /// An agent attached; the membership is now at `generation`.
    Joined {
        from: Ep,
        generation: u64,
        agent: Registration,
    },
    /// An agent detached; the membership is now at `generation`.
    Left {
        from: Ep,
        generation: u64,
        agent: AgentId,
    },
    /// The endpoint shuts down.
    Gone { from: Ep },
}

/// Encodes a frame.
pub(crate) fn encode(frame: &Frame) -> Result<Bytes, postcard::Error> {
    // Measured first, so the buffer is allocated once rather than grown by doubling.
    let size = postcard::experimental::serialized_size(frame)?;
    let mut out = Vec::with_capacity(size + 1);
    out.push(NATS_WIRE_VERSION);
    postcard::to_extend(frame, out).map(Bytes::from)
}

/// Decodes a frame; `None` for another version or bytes that are not a frame.
pub(crate) fn decode(bytes: &[u8]) -> Option<Frame> {
    match bytes.split_first() {
        Some((&NATS_WIRE_VERSION, body)) => postcard::from_bytes(body).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};

    #[test]
    fn agent_ids_become_safe_distinct_tokens() {
        let s = Subjects::new("qe");
        assert_eq!(s.agent(&"worker-1".into()), "aqe.qe.agent.worker-1");
        assert_eq!(s.agent(&"a.b".into()), "aqe.qe.agent.a~2eb");
        assert_eq!(s.agent(&"a~2eb".into()), "aqe.qe.agent.a~7e2eb");
        assert_eq!(s.agent(&"*> x".into()), "aqe.qe.agent.~2a~3e~20x");
        assert_eq!(s.agent(&"é".into()), "aqe.qe.agent.~c3~a9");
        assert_eq!(s.agent(&"".into()), "aqe.qe.agent.~");
        assert_eq!(s.endpoint(Ep(0xab)), "aqe.qe.ep.00000000000000ab");
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let envelope = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "coordination".into(),
            MessageKind::Direct,
            Bytes::from_static(b"hi"),
        );
        let f = Frame::Message {
            to: Ep(1),
            from: Ep(2),
            flow: Sequenced {
                epoch: 7,
                seq: 3,
                base: 2,
                oldest: 1,
            },
            confirm: false,
            envelope,
        };
        let bytes = encode(&f).expect("encode");
        assert_eq!(bytes[0], NATS_WIRE_VERSION);
        assert_eq!(decode(&bytes), Some(f));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[NATS_WIRE_VERSION + 1, 0]), None);
        assert_eq!(decode(&[NATS_WIRE_VERSION, 200, 1, 2]), None);
        for cut in 1..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "truncated at {cut}");
        }
    }
}
