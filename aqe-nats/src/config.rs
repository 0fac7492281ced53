//! Configuration of a NATS endpoint: which servers, which fleet, how to authenticate, how
//! long to wait, what to bound.
//!
//! Field names follow the camelCase of definition files (`natsConfig`); durations are
//! milliseconds there.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use aqe_core::plumbing::{DEDUP_WINDOW, millis};
use aqe_core::{Error, Result, Token};
use aqe_link::{HostConfig, Introspection};
use aqe_session::{PeerExchange, WirePolicy};

/// Options of a NATS endpoint.
///
/// ```
/// let config: aqe_nats::NatsConfig = serde_json::from_str(
///     r#"{"servers": ["nats://10.0.0.5:4222"], "fleet": "qe", "token": "s3cret"}"#,
/// ).unwrap();
/// config.validate().unwrap();
/// assert_eq!(config.fleet, "qe");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`); the client connects to one and
    /// fails over to the others. Default `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// The fleet: every subject starts with `aqe.<fleet>.`, so fleets sharing a server never
    /// see each other. Letters, digits, `-` and `_`. Default `default`.
    pub fleet: String,
    /// The connection's name, as the server's monitoring shows it.
    pub name: Option<String>,
    /// A NATS credentials file (user JWT and NKey seed).
    pub credentials: Option<PathBuf>,
    /// A server token.
    pub token: Option<Token>,
    /// A user name (with `password`).
    pub user: Option<String>,
    /// The user's password.
    pub password: Option<Token>,
    /// TLS to the server.
    pub tls: NatsTls,
    /// How long connecting to a server may take.
    #[serde(with = "millis")]
    pub connection_timeout: Duration,
    /// How long a reliable send may wait for room in its window, and a stream write for
    /// credit.
    #[serde(with = "millis")]
    pub send_timeout: Duration,
    /// How often this endpoint announces itself on the fleet's presence subject.
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// How long an endpoint may stay silent before its agents are declared gone: requests to
    /// them fail at once and their unconfirmed messages go to the fallback or are reported.
    #[serde(with = "millis")]
    pub liveness_timeout: Duration,
    /// How long a reliable message may stay unacknowledged by the receiver's endpoint before
    /// it is sent again (NATS itself delivers at most once).
    #[serde(with = "millis")]
    pub retransmit_after: Duration,
    /// How long a reliable message accepted for delivery may take to be taken by its
    /// receiver before it is reported failed.
    #[serde(with = "millis")]
    pub delivery_deadline: Duration,
    /// Unsettled reliable messages one endpoint may send each agent of this one (announced
    /// in the hello; its senders wait beyond).
    pub window: u32,
    /// Bounds on what other endpoints can make this one hold.
    pub limits: NatsLimits,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            fleet: "default".to_owned(),
            name: None,
            credentials: None,
            token: None,
            user: None,
            password: None,
            tls: NatsTls::default(),
            connection_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(500),
            liveness_timeout: Duration::from_secs(3),
            retransmit_after: Duration::from_millis(500),
            delivery_deadline: Duration::from_secs(10),
            window: 1024,
            limits: NatsLimits::default(),
        }
    }
}

/// TLS between this endpoint and its NATS server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NatsTls {
    /// Refuse a server that does not offer TLS.
    pub required: bool,
    /// PEM certificate authority the server's certificate must chain to (else the system's
    /// roots).
    pub ca_path: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of `certPath`.
    pub key_path: Option<PathBuf>,
}

/// Bounds on what other endpoints of the fleet can make this one hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NatsLimits {
    /// Other endpoints this one has sessions with or greets; hellos and heartbeats from
    /// more are ignored. Default 1024.
    pub endpoints: u32,
    /// Agents one endpoint may announce. Default 4096.
    pub agents_per_endpoint: u32,
    /// Encoded registration bytes one endpoint may announce, all its agents together.
    /// Default 4 MiB.
    pub registration_bytes: u64,
    /// Encoded registration bytes of all endpoints together; beyond, announcements are
    /// ignored. Default 64 MiB.
    pub membership_bytes: u64,
    /// Requests of one endpoint held in hand (queued or running); further ones are answered
    /// "busy". Default 1024.
    pub requests_in_hand: u32,
    /// Unsettled reliable payload bytes one endpoint may have here (its senders wait
    /// beyond). Default 16 MiB.
    pub session_bytes: u64,
    /// Unsettled reliable payload bytes all endpoints together may have here. Default
    /// 256 MiB.
    pub endpoint_bytes: u64,
    /// Streams one endpoint may have open to this one's agents. Default 256.
    pub streams_per_endpoint: u32,
    /// Chunks a stream buffers before its writer waits for credit. Default 64.
    pub stream_window: u32,
}

