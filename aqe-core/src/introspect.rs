//! What an endpoint says about itself when asked: the answer to a request addressed to its
//! introspection id (`aqe.endpoint.<endpoint>`, PROTOCOL.md section 4.11), read by tools such
//! as `aqe stats` and `aqe top`. It travels as a JSON payload, so any tool can read it, and
//! only to the peers the endpoint's configuration allows.

use serde::{Deserialize, Serialize};

use crate::{AgentId, AgentType, Stats};

/// An endpoint's report: its links and its agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// The endpoint's id (hex).
    pub endpoint: String,
    /// The transport (`QUIC`, ...).
    pub transport: String,
    /// Where it listens, if it does.
    pub listen: Option<String>,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Its links to other endpoints.
    pub links: Vec<LinkReport>,
    /// The agents it hosts.
    pub agents: Vec<AgentReport>,
}

/// One link to another endpoint, as the transport measures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The remote endpoint's address.
    pub addr: String,
    /// Latest round-trip time, microseconds.
    pub rtt_us: u64,
    /// Smoothed round-trip time, microseconds.
    pub smoothed_rtt_us: u64,
    /// Congestion window, bytes.
    pub congestion_window: u64,
    /// Packets sent on it.
    pub packets_sent: u64,
    /// Packets it lost.
    pub packets_lost: u64,
}

/// One hosted agent and its statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Its id.
    pub id: AgentId,
    /// Its type.
    pub agent_type: AgentType,
    /// Its traffic statistics.
    pub stats: Stats,
}
