//! Health and statistics, and the counters transports keep to produce them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Overall state of an agent's communication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Everything within thresholds.
    Healthy,
    /// Working, but slow or alone.
    Degraded,
    /// Losing too much, or not operational.
    Unhealthy,
}

/// When health degrades. Defaults: loss above 10 % is unhealthy; an average RTT above 100 ms,
/// or no peer at all, is degraded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HealthThresholds {
    /// Loss ratio (0..1) above which the status is unhealthy.
    pub unhealthy_loss: f64,
    /// Average RTT above which the status is degraded, in milliseconds in configuration files.
    #[serde(with = "crate::plumbing::millis", rename = "degradedRttMs")]
    pub degraded_rtt: Duration,
    /// Whether having no peer at all counts as degraded.
    pub degraded_without_peers: bool,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            unhealthy_loss: 0.10,
            degraded_rtt: Duration::from_millis(100),
            degraded_without_peers: true,
        }
    }
}

/// An error kept for the health report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    /// When it happened.
    pub at: Timestamp,
    /// What it said.
    pub message: String,
}

/// A health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// Whether the agent can send at all (running, attached to a transport).
    pub operational: bool,
    /// Peers currently reachable.
    pub connected_peers: usize,
    /// Channels the agent uses.
    pub active_channels: usize,
    /// Average RTT, where measured.
    pub average_rtt: Option<Duration>,
    /// Loss ratio (0..1).
    pub packet_loss: f64,
    /// The last errors seen, oldest first.
    pub recent_errors: Vec<RecentError>,
    /// When the report was made.
    pub timestamp: Timestamp,
    /// Why the verdict is what it is.
    pub message: String,
}

impl Health {
    /// Judges `stats` and the surroundings against `thresholds`.
    pub fn assess(
        stats: &Stats,
        operational: bool,
        connected_peers: usize,
        active_channels: usize,
        recent_errors: Vec<RecentError>,
        thresholds: &HealthThresholds,
    ) -> Self {
        let average_rtt = (stats.rtt.samples > 0).then_some(stats.rtt.average);
        let (status, message) = if !operational {
            (HealthStatus::Unhealthy, "not operational".to_owned())
        } else if stats.packet_loss > thresholds.unhealthy_loss {
            (
                HealthStatus::Unhealthy,
                format!(
                    "loss {:.1}% above {:.1}%",
                    stats.packet_loss * 100.0,
                    thresholds.unhealthy_loss * 100.0
                ),
            )
        } else if stats.unreachable_peers > 0 && connected_peers == 0 {
            (
                HealthStatus::Unhealthy,
                format!(
                    "{} peer endpoint(s) unreachable and no peer connected",
                    stats.unreachable_peers
                ),
            )
        } else if stats.unreachable_peers > 0 {
            (
                HealthStatus::Degraded,
                format!("{} peer endpoint(s) unreachable", stats.unreachable_peers),
            )
        } else if average_rtt.is_some_and(|rtt| rtt > thresholds.degraded_rtt) {
            (
                HealthStatus::Degraded,
                format!(
                    "average RTT {:?} above {:?}",
                    stats.rtt.average, thresholds.degraded_rtt
                ),
            )
        } else if connected_peers == 0 && thresholds.degraded_without_peers {
            (HealthStatus::Degraded, "no peers".to_owned())
        } else {
            (
                HealthStatus::Healthy,
                format!("{connected_peers} peer(s), all within thresholds"),
            )
        };
        Self {
            status,
            operational,
            connected_peers,
            active_channels,
            average_rtt,
            packet_loss: stats.packet_loss,
            recent_errors,
            timestamp: Timestamp::now(),
            message,
        }
    }
}

/// Round-trip time figures from real measurements only; all zero while `samples` is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttStats {
    /// How many measurements went in.
    pub samples: u64,
    /// The latest.
    pub current: Duration,
    /// The smallest.
    pub min: Duration,
    /// The largest.
    pub max: Duration,
    /// The mean.
    pub average: Duration,
}

