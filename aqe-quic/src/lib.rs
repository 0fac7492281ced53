//! The QUIC transport of aqe: agents in different processes and on different hosts talking
//! over real QUIC (RFC 9000) and TLS 1.3, on `s2n-quic`.
//!
//! [`QuicTransport`] implements [`aqe_core::Transport`], so everything the agent API offers
//! over the event bus works the same over QUIC. The mapping, detailed in `PROTOCOL.md`:
//!
//! - one connection per pair of endpoints, carrying every agent on both sides; ALPN `aqe/1`;
//!   a hello on the first bidirectional stream (version, token, agents, known peers);
//! - ordered reliable channels: one long-lived unidirectional stream per connection and
//!   channel; unordered reliable: one stream per message (no head-of-line blocking);
//!   unreliable: DATAGRAM frames (RFC 9221);
//! - requests: a long-lived bidirectional stream per connection and direction, correlated by
//!   message id (requests above 16 KiB: a bidirectional stream each); agent streams: one
//!   unidirectional stream each.
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
mod config;
mod conn;
mod endpoint;
#[cfg(test)]
mod hostile;
mod identity;
mod inflow;
mod introspect;
mod lane;
mod link;
mod outbox;
#[cfg(test)]
mod race;
mod registry;
mod stream;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
mod tls;
mod transport;
mod wire;

pub use config::{PeerExchange, QuicConfig, QuicLimits, SecurityConfig};
pub use transport::{LinkInfo, QuicTransport};