impl Default for NatsLimits {
    fn default() -> Self {
        Self {
            endpoints: 1024,
            agents_per_endpoint: 4096,
            registration_bytes: 4 * 1024 * 1024,
            membership_bytes: 64 * 1024 * 1024,
            requests_in_hand: 1024,
            session_bytes: 16 * 1024 * 1024,
            endpoint_bytes: 256 * 1024 * 1024,
            streams_per_endpoint: 256,
            stream_window: 64,
        }
    }
}

/// Whether `s` can be one token of a NATS subject as aqe writes them.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl NatsConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(Error::config("servers", "name at least one server"));
        }
        if !is_token(&self.fleet) {
            return Err(Error::config(
                "fleet",
                "1 to 64 letters, digits, '-' or '_' (it is a subject token)",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::config("password", "user and password go together"));
        }
        if self.tls.cert_path.is_some() != self.tls.key_path.is_some() {
            return Err(Error::config(
                "tls.keyPath",
                "certPath and keyPath go together",
            ));
        }
        for (field, d) in [
            ("connectionTimeout", self.connection_timeout),
            ("sendTimeout", self.send_timeout),
            ("heartbeatInterval", self.heartbeat_interval),
            ("retransmitAfter", self.retransmit_after),
            ("deliveryDeadline", self.delivery_deadline),
        ] {
            if d.is_zero() {
                return Err(Error::config(field, "must be above zero"));
            }
        }
        if self.liveness_timeout < self.heartbeat_interval * 2 {
            return Err(Error::config(
                "livenessTimeout",
                "must be at least two heartbeat intervals, or one lost heartbeat would trip it",
            ));
        }
        if self.window == 0 || self.window as usize > DEDUP_WINDOW / 2 {
            return Err(Error::config(
                "window",
                format!(
                    "must be within 1..={} (half the receivers' duplicate window)",
                    DEDUP_WINDOW / 2
                ),
            ));
        }
        let l = &self.limits;
        for (field, v) in [
            ("limits.endpoints", l.endpoints),
            ("limits.agentsPerEndpoint", l.agents_per_endpoint),
            ("limits.requestsInHand", l.requests_in_hand),
            ("limits.streamsPerEndpoint", l.streams_per_endpoint),
            ("limits.streamWindow", l.stream_window),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        for (field, v) in [
            ("limits.registrationBytes", l.registration_bytes),
            ("limits.membershipBytes", l.membership_bytes),
            ("limits.sessionBytes", l.session_bytes),
            ("limits.endpointBytes", l.endpoint_bytes),
        ] {
            if v < 64 * 1024 {
                return Err(Error::config(field, "must be at least 64 KiB"));
            }
        }
        Ok(())
    }

    /// What the host of the endpoint is told: the session layer over a wire that delivers
    /// at most once, with a shared heartbeat, and no peer exchange (every endpoint of the
    /// fleet hears every other on the presence subject).
    pub(crate) fn host(&self) -> HostConfig {
        let l = &self.limits;
        HostConfig {
            session: aqe_session::Config {
                window: self.window,
                session_bytes: l.session_bytes,
                agents_per_peer: l.agents_per_endpoint,
                registration_bytes: l.registration_bytes,
                endpoint_bytes: l.endpoint_bytes,
                membership_bytes: l.membership_bytes,
                endpoints_per_peer: 0,
                requests_in_hand: l.requests_in_hand,
                heartbeat: self.heartbeat_interval,
                liveness: self.liveness_timeout,
                delivery_deadline: self.delivery_deadline,
                exchange: PeerExchange::Off,
                wire: WirePolicy {
                    retransmit_after: Some(self.retransmit_after),
                    ..WirePolicy::LOSSY
                },
                ..aqe_session::Config::default()
            },
            send_timeout: self.send_timeout,
            // Every member of a fleet was admitted by the server with the fleet's
            // credentials: its report is theirs to read, as its membership is.
            introspection: Introspection::Authenticated,
        }
    }
}
