//! Core types of aqe: the vocabulary every transport and the agent runtime share.
//!
//! - identifiers ([`AgentId`], [`AgentType`], [`ChannelName`], [`MessageId`], [`StreamId`]);
//! - [`Channel`]s and their delivery contract, with the presets `coordination`, `results`,
//!   `metrics`;
//! - the message [`Envelope`], whose payload is `Bytes` with typed [`encode`] / [`decode`];
//! - options for requests, broadcasts, discovery and streams;
//! - [`Health`] and [`Stats`], and the [`StatsRecorder`] transports keep;
//! - configuration ([`QuicConfig`], [`SecurityConfig`], [`AgentDefinition`] files);
//! - the wire codec ([`FrameCodec`]): postcard in versioned, length-prefixed frames;
//! - the agent [`Inbox`], bounded, ordered by priority, suppressing duplicates, and the
//!   [`Receipt`] by which a reliable message is acknowledged once its agent took it;
//! - the [`Transport`] trait and the one [`Error`] type.
//!
//! This crate opens no socket and knows nothing of QUIC: transports live in their own crates.
//!
//! # Feature flags
//! - `conformance`: the transport conformance suite ([`conformance`]), a set of tests written
//!   once against [`Transport`] that every transport crate runs on itself. Test-only; adds
//!   nothing to the other types.
#![warn(missing_docs, unreachable_pub)]

mod channel;
mod codec;
mod config;
mod error;
mod health;
mod id;
mod inbox;
pub mod local;
mod message;
mod options;
mod peer;
mod receipt;
mod transport;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use channel::{Channel, ChannelKind, DEFAULT_MAX_MESSAGE_SIZE, Priority};
pub use codec::{FRAME_HEADER_LEN, FrameCodec, MAX_FRAME_LEN, MAX_PAYLOAD_LEN, WIRE_VERSION};
pub use config::{
    AgentDefinition, PeerExchange, QuicConfig, QuicLimits, SecurityConfig, Token, default_channels,
};
pub use error::{
    BoxError, DeliveryFailure, Error, RemoteErrorKind, Result, SecurityFailure, SendFailure,
    StreamFailure,
};
pub use health::{
    Health, HealthStatus, HealthThresholds, RecentError, RttStats, Stats, StatsRecorder,
};
pub use id::{AgentId, AgentType, Capability, ChannelId, ChannelName, MessageId, StreamId};
pub use inbox::{
    DEDUP_SENDERS, DEDUP_WINDOW, DEFAULT_INBOX_CAPACITY, Delivered, Delivery, Inbox, InboxPermit,
    InboxSender, inbox,
};
pub use message::{Envelope, ErrorBody, MessageKind, Recipient, Timestamp, decode, encode};
pub use options::{BroadcastOptions, DiscoveryOptions, PeerFilter, RequestOptions, StreamOptions};
pub use peer::{PeerInfo, PeerState, Registration};
pub use receipt::{AckOnce, AckSink, Receipt};
pub use transport::{
    BroadcastReport, Event, Inbound, IncomingStream, Redeliver, Respond, Responder, StreamChunk,
    StreamHeader, StreamSink, StreamSource, Transport, TransportKind,
};
