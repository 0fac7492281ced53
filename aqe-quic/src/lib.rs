//! The QUIC transport of aqe: agents in different processes and on different hosts talking
//! over real QUIC (RFC 9000) and TLS 1.3, on `s2n-quic`.
//!
//! [`QuicTransport`] implements [`aqe_core::Transport`], so everything the agent API offers
//! over the event bus works the same over QUIC. The mapping, detailed in `PROTOCOL.md`:
//!
//! - one session per pair of endpoint incarnations, over one connection carrying every
//!   agent on both sides; ALPN `aqe/4`; hellos on the first bidirectional stream (the control
//!   stream), then the session's frames (`aqe-session`): membership, heartbeats,
//!   acknowledgements;
//! - each lane a unidirectional stream: one per ordered reliable channel, a pool of four for
//!   unordered ones, one for requests and one for answers each way, a stream of its own for
//!   a payload above 64 KiB; unreliable messages in DATAGRAM frames (RFC 9221); agent
//!   streams one stream each.
//!
//! Everything the sessions decide (windows, acknowledgements, deadlines, redelivery,
//! requests, membership, routing) is `aqe-session`'s; `aqe-link` performs it. This crate is
//! the link: sockets, TLS, hellos, streams.
//!
//! TLS is always on: certificates from PEM files, or generated for development (trusted only
//! inside the process), with mutual TLS when `verifyPeer` is set, and token authentication.
//! [`certs`] makes a fleet CA and node certificates as endpoints need them.
//!
//! # Feature flags
//! - `testing`: a doc-hidden `testing` module with the wire types, decoder entry points for
//!   fuzzing, and TLS material for hand-driven peers. For this crate's tests and `fuzz/`; not
//!   a stable API, and it changes nothing else.
#![warn(missing_docs, unreachable_pub)]

pub mod certs;
mod codec;
mod config;
mod conn;
mod endpoint;
mod identity;
mod link;
mod provider;
mod sched;
mod stream;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
mod tls;
mod transport;
mod wire;

pub use config::{
    IntrospectionConfig, IntrospectionWho, PeerExchange, QuicConfig, QuicLimits, SecurityConfig,
};
pub use provider::Quic;
pub use transport::{LinkInfo, QuicTransport};
