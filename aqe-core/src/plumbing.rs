//! The parts a transport is built from, for transport authors (and the agent runtime).
//! Users of aqe never need them: an agent's inbox, its receipts and its counters are
//! handled by the runtime and the transports.
//!
//! - the agent [`Inbox`]: bounded, ordered by priority, suppressing duplicates; a transport
//!   puts what arrives for an agent into its [`InboxSender`];
//! - [`LocalAgent`], [`LocalAgents`] and [`LocalDelivery`]: the agents a transport hosts, and
//!   delivery between agents of one process, which every
//!   transport uses for agents it hosts side by side (the event bus is nothing else), so that
//!   priorities, backpressure, receipts and failure reports behave the same everywhere;
//! - [`StatsRecorder`]: the counters behind [`Stats`](crate::Stats);
//! - the traits a transport implements behind the contract's types: [`Respond`] (behind a
//!   [`Responder`](crate::Responder)), [`StreamSource`] (behind an
//!   [`IncomingStream`](crate::IncomingStream)), [`AckSink`] / [`AckOnce`] (behind a
//!   [`Receipt`](crate::Receipt));
//! - [`millis`]: durations as milliseconds in configuration files;
//! - [`FastMap`], [`FastSet`], [`FastState`]: the hash tables of per-message paths.

pub use crate::channel::MAX_PAYLOAD_LEN;
pub use crate::encoded::splitting;
pub use crate::health::StatsRecorder;
pub use crate::inbox::{
    DEDUP_SENDERS, DEDUP_WINDOW, DEFAULT_INBOX_CAPACITY, Delivered, Delivery, Inbox, InboxPermit,
    InboxPermits, InboxSender, inbox,
};
pub use crate::local::{
    LocalAgent, LocalAgents, LocalDelivery, LocalSink, LocalStreamLimits, responder, stream,
};
pub use crate::message::{BLOCKING_COPY, copying, shared_bytes, sharing};
pub use crate::receipt::{AckOnce, AckSink, Fate};
pub use crate::transport::{Respond, StreamSource, check_batch};

/// The hasher of the tables every message passes through (flows, acknowledgements, requests,
/// names decoded from the wire): foldhash, several times cheaper than std's SipHash on agent
/// names, and randomly seeded per process, since the keys come from peers.
pub type FastState = foldhash::fast::RandomState;
/// A `HashMap` with [`FastState`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;
/// A `HashSet` with [`FastState`].
pub type FastSet<K> = std::collections::HashSet<K, FastState>;

/// Durations as whole milliseconds in configuration files:
/// `#[serde(with = "aqe_core::plumbing::millis")]`.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration as whole milliseconds.
    ///
    /// # Errors
    /// As the serializer's.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    ///
    /// # Errors
    /// When the value is not an unsigned integer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