impl RttStats {
    /// One measurement.
    pub fn sample(rtt: Duration) -> RttStats {
        RttStats {
            samples: 1,
            current: rtt,
            min: rtt,
            max: rtt,
            average: rtt,
        }
    }

    /// Combines two sets of figures (the latest of `other` becomes current if it has any).
    /// The average is weighted by sample counts, in 128-bit arithmetic so that no count or
    /// duration overflows it.
    pub fn merge(self, other: RttStats) -> RttStats {
        match (self.samples, other.samples) {
            (0, _) => other,
            (_, 0) => self,
            (a, b) => {
                let total = u128::from(a) + u128::from(b);
                let weighted = self.average.as_nanos() * u128::from(a)
                    + other.average.as_nanos() * u128::from(b);
                let avg = u64::try_from(weighted / total).unwrap_or(u64::MAX);
                RttStats {
                    samples: a.saturating_add(b),
                    current: other.current,
                    min: self.min.min(other.min),
                    max: self.max.max(other.max),
                    average: Duration::from_nanos(avg),
                }
            }
        }
    }
}

/// Traffic statistics of an agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Payload bytes sent (the same measure on every transport; QUIC's own packet figures
    /// are in the loss ratio and the transport's link statistics).
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Messages dropped: unreliable messages that found a full queue, expired messages.
    pub messages_dropped: u64,
    /// Reliable messages accepted for delivery that did not reach their receiver
    /// (each also reported in an `Event::DeliveryFailed`).
    pub messages_failed: u64,
    /// Reliable messages accepted for delivery and not yet taken by their receiver nor
    /// reported failed.
    pub messages_unconfirmed: u64,
    /// Round-trip times (request round trips on the bus; the QUIC RTT estimate over QUIC).
    pub rtt: RttStats,
    /// Loss ratio 0..1 (dropped over offered on the bus; lost packets over sent over QUIC).
    pub packet_loss: f64,
    /// Congestion window in bytes, where there is congestion control.
    pub congestion_window: Option<u64>,
    /// Streams currently open, both directions.
    pub active_streams: u64,
    /// Time since the agent started.
    pub uptime: Duration,
    /// When the agent last sent or received.
    pub last_activity: Option<Timestamp>,
    /// Operations that fell back to the secondary transport.
    pub fallbacks_used: u64,
    /// Peer endpoints whose connection was lost without a goodbye (liveness failure, idle
    /// timeout, network error) and that have not come back yet.
    pub unreachable_peers: u64,
}

impl Stats {
    /// Adds the counters of `other` to these (both transports of one agent, say).
    pub fn merge(self, other: Stats) -> Stats {
        let offered = self.messages_sent + other.messages_sent;
        let loss = if offered == 0 {
            self.packet_loss.max(other.packet_loss)
        } else {
            (self.packet_loss * self.messages_sent as f64
                + other.packet_loss * other.messages_sent as f64)
                / offered as f64
        };
        Stats {
            bytes_sent: self.bytes_sent + other.bytes_sent,
            bytes_received: self.bytes_received + other.bytes_received,
            messages_sent: offered,
            messages_received: self.messages_received + other.messages_received,
            messages_dropped: self.messages_dropped + other.messages_dropped,
            messages_failed: self.messages_failed + other.messages_failed,
            messages_unconfirmed: self.messages_unconfirmed + other.messages_unconfirmed,
            rtt: self.rtt.merge(other.rtt),
            packet_loss: loss,
            congestion_window: match (self.congestion_window, other.congestion_window) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            active_streams: self.active_streams + other.active_streams,
            uptime: self.uptime.max(other.uptime),
            last_activity: self.last_activity.max(other.last_activity),
            fallbacks_used: self.fallbacks_used + other.fallbacks_used,
            unreachable_peers: self.unreachable_peers + other.unreachable_peers,
        }
    }
}

