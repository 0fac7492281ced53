//! What a node and its sessions are told: limits, timers, and the policy of the wire that
//! carries them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whose word an endpoint takes about other endpoints (their addresses and agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerExchange {
    /// Only from peers that proved who they are: with a token, with a client certificate
    /// (mutual TLS), or by the server certificate this endpoint verified when it dialed them.
    #[default]
    Authenticated,
    /// From any peer, authenticated or not. A stranger could then point this endpoint at any
    /// address (it still verifies the certificate of whatever it dials).
    All,
    /// From nobody, and nothing is relayed: every link is configured or dialed by hand.
    Off,
}

/// How the wire under the sessions behaves, and so what the sessions do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WirePolicy {
    /// A wire that may lose frames (NATS): reliable messages not acknowledged as received
    /// this long after they were sent go again, and messages received but not acknowledged
    /// as taken after four times this long (the acknowledgement may have been lost). `None`
    /// on a wire that loses nothing while its link lives (QUIC).
    pub retransmit_after: Option<Duration>,
    /// Whether receivers acknowledge what they received (not only what was taken): needed to
    /// know what to send again.
    pub ack_received: bool,
    /// Whether sessions send their own heartbeats (QUIC). A wire with a shared heartbeat
    /// (NATS presence) tells sessions what it heard instead.
    pub pings: bool,
    /// Acknowledgements wait this long to share a frame while traffic keeps coming (zero: go
    /// with the next transmission).
    pub ack_delay: Duration,
    /// The last acknowledgements of a burst wait at most this long.
    pub ack_linger: Duration,
    /// This many pending acknowledgements go at once.
    pub ack_batch: usize,
}

impl WirePolicy {
    /// A wire that loses nothing while its link lives and orders each lane (QUIC streams):
    /// acknowledgements batched briefly (1 ms while traffic flows, 2 ms at the end of a
    /// burst, or 128 at once), so that acknowledging stays off the path of what still
    /// arrives.
    pub const RELIABLE: Self = Self {
        retransmit_after: None,
        ack_received: false,
        pings: true,
        ack_delay: Duration::from_millis(1),
        ack_linger: Duration::from_millis(2),
        ack_batch: 128,
    };

    /// A wire that delivers at most once, in order per publisher, with a shared heartbeat
    /// (core NATS): 500 ms before sending again, acknowledgements batched (2 ms while
    /// traffic flows, 20 ms at the end of a burst, or 256 at once).
    pub const LOSSY: Self = Self {
        retransmit_after: Some(Duration::from_millis(500)),
        ack_received: true,
        pings: false,
        ack_delay: Duration::from_millis(2),
        ack_linger: Duration::from_millis(20),
        ack_batch: 256,
    };
}

/// Limits, timers and policy of a node and its sessions. Every limit bounds something a
/// peer can make this endpoint hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Unsettled reliable messages accepted per receiving local agent and session
    /// (announced in the hello; senders wait beyond it).
    pub window: u32,
    /// Unsettled reliable payload bytes accepted per session, all agents together
    /// (announced; senders wait beyond it).
    pub session_bytes: u64,
    /// Agents one peer may announce.
    pub agents_per_peer: u32,
    /// Encoded registration bytes one peer may announce, all agents together.
    pub registration_bytes: u64,
    /// Inbound payload bytes the endpoint holds for all its sessions together: unsettled
    /// reliable messages, parked frames, requests in hand. Beyond, refused (`Overflow`).
    pub endpoint_bytes: u64,
    /// Encoded registration bytes of all peers' agents together; beyond, announcements are
    /// ignored.
    pub membership_bytes: u64,
    /// Endpoints one peer may tell of (peer exchange).
    pub endpoints_per_peer: u32,
    /// Requests one peer may have in hand here (queued or running); beyond, answered busy.
    pub requests_in_hand: u32,
    /// Frames held per session while the sender's membership announcement is on its way;
    /// beyond, refused.
    pub parked: u32,
    /// How often a heartbeat goes (at least every third of the peer's liveness timeout).
    pub heartbeat: Duration,
    /// Silence after which a peer is declared gone.
    pub liveness: Duration,
    /// How long an accepted reliable message may take to be taken, redeliveries included,
    /// before it is reported failed.
    pub delivery_deadline: Duration,
    /// Whose word about other endpoints is taken.
    pub exchange: PeerExchange,
    /// What the wire needs.
    pub wire: WirePolicy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: 1024,
            session_bytes: 64 * 1024 * 1024,
            agents_per_peer: 4096,
            registration_bytes: 4 * 1024 * 1024,
            endpoint_bytes: 256 * 1024 * 1024,
            membership_bytes: 64 * 1024 * 1024,
            endpoints_per_peer: 1024,
            requests_in_hand: 1024,
            parked: 1024,
            heartbeat: Duration::from_millis(500),
            liveness: Duration::from_secs(3),
            delivery_deadline: Duration::from_secs(10),
            exchange: PeerExchange::Authenticated,
            wire: WirePolicy::RELIABLE,
        }
    }
}

/// Snapshots are split so that each part holds at most this many encoded registration
/// bytes.
pub const SNAPSHOT_PART_BYTES: usize = 128 * 1024;
/// Most parts one snapshot may have.
pub const MAX_SNAPSHOT_PARTS: u16 = 256;
/// The largest registration one agent may announce, encoded.
pub const MAX_REGISTRATION: usize = 64 * 1024;
/// A probe of an older incarnation is answered within this long at least (and within four
/// round trips), or the incarnation is declared replaced.
pub const PROBE_MIN: Duration = Duration::from_millis(250);
/// Largest span one acknowledgement range may cover; also how far above its own `low` a
/// message may be numbered, which bounds what a receiver remembers of a session's messages
/// (their fates, until `low` passes them) whatever the sender does.
pub const MAX_RANGE_SPAN: u64 = 1 << 20;
