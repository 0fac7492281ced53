//! A NATS transport for aqe: agents on any host that reaches a NATS server talk over it,
//! over TCP, with the same contract as over QUIC or the in-process bus.
//!
//! It is meant as the cross-host fallback of a QUIC fleet (networks that block UDP are the
//! common reason QUIC cannot connect) and as a transport of its own where a NATS server is
//! the one thing every host reaches. The server is an existing, proven engine: this crate is
//! a *wire* for aqe's session layer (`aqe-session`, run by `aqe-link`'s host), the same
//! sessions as over QUIC, on core NATS (no JetStream).
//!
//! - **Subjects** (PROTOCOL.md, section "NATS"): `aqe.<fleet>.ep.<endpoint>` for everything
//!   addressed to an endpoint (an endpoint is a key and an incarnation, 32 hex digits), and
//!   `aqe.<fleet>.presence` for heartbeats and departures. Fleets sharing a server never see
//!   each other.
//! - **Sessions**: endpoints that hear each other's heartbeats shake hands (hellos, settled
//!   by rank when they cross) and keep one session per pair; its frames go in batches, as
//!   few NATS messages as the server's `max_payload` allows. Reliable messages are numbered,
//!   acknowledged, sent again when NATS loses them, delivered once and in order, and settled
//!   by their deadline; unreliable ones are published once.
//! - **Streams**: numbered data with credit-based flow control; a lost packet breaks the
//!   stream rather than skipping data.
//! - **Security**: the NATS connection's own: TLS (with a CA, client certificates),
//!   credentials files, tokens, user and password. Every endpoint on the same server and
//!   account is trusted as a member of the fleet; separate fleets that must not trust each
//!   other belong in separate NATS accounts.
//!
//! What NATS cannot give: messages larger than the server's `max_payload` (1 MiB unless
//! raised) are refused with [`Error::MessageTooLarge`](aqe_core::Error::MessageTooLarge),
//! and there is no congestion window to report.
//!
//! # Feature flags
//! - `testing`: [`testing::NatsServer`], a `nats-server` child process on a free loopback
//!   port, for tests here and in crates that test over NATS; packet encoding for forged
//!   traffic and fuzzing.
#![warn(missing_docs, unreachable_pub)]

mod config;
mod endpoint;
mod provider;
mod stream;
#[cfg(feature = "testing")]
pub mod testing;
mod transport;
mod wire;

pub use config::{NatsConfig, NatsLimits, NatsTls};
pub use provider::Nats;
pub use transport::NatsTransport;
