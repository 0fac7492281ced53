//! Per-connection statistics from s2n-quic's event subscriber: RTT, congestion window, packets.
//!
//! RTT figures come from real samples only. s2n-quic reports its estimator's state on every
//! transmission and acknowledgement, starting from an initial guess of 333 ms before anything
//! was measured; a sample is counted when an ACK frame has been received and the latest RTT
//! changed, so neither the initial guess nor repeated reports of one sample skew the figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};
use tokio::sync::mpsc;

use aqe_core::SecurityFailure;

/// What the event subscriber records for one connection; shared with the transport.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    smoothed_rtt_us: AtomicU64,
    min_rtt_us: AtomicU64,
    max_rtt_us: AtomicU64,
    latest_rtt_us: AtomicU64,
    rtt_samples: AtomicU64,
    rtt_sum_us: AtomicU64,
    acks_received: AtomicU64,
    cwnd: AtomicU64,
    /// Bytes sent and not yet acknowledged, as the recovery state last said.
    bytes_in_flight: AtomicU64,
    packets_sent: AtomicU64,
    packets_lost: AtomicU64,
    remote: Mutex<Option<SocketAddr>>,
    /// The endpoint id the peer's certificate gives, once the handshake verified it; `None`
    /// when the peer presented none (a dialer without mutual TLS).
    peer_identity: Mutex<Option<u64>>,
}

/// A reading of [`LinkStats`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LinkReading {
    /// RTT samples measured so far; every RTT figure is zero while this is.
    pub(crate) rtt_samples: u64,
    pub(crate) rtt_sum: Duration,
    pub(crate) smoothed_rtt: Duration,
    pub(crate) min_rtt: Duration,
    pub(crate) max_rtt: Duration,
    pub(crate) latest_rtt: Duration,
    pub(crate) cwnd: u64,
    pub(crate) packets_sent: u64,
    pub(crate) packets_lost: u64,
}

impl LinkStats {
    /// Whether everything sent was acknowledged, as far as the recovery state says.
    pub(crate) fn all_acknowledged(&self) -> bool {
        self.bytes_in_flight.load(Ordering::Relaxed) == 0
    }

    /// The peer's id from its verified certificate, if it presented one.
    pub(crate) fn peer_identity(&self) -> Option<u64> {
        *self.peer_identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn read(&self) -> LinkReading {
        let us = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        LinkReading {
            rtt_samples: self.rtt_samples.load(Ordering::Relaxed),
            rtt_sum: us(&self.rtt_sum_us),
            smoothed_rtt: us(&self.smoothed_rtt_us),
            min_rtt: us(&self.min_rtt_us),
            max_rtt: us(&self.max_rtt_us),
            latest_rtt: us(&self.latest_rtt_us),
            cwnd: self.cwnd.load(Ordering::Relaxed),
            packets_sent: self.packets_sent.load(Ordering::Relaxed),
            packets_lost: self.packets_lost.load(Ordering::Relaxed),
        }
    }
}

impl LinkReading {
    /// The RTT figures of this connection, from real samples.
    pub(crate) fn rtt(&self) -> aqe_core::RttStats {
        if self.rtt_samples == 0 {
            return aqe_core::RttStats::default();
        }
        let avg = self.rtt_sum.as_nanos() / u128::from(self.rtt_samples);
        aqe_core::RttStats {
            samples: self.rtt_samples,
            current: self.latest_rtt,
            min: self.min_rtt,
            max: self.max_rtt,
            average: Duration::from_nanos(u64::try_from(avg).unwrap_or(u64::MAX)),
        }
    }
}

/// The event subscriber installed on both of an endpoint's s2n-quic sides.
pub(crate) struct StatsSubscriber {
    /// Security failures seen when a connection closes, for the transport to announce.
    pub(crate) rejections: mpsc::Sender<(SocketAddr, SecurityFailure)>,
}

impl Subscriber for StatsSubscriber {
    type ConnectionContext = Arc<LinkStats>;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        _info: &ConnectionInfo<'_>,
    ) -> Arc<LinkStats> {
        Arc::new(LinkStats::default())
    }

