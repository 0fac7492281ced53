//! The session layer of aqe, sans-IO: what two endpoints decide between them, once, for
//! every transport.
//!
//! An endpoint is its key plus the incarnation of its process ([`EndpointId`]). A
//! [`Session`] is everything between this endpoint and one incarnation of another: reliable
//! messages numbered, windowed (in messages per agent and in bytes), acknowledged, sent
//! again where the wire loses frames, and settled by their deadline; requests correlated and
//! cancelled; the peer's membership by generations; heartbeats and probes. A [`Node`] is
//! what one endpoint decides across its sessions: its agents and their announcements, which
//! session reaches each remote agent id, what peers relay about others, and the messages
//! waiting for a way after their link was lost.
//!
//! In the style of quinn-proto: no tokio, no sockets, no clock reads. Inputs are method
//! calls with the time passed in; outputs are pulled ([`Session::poll_transmit`],
//! [`Session::poll_event`], [`Session::poll_timeout`]) or returned ([`Action`]s). A
//! transport crate (a *link*) carries [`Frame`]s and performs what comes out; the
//! simulation in this crate's tests carries them over a seeded, lossy, partitioned network.
//!
//! # Invariants
//!
//! These hold whatever the peers do, and the simulation checks them after every step:
//!
//! 1. **Every accepted reliable message settles exactly once.** [`Session::send`] returning
//!    `Ok` means one [`SessionEvent::Settled`] (or an [`Action::Settled`] of the node) will
//!    come for it: taken by its agent, or failed with a reason, no later than its delivery
//!    deadline, whatever the links do (a peer that never acknowledges included). Never both.
//! 2. **Taken at most once per receiving process.** A copy (sent again over a lossy wire, or
//!    over a new link) is answered with what became of the first, never delivered again;
//!    a message settled `Taken` was taken exactly once. Only `Unconfirmed` may hide a take
//!    (the receiver went away before saying so).
//! 3. **Order.** On an ordered channel, a receiver hands messages of one sender to its agent
//!    in the order they were sent. A message refused because its agent was not there (it
//!    left, or stopped before taking it) is *displaced*: it looks for its agent again until
//!    its deadline, unless a newer message of its flow went ahead of it, in which case it
//!    fails: an ordered message never arrives after a newer one of its flow. What comes back
//!    to the node (orphaned or refused) goes out again before anything newer sent after it
//!    came back: a route to its agent is published only once it is queued in that session,
//!    and withheld while the redelivery handler carries any of it.
//! 4. **Only to the addressee's holder.** A message goes to the agent it names, at the
//!    endpoint the node routes that id to; what may have been taken by one principal is
//!    never redelivered to another. A peer sends only as agents it announced.
//! 5. **Identity is proven, never inferred.** Sessions are keyed by [`EndpointId`]; an
//!    address is a hint to dial, never a reason to end or replace a session. A newer
//!    incarnation of a proven key only makes the older one prove it lives (a probe).
//! 6. **Bounded.** What a peer can make this endpoint hold is bounded in count and bytes:
//!    unsettled inbound messages (window per agent, bytes per session), parked frames and
//!    requests in hand (counts and bytes per session), all three within the endpoint's
//!    [`Budgets`]; announced agents and registration bytes per peer and per endpoint;
//!    endpoints relayed, snapshot parts.
//! 7. **No panics on peer input.** Malformed input is a typed violation that ends the
//!    session.
#![warn(missing_docs, unreachable_pub)]

mod config;
mod frame;
mod greet;
mod hello;
mod ids;
mod inflow;
mod node;
mod outbox;
mod peer;
mod ranges;
mod seqmap;
mod session;

/// Entries a session's kept lists keep room for between steps (a burst does not keep its
/// size).
const KEPT_ROOM: usize = 256;

pub use config::{
    Config, MAX_RANGE_SPAN, MAX_REGISTRATION, MAX_SNAPSHOT_PARTS, PROBE_MIN, PeerExchange,
    SNAPSHOT_PART_BYTES, WirePolicy,
};
pub use frame::{
    FANOUT_COPY_BYTES, FanoutCopy, Frame, Hello, Lane, MAX_FANOUT, MessageHeader, Ranges, Refusal,
    Relayed, SESSION_VERSION, Transmit, encode_into,
};
pub use greet::{Greeter, Greeting};
pub use hello::{HelloRefusal, check_hello};
pub use ids::{EndpointId, Principal, SessionId, Trust};
pub use inflow::{Budget, Budgets};
pub use node::{Action, AttachError, DISPLACED_RECHECK, Node, NodeInput, Opened, Route};
pub use outbox::{Flow, MessageMeta, Orphan, Outcome, Settled};
pub use peer::AgentsChange;
pub use session::{
    Answer, Ctx, Ended, Locals, NotSent, Rank, Session, SessionEvent, SessionInput, fanout_meta,
    message_meta, outgoing,
};
