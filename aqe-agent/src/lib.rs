//! The agent runtime of aqe: what users program against (`use aqe_agent::prelude::*`).
//!
//! An [`Agent`] has an id, a type, capabilities and channels, handlers for what it receives,
//! and one transport. It can send to one agent, request and await a reply (timeout,
//! retries), broadcast to the fleet, open streams, discover peers, and report its health and
//! statistics. The transport is any [`Transport`](aqe_core::Transport): the in-process
//! [`EventBus`], QUIC, NATS, or a [`Fallback`] chain of them, which moves an operation to the
//! next transport when one cannot reach the peer ([`FallbackPolicy`]; FALLBACK.md gives the
//! policy link by link).
//!
//! Agents can also be started from a directory of JSON definition files
//! ([`AgentDefinition`]) with [`Fleet`].
//!
//! # Feature flags
//! Each transport is one feature; features only add transports, never change what the
//! others do.
//! - `quic`: the QUIC transport (`QuicTransport`, from `aqe-quic` on s2n-quic), and QUIC
//!   endpoints for definitions that set `enableQUIC` in [`Fleet::from_dir`]. Off by default;
//!   without it s2n-quic is not compiled, and such definitions run on the rest of their chain
//!   (a warning says so), which is the documented fallback when QUIC is off.
//! - `nats`: the NATS transport (`NatsTransport`, from `aqe-nats` on async-nats), and NATS
//!   connections for definitions with a `natsConfig`. Off by default; without it async-nats is
//!   not compiled.
//!
//! All errors are [`aqe_core::Error`]: one error type across transports is what makes them
//! interchangeable. Handler failures travel back to requesters as [`HandlerError`]s and
//! surface there as [`Error::Remote`](aqe_core::Error::Remote).
#![warn(missing_docs, unreachable_pub)]

mod agent;
mod builder;
mod definition;
mod dispatch;
mod events;
mod fallback;
mod fleet;
mod handler;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "otel")]
mod otel;
pub mod prelude;
mod trace;

pub use agent::Agent;
pub use builder::AgentBuilder;
pub use definition::AgentDefinition;
pub use events::EventStream;
pub use fallback::{Fallback, FallbackBuilder, FallbackPolicy, ORDERED_SWITCH_WAIT};
pub use fleet::Fleet;
pub use handler::HandlerError;
#[cfg(feature = "metrics")]
pub use metrics::{Metrics, MetricsServer};
#[cfg(feature = "otel")]
pub use otel::OtelExporter;
pub use trace::{current_trace, traced};

/// The core types, for users who depend on this crate alone.
pub use aqe_core;

/// The transports this build has, as providers (see [`aqe_core::Provider`]), in the order a
/// definition's chain takes them by default: one line per transport crate, and the only place
/// the runtime names them.
pub fn providers() -> &'static [&'static dyn aqe_core::Provider] {
    &[
        #[cfg(feature = "quic")]
        &aqe_quic::Quic,
        #[cfg(feature = "nats")]
        &aqe_nats::Nats,
    ]
}

/// The names of the transports this build has: the providers', then the in-process bus.
pub fn transports() -> Vec<&'static str> {
    providers()
        .iter()
        .map(|p| p.kind().name())
        .chain([EventBus::KIND.name()])
        .collect()
}

pub use aqe_eventbus::EventBus;
/// The NATS transport crate.
#[cfg(feature = "nats")]
pub use aqe_nats;
#[cfg(feature = "nats")]
pub use aqe_nats::NatsTransport;
/// The QUIC transport crate (certificates for a fleet: `aqe_quic::certs`).
#[cfg(feature = "quic")]
pub use aqe_quic;
#[cfg(feature = "quic")]
pub use aqe_quic::{LinkInfo, QuicTransport};