    fn on_connection_started(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        e: &events::ConnectionStarted<'_>,
    ) {
        *ctx.remote.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(SocketAddr::from(&e.path.remote_addr));
    }

    fn on_recovery_metrics(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        e: &events::RecoveryMetrics<'_>,
    ) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        ctx.cwnd
            .store(u64::from(e.congestion_window), Ordering::Relaxed);
        ctx.bytes_in_flight
            .store(u64::from(e.bytes_in_flight), Ordering::Relaxed);
        // Before any acknowledgement the estimator holds its initial guess, not a sample.
        if ctx.acks_received.load(Ordering::Relaxed) == 0 {
            return;
        }
        let latest = us(e.latest_rtt);
        let fresh = ctx.rtt_samples.load(Ordering::Relaxed) == 0
            || ctx.latest_rtt_us.load(Ordering::Relaxed) != latest;
        ctx.smoothed_rtt_us
            .store(us(e.smoothed_rtt), Ordering::Relaxed);
        if !fresh {
            return;
        }
        ctx.latest_rtt_us.store(latest, Ordering::Relaxed);
        let first = ctx.rtt_samples.fetch_add(1, Ordering::Relaxed) == 0;
        ctx.rtt_sum_us.fetch_add(latest, Ordering::Relaxed);
        ctx.max_rtt_us.fetch_max(latest, Ordering::Relaxed);
        if first {
            ctx.min_rtt_us.store(latest, Ordering::Relaxed);
        } else {
            ctx.min_rtt_us.fetch_min(latest, Ordering::Relaxed);
        }
    }

    fn on_tls_exporter_ready(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        e: &events::TlsExporterReady<'_>,
    ) {
        // The handshake is complete: s2n-tls verified the chain against our CA.
        let identity = e.session.peer_cert_chain_der().ok().and_then(|chain| {
            chain
                .first()
                .and_then(|leaf| crate::identity::of_certificate(leaf))
        });
        *ctx.peer_identity.lock().unwrap_or_else(|p| p.into_inner()) = identity;
    }

    fn on_ack_range_received(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        _e: &events::AckRangeReceived<'_>,
    ) {
        ctx.acks_received.fetch_add(1, Ordering::Relaxed);
    }

    fn on_packet_sent(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        _e: &events::PacketSent,
    ) {
        ctx.packets_sent.fetch_add(1, Ordering::Relaxed);
    }

    fn on_packet_lost(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        _e: &events::PacketLost<'_>,
    ) {
        ctx.packets_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn on_connection_closed(
        &mut self,
        ctx: &mut Arc<LinkStats>,
        _meta: &ConnectionMeta,
        e: &events::ConnectionClosed,
    ) {
        let Some(failure) = security_failure(&e.error) else {
            return;
        };
        if let Some(addr) = *ctx.remote.lock().unwrap_or_else(|p| p.into_inner()) {
            // Never block the QUIC endpoint: a full queue loses an announcement, not traffic.
            let _ = self.rejections.try_send((addr, failure));
        }
    }
}

/// The security failure behind a connection error, if it is one.
pub(crate) fn security_failure(error: &s2n_quic::connection::Error) -> Option<SecurityFailure> {
    use crate::wire::close;
    match error {
        s2n_quic::connection::Error::Transport {
            code, initiator, ..
        } => {
            let code = code.as_u64();
            (0x100..=0x1ff)
                .contains(&code)
                .then(|| crate::tls::alert_failure((code - 0x100) as u8, initiator.is_remote()))
        }
        s2n_quic::connection::Error::Application { error, .. } => match u64::from(*error) {
            c if c == u64::from(close::TOKEN_REJECTED) => Some(SecurityFailure::TokenRejected),
            c if c == u64::from(close::TOKEN_MISSING) => Some(SecurityFailure::TokenMissing),
            c if c == u64::from(close::IDENTITY_MISMATCH) => {
                Some(SecurityFailure::IdentityMismatch)
            }
            _ => None,
        },
        _ => None,
    }
}

/// Reads the statistics a connection's subscriber context holds.
pub(crate) fn of(handle: &s2n_quic::connection::Handle) -> Arc<LinkStats> {
    handle
        .query_event_context(|ctx: &Arc<LinkStats>| ctx.clone())
        .unwrap_or_default()
}
