//! The contract of aqe: what agents exchange and what every transport promises.
//!
//! - identifiers ([`AgentId`], [`AgentType`], [`ChannelName`], [`MessageId`], [`StreamId`]);
//! - [`Channel`]s and their delivery contract, with the presets `coordination`, `results`,
//!   `metrics`;
//! - the message [`Envelope`], whose payload is `Bytes` with typed [`encode`] / [`decode`];
//! - options for requests, broadcasts, discovery and streams;
//! - [`Health`] and [`Stats`];
//! - the [`Transport`] trait, what travels through it ([`Inbound`], [`Responder`],
//!   [`IncomingStream`], [`Receipt`]), the [`Event`]s it reports, and the one [`Error`] type;
//! - the open identity of a transport ([`TransportKind`]) and of a remote place
//!   ([`Address`]): adding a transport never touches this crate.
//!
//! What a transport is built from (an agent's inbox, delivery between agents of one process,
//! counters) is in [`plumbing`], for transport authors.
//!
//! This crate opens no socket and knows nothing of QUIC, NATS or any other transport: those
//! live in their own crates, and so does their configuration.
//!
//! # Feature flags
//! - `conformance`: the transport conformance suite ([`conformance`]), a set of tests written
//!   once against [`Transport`] that every transport crate runs on itself. Test-only; adds
//!   nothing to the other types.
#![warn(missing_docs, unreachable_pub)]

mod address;
mod channel;
mod encoded;
mod error;
mod health;
mod id;
mod inbox;
mod introspect;
mod local;
mod message;
mod options;
mod peer;
pub mod plumbing;
pub mod provider;
mod receipt;
mod token;
mod trace;
mod transport;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use address::{Address, TransportKind};
pub use channel::{
    Channel, ChannelKind, DEFAULT_MAX_MESSAGE_SIZE, Priority, SlowConsumer, default_channels,
};
pub use encoded::{Encoded, SPLIT_FROM, encode_envelope, encode_envelopes};
pub use error::{
    BoxError, DeliveryFailure, Error, RemoteErrorKind, Result, SecurityFailure, SendFailure,
    StreamFailure,
};
pub use health::{Health, HealthStatus, HealthThresholds, RecentError, RttStats, Stats};
pub use id::{AgentId, AgentType, Capability, ChannelId, ChannelName, MessageId, StreamId};
pub use introspect::{AgentReport, EndpointReport, LinkReport};
pub use message::{
    Encoding, Envelope, ErrorBody, MessageKind, Payload, Recipient, Timestamp, decode, decode_as,
    encode, encode_each,
};
pub use options::{
    BroadcastOptions, DiscoveryOptions, PeerFilter, RequestOptions, SendOptions, StreamOptions,
};
pub use peer::{PeerInfo, PeerState, Registration, STREAM_CAPABILITY};
pub use provider::{Provider, Started, TransportConfig};
pub use receipt::Receipt;
pub use token::Token;
pub use trace::TraceParent;
pub use transport::{
    BroadcastReport, Event, Inbound, IncomingStream, Redeliver, Responder, StreamChunk,
    StreamHeader, StreamSink, Transport,
};
