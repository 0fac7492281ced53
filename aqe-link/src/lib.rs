//! The async half of aqe's session layer: a [`Host`] runs the sans-IO state machines of
//! `aqe-session` (one [`Session`](aqe_session::Session) per peer incarnation, one
//! [`Node`](aqe_session::Node) per endpoint) over any link, and implements
//! [`aqe_core::Transport`] for all of them at once.
//!
//! A transport crate is a *wire*: it makes links (a QUIC connection, NATS subjects), checks
//! hellos with [`aqe_session::check_hello`], hands the host what arrives
//! ([`Host::frames`]) and sends what the host gives its [`Link`]. Everything between
//! (windows, acknowledgements, deadlines, redelivery, requests, membership, routing) is
//! decided once, in `aqe-session`, and performed once, here.
//!
//! Ownership: the node lives in one task (its *node task*); each session's state is behind
//! its own lock, driven by its own task for timers, and touched by whoever has an input for
//! it (a sender, a reader, a receipt). No lock spans the endpoint on the per-message path:
//! a send reads the route table and takes its session's lock; a frame that arrives takes its
//! session's lock.
#![warn(missing_docs, unreachable_pub)]

mod cell;
mod ctx;
mod host;
mod introspect;
mod locals;
mod node;

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use aqe_core::{Address, Result, RttStats, StreamHeader, StreamSink, TransportKind};
use aqe_session::{Ended, EndpointId, Transmit};

pub use host::{
    Host, HostConfig, Introspection, Opening, SessionHandle, WeakHost, fresh_incarnation,
};
pub use introspect::{ENDPOINT_AGENT_PREFIX, endpoint_agent};

/// What a wire measures on a link, for statistics and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkFigures {
    /// Round-trip times measured (real samples only).
    pub rtt: RttStats,
    /// The smoothed round-trip time (zero before the first sample).
    pub smoothed_rtt: Duration,
    /// Congestion window, in bytes (zero when the wire has none).
    pub congestion_window: u64,
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets lost.
    pub packets_lost: u64,
}

/// One session's link, as its wire provides it.
#[async_trait]
pub trait Link: Send + Sync + 'static {
    /// Sends these frames, in order, without waiting: each lane keeps its order (the wire
    /// queues what it cannot write at once; what the session admitted bounds it). Returns
    /// how many unreliable frames it could not take (its datagram queue was full): the
    /// host counts them dropped for their sender.
    fn transmit(&self, frames: &mut Vec<Transmit>) -> usize;

    /// The session ended for `why`: close the link (a wire tells the peer how, when it can).
    fn close(&self, why: Ended);

    /// Waits until what the link queued without acknowledgement (unreliable messages) has
    /// left, so that closing it does not drop them; the host bounds the wait.
    async fn flush(&self) {}

    /// Where the peer is, for events and reports.
    fn address(&self) -> Address;

    /// What the wire measures on the link, if anything.
    fn figures(&self) -> Option<LinkFigures> {
        None
    }

    /// Opens an agent stream over the link; the peer's reader gets it as an
    /// [`IncomingStream`](aqe_core::IncomingStream). `max_chunk` is the channel's message
    /// size; `stats` counts what is written.
    async fn open_stream(
        &self,
        header: StreamHeader,
        generation: u64,
        max_chunk: usize,
        stats: std::sync::Arc<aqe_core::plumbing::StatsRecorder>,
    ) -> Result<Box<dyn StreamSink>>;
}

/// A wire: how links are made.
#[async_trait]
pub trait Wire: Send + Sync + 'static {
    /// How the transport names itself.
    fn kind(&self) -> TransportKind;

    /// Makes a link to the endpoint listening at `addr` (peer exchange says `endpoint` is
    /// there) in the background, as [`Host::open`] for any it makes.
    fn dial(&self, addr: SocketAddr, endpoint: EndpointId);

    /// The largest unreliable message the wire carries in one piece, if it has a limit
    /// (QUIC datagrams): larger ones are refused with `MessageTooLarge`.
    fn max_datagram(&self) -> Option<usize> {
        None
    }

    /// The largest payload the wire carries, if it has a limit (a NATS server's
    /// `max_payload`).
    fn max_payload(&self) -> Option<usize> {
        None
    }

    /// Where this endpoint accepts links, if it does.
    fn listen(&self) -> Option<SocketAddr> {
        None
    }

    /// Stops the wire's own tasks, after the host ended every session.
    async fn shutdown(&self);
}

#[doc(hidden)]
pub mod __private {
    pub use aqe_core;
    pub use async_trait::async_trait;
    pub use tokio::sync::broadcast;
}