/// Lock-free counters a transport keeps per agent and turns into [`Stats`].
#[derive(Debug)]
pub struct StatsRecorder {
    started: Instant,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    messages_dropped: AtomicU64,
    messages_failed: AtomicU64,
    messages_unconfirmed: AtomicU64,
    active_streams: AtomicU64,
    last_activity_ms: AtomicU64,
    rtt: Mutex<RttStats>,
}

impl Default for StatsRecorder {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            messages_dropped: AtomicU64::new(0),
            messages_failed: AtomicU64::new(0),
            messages_unconfirmed: AtomicU64::new(0),
            active_streams: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            rtt: Mutex::new(RttStats::default()),
        }
    }
}

impl StatsRecorder {
    /// Counts one message of `bytes` sent.
    pub fn sent(&self, bytes: usize) {
        self.sent_many(1, bytes as u64);
    }

    /// Counts `n` messages of `bytes` in all sent.
    pub fn sent_many(&self, n: u64, bytes: u64) {
        self.messages_sent.fetch_add(n, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.touch();
    }

    /// Counts one message of `bytes` received.
    pub fn received(&self, bytes: usize) {
        self.received_many(1, bytes as u64);
    }

    /// Counts `n` messages of `bytes` in all received.
    pub fn received_many(&self, n: u64, bytes: u64) {
        self.messages_received.fetch_add(n, Ordering::Relaxed);
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.touch();
    }

    /// Counts one message dropped.
    pub fn dropped(&self) {
        self.dropped_many(1);
    }

    /// Counts `n` messages dropped.
    pub fn dropped_many(&self, n: u64) {
        self.messages_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` reliable messages accepted for delivery, now awaiting their receipts.
    pub fn accepted(&self, n: u64) {
        self.messages_unconfirmed.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back `n` [`accepted`](StatsRecorder::accepted) messages that could not be
    /// handed over after all (the sender got an error instead).
    pub fn unaccepted(&self, n: u64) {
        Self::sub(&self.messages_unconfirmed, n);
    }

    /// Counts `n` accepted messages taken by their receiver.
    pub fn confirmed(&self, n: u64) {
        Self::sub(&self.messages_unconfirmed, n);
    }

    /// Counts `n` accepted messages reported failed.
    pub fn failed(&self, n: u64) {
        self.messages_failed.fetch_add(n, Ordering::Relaxed);
        Self::sub(&self.messages_unconfirmed, n);
    }

    fn sub(counter: &AtomicU64, n: u64) {
        // Never wraps below zero, whatever the order of reports.
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// Counts a stream opened (`+1`) or closed (`-1`).
    pub fn stream_delta(&self, opened: bool) {
        if opened {
            self.active_streams.fetch_add(1, Ordering::Relaxed);
        } else {
            // Never wraps below zero even if a close is reported twice.
            let _ = self
                .active_streams
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Records one round-trip measurement.
    pub fn rtt_sample(&self, rtt: Duration) {
        let mut r = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        *r = r.merge(RttStats::sample(rtt));
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(Timestamp::now().0, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Stats {
        let sent = self.messages_sent.load(Ordering::Relaxed);
        let dropped = self.messages_dropped.load(Ordering::Relaxed);
        let offered = sent + dropped;
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        Stats {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            messages_sent: sent,
            messages_received: self.messages_received.load(Ordering::Relaxed),
            messages_dropped: dropped,
            messages_failed: self.messages_failed.load(Ordering::Relaxed),
            messages_unconfirmed: self.messages_unconfirmed.load(Ordering::Relaxed),
            rtt: *self.rtt.lock().unwrap_or_else(|p| p.into_inner()),
            packet_loss: if offered == 0 {
                0.0
            } else {
                dropped as f64 / offered as f64
            },
            congestion_window: None,
            active_streams: self.active_streams.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
            last_activity: (last > 0).then_some(Timestamp(last)),
            fallbacks_used: 0,
            unreachable_peers: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_with(loss: f64, rtt_ms: Option<u64>) -> Stats {
        let mut s = Stats {
            packet_loss: loss,
            ..Stats::default()
        };
        if let Some(ms) = rtt_ms {
            let d = Duration::from_millis(ms);
            s.rtt = RttStats {
                samples: 1,
                current: d,
                min: d,
                max: d,
                average: d,
            };
        }
        s
    }

    #[test]
    fn thresholds_decide_the_status() {
        let t = HealthThresholds::default();
        let h = |s: &Stats, peers| Health::assess(s, true, peers, 1, vec![], &t).status;
        assert_eq!(h(&stats_with(0.0, Some(5)), 2), HealthStatus::Healthy);
        assert_eq!(h(&stats_with(0.11, Some(5)), 2), HealthStatus::Unhealthy);
        assert_eq!(h(&stats_with(0.10, Some(5)), 2), HealthStatus::Healthy);
        assert_eq!(h(&stats_with(0.0, Some(101)), 2), HealthStatus::Degraded);
        assert_eq!(h(&stats_with(0.0, None), 0), HealthStatus::Degraded);
        assert_eq!(
            Health::assess(&stats_with(0.0, None), false, 3, 1, vec![], &t).status,
            HealthStatus::Unhealthy
        );
    }

    #[test]
    fn recorder_counts_and_averages() {
        let r = StatsRecorder::default();
        r.sent(10);
        r.sent(20);
        r.received(5);
        r.dropped();
        r.rtt_sample(Duration::from_micros(100));
        r.rtt_sample(Duration::from_micros(300));
        r.stream_delta(true);
        r.stream_delta(false);
        r.stream_delta(false);
        let s = r.snapshot();
        assert_eq!(
            (
                s.messages_sent,
                s.bytes_sent,
                s.messages_received,
                s.bytes_received
            ),
            (2, 30, 1, 5)
        );
        assert_eq!(s.messages_dropped, 1);
        assert!((s.packet_loss - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.rtt.samples, 2);
        assert_eq!(s.rtt.average, Duration::from_micros(200));
        assert_eq!(
            (s.rtt.min, s.rtt.max, s.rtt.current),
            (
                Duration::from_micros(100),
                Duration::from_micros(300),
                Duration::from_micros(300)
            )
        );
        assert_eq!(s.active_streams, 0);
        assert!(s.last_activity.is_some());
    }

    #[test]
    fn rtt_merge_is_weighted_and_cannot_overflow() {
        let a = RttStats {
            samples: u64::MAX / 2,
            ..RttStats::sample(Duration::from_micros(100))
        };
        let b = RttStats {
            samples: u64::MAX / 2,
            ..RttStats::sample(Duration::from_micros(300))
        };
        let m = a.merge(b);
        assert_eq!(m.average, Duration::from_micros(200));
        assert_eq!(m.samples, u64::MAX - 1);
        let three = RttStats {
            samples: 3,
            ..RttStats::sample(Duration::from_millis(1))
        }
        .merge(RttStats::sample(Duration::from_millis(5)));
        assert_eq!(three.average, Duration::from_millis(2));
        assert_eq!(
            (three.min, three.max),
            (Duration::from_millis(1), Duration::from_millis(5))
        );
    }

    #[test]
    fn unreachable_peers_degrade_health() {
        let t = HealthThresholds::default();
        let s = Stats {
            unreachable_peers: 1,
            ..Stats::default()
        };
        let h = Health::assess(&s, true, 2, 1, vec![], &t);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert!(h.message.contains("unreachable"), "{}", h.message);
        assert_eq!(
            Health::assess(&s, true, 0, 1, vec![], &t).status,
            HealthStatus::Unhealthy
        );
    }

    #[test]
    fn merge_adds_counters() {
        let a = Stats {
            messages_sent: 2,
            bytes_sent: 10,
            fallbacks_used: 1,
            ..Stats::default()
        };
        let b = Stats {
            messages_sent: 3,
            bytes_sent: 5,
            congestion_window: Some(12_000),
            ..Stats::default()
        };
        let m = a.merge(b);
        assert_eq!(
            (
                m.messages_sent,
                m.bytes_sent,
                m.fallbacks_used,
                m.congestion_window
            ),
            (5, 15, 1, Some(12_000))
        );
    }
}
