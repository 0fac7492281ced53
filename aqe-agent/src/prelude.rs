//! What an agent program needs, in one import: `use aqe_agent::prelude::*;`.
//!
//! ```
//! use aqe_agent::prelude::*;
//! # async fn demo() -> aqe_agent::prelude::Result<()> {
//! let bus = std::sync::Arc::new(EventBus::new());
//! let agent = Agent::builder().agent_type("worker").transport(bus).start().await?;
//! let peers = agent.discover_peers(&DiscoveryOptions::default());
//! # let _ = peers; Ok(()) }
//! ```

pub use crate::{
    Agent, AgentBuilder, AgentDefinition, EventBus, EventStream, Fallback, FallbackPolicy, Fleet,
    HandlerError,
};
pub use aqe_core::{
    AgentId, AgentType, BroadcastOptions, BroadcastReport, Capability, Channel, ChannelKind,
    ChannelName, DiscoveryOptions, Encoding, Envelope, Error, Event, Health, HealthStatus,
    IncomingStream, MessageId, MessageKind, Payload, PeerFilter, PeerInfo, PeerState, Priority,
    RequestOptions, Result, SendOptions, Stats, StreamChunk, StreamId, StreamOptions, Token,
    Transport, decode, encode,
};

#[cfg(feature = "quic")]
pub use aqe_quic::{QuicConfig, QuicTransport, SecurityConfig};

#[cfg(feature = "nats")]
pub use aqe_nats::{NatsConfig, NatsTransport};