/// Implements [`aqe_core::Transport`] for a wire's public type by handing every call to the
/// [`Host`] in its field `$field`: the transport is the host's, whatever the wire.
#[macro_export]
macro_rules! transport_via_host {
    ($ty:ty, $field:ident) => {
        #[$crate::__private::async_trait]
        impl $crate::__private::aqe_core::Transport for $ty {
            fn kind(&self) -> $crate::__private::aqe_core::TransportKind {
                $crate::__private::aqe_core::Transport::kind(&self.$field)
            }

            async fn attach(
                &self,
                agent: $crate::__private::aqe_core::Registration,
                inbox: $crate::__private::aqe_core::plumbing::InboxSender,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::attach(&self.$field, agent, inbox).await
            }

            async fn detach(
                &self,
                agent: &$crate::__private::aqe_core::AgentId,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::detach(&self.$field, agent).await
            }

            async fn send(
                &self,
                envelope: $crate::__private::aqe_core::Envelope,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::send(&self.$field, envelope).await
            }

            async fn send_confirmed(
                &self,
                envelope: $crate::__private::aqe_core::Envelope,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::send_confirmed(&self.$field, envelope).await
            }

            async fn send_handed_over(
                &self,
                envelope: $crate::__private::aqe_core::Envelope,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::send_handed_over(&self.$field, envelope)
                    .await
            }

            async fn send_many(
                &self,
                envelopes: Vec<$crate::__private::aqe_core::Envelope>,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::send_many(&self.$field, envelopes).await
            }

            async fn request(
                &self,
                envelope: $crate::__private::aqe_core::Envelope,
                timeout: ::std::time::Duration,
            ) -> $crate::__private::aqe_core::Result<$crate::__private::aqe_core::Envelope> {
                $crate::__private::aqe_core::Transport::request(&self.$field, envelope, timeout).await
            }

            async fn broadcast(
                &self,
                envelope: $crate::__private::aqe_core::Envelope,
                targets: &[$crate::__private::aqe_core::AgentId],
            ) -> $crate::__private::aqe_core::Result<$crate::__private::aqe_core::BroadcastReport>
            {
                $crate::__private::aqe_core::Transport::broadcast(&self.$field, envelope, targets).await
            }

            async fn open_stream(
                &self,
                header: $crate::__private::aqe_core::StreamHeader,
            ) -> $crate::__private::aqe_core::Result<
                Box<dyn $crate::__private::aqe_core::StreamSink>,
            > {
                $crate::__private::aqe_core::Transport::open_stream(&self.$field, header).await
            }

            fn registration(
                &self,
                agent: &$crate::__private::aqe_core::AgentId,
            ) -> $crate::__private::aqe_core::Result<$crate::__private::aqe_core::Registration>
            {
                $crate::__private::aqe_core::Transport::registration(&self.$field, agent)
            }

            fn peers(&self) -> Vec<$crate::__private::aqe_core::PeerInfo> {
                $crate::__private::aqe_core::Transport::peers(&self.$field)
            }

            fn agents_on(
                &self,
                channel: &$crate::__private::aqe_core::ChannelName,
            ) -> Vec<$crate::__private::aqe_core::AgentId> {
                $crate::__private::aqe_core::Transport::agents_on(&self.$field, channel)
            }

            fn links(&self) -> Vec<$crate::__private::aqe_core::LinkReport> {
                $crate::__private::aqe_core::Transport::links(&self.$field)
            }

            fn stats(
                &self,
                agent: &$crate::__private::aqe_core::AgentId,
            ) -> $crate::__private::aqe_core::Stats {
                $crate::__private::aqe_core::Transport::stats(&self.$field, agent)
            }

            fn subscribe(
                &self,
            ) -> $crate::__private::broadcast::Receiver<$crate::__private::aqe_core::Event> {
                $crate::__private::aqe_core::Transport::subscribe(&self.$field)
            }

            fn can_reach(&self, agent: &$crate::__private::aqe_core::AgentId) -> bool {
                $crate::__private::aqe_core::Transport::can_reach(&self.$field, agent)
            }

            async fn flush(
                &self,
                from: &$crate::__private::aqe_core::AgentId,
                to: &$crate::__private::aqe_core::AgentId,
                channel: &$crate::__private::aqe_core::ChannelName,
            ) -> $crate::__private::aqe_core::Result<()> {
                $crate::__private::aqe_core::Transport::flush(&self.$field, from, to, channel).await
            }

            fn set_redelivery(
                &self,
                redeliver: ::std::sync::Arc<dyn $crate::__private::aqe_core::Redeliver>,
            ) {
                $crate::__private::aqe_core::Transport::set_redelivery(&self.$field, redeliver);
            }

            async fn shutdown(&self) {
                $crate::__private::aqe_core::Transport::shutdown(&self.$field).await;
            }
        }
    };
}
