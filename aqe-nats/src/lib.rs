//! A NATS transport for aqe: agents on any host that reaches a NATS server talk over it,
//! over TCP, with the same contract as over QUIC or the in-process bus.
//!
//! It is meant as the cross-host fallback of a QUIC fleet (networks that block UDP are the
//! common reason QUIC cannot connect) and as a transport of its own where a NATS server is
//! the one thing every host reaches. The server is an existing, proven engine: this crate
//! adds aqe's addressing, delivery accounting and membership on top of core NATS (no
//! JetStream).
//!
//! - **Subjects** (PROTOCOL.md, section "NATS"): `aqe.<fleet>.agent.<agent>` for what goes to
//!   an agent, `aqe.<fleet>.ep.<endpoint>` for what goes to an endpoint (acknowledgements,
//!   responses, credit, snapshots), `aqe.<fleet>.presence` for membership and
//!   `aqe.<fleet>.bcast` for fleet broadcasts. Fleets sharing a server never see each other.
//! - **Channels**: reliable ones are numbered per flow, acknowledged, retransmitted, delivered
//!   once and in order (unordered channels too: ordering costs nothing here), confirmed when
//!   the receiving agent takes the message, and reported failed otherwise. Unreliable ones are
//!   published once: at most once, which is all NATS gives.
//! - **Requests** travel to the agent's subject with the endpoint's subject as NATS reply
//!   subject, correlated by message id; a requester that gives up cancels the handler.
//! - **Streams**: numbered data with credit-based flow control; a lost frame breaks the
//!   stream rather than skipping data.
//! - **Membership**: presence heartbeats with a generation, joins and departures, snapshots
//!   on demand; an endpoint silent for the liveness timeout is gone.
//! - **Security**: the NATS connection's own: TLS (with a CA, client certificates),
//!   credentials files, tokens, user and password. Every endpoint on the same server and
//!   account is trusted as a member of the fleet; separate fleets that must not trust each
//!   other belong in separate NATS accounts.
//!
//! What NATS cannot give: messages larger than the server's `max_payload` (1 MiB unless
//! raised) are refused with [`Error::MessageTooLarge`](aqe_core::Error::MessageTooLarge);
//! round-trip times are measured by aqe (acknowledgements and requests), and there is no
//! congestion window to report.
//!
//! # Feature flags
//! - `testing`: [`testing::NatsServer`], a `nats-server` child process on a free loopback
//!   port, for tests here and in crates that test over NATS.
#![warn(missing_docs, unreachable_pub)]

mod config;
mod endpoint;
mod flows;
mod membership;
mod stream;
#[cfg(feature = "testing")]
pub mod testing;
mod transport;
mod wire;

/// The hash tables of the per-message paths (see `aqe_core::plumbing::FastState`).
type Map<K, V> = aqe_core::plumbing::FastMap<K, V>;
type Set<K> = aqe_core::plumbing::FastSet<K>;
type ConcurrentMap<K, V> = dashmap::DashMap<K, V, aqe_core::plumbing::FastState>;

pub use config::{NatsConfig, NatsLimits, NatsTls};
pub use transport::NatsTransport;
