//! Configuration of a QUIC endpoint: options, security, bounds.
//!
//! Field names follow the camelCase of definition files; durations are milliseconds there.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use aqe_core::plumbing::{DEDUP_WINDOW, millis};
use aqe_core::{Error, Result, Token};
use aqe_link::{HostConfig, Introspection};
pub use aqe_session::PeerExchange;
use aqe_session::{Config, WirePolicy};

use crate::codec::MAX_FRAME_LEN;

/// Security of QUIC links. TLS 1.3 is always on; these options choose certificates, peer
/// verification and token authentication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Must stay true: QUIC cannot run without TLS 1.3, and a request to turn it off is
    /// refused rather than ignored.
    #[serde(rename = "enableTLS")]
    pub enable_tls: bool,
    /// PEM certificate chain of this endpoint. Without it a self-signed one is generated.
    pub cert_path: Option<PathBuf>,
    /// PEM private key matching `cert_path`.
    pub key_path: Option<PathBuf>,
    /// PEM certificate authority that peers' certificates must chain to.
    pub ca_path: Option<PathBuf>,
    /// Mutual TLS: both sides present certificates, checked against `ca_path`.
    pub verify_peer: bool,
    /// Require a shared token as the first exchange on every connection.
    pub enable_token_auth: bool,
    /// The shared token.
    pub token: Option<Token>,
    /// The name every endpoint's certificate must carry; dialers check it. Default `localhost`.
    pub server_name: String,
    /// Dialers check that the listener's certificate names the IP address they dial (as
    /// `aqe certs issue --ip` puts it) instead of `server_name`: a certificate stolen from
    /// one host does not serve on another. Default off.
    pub check_address: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            enable_tls: true,
            cert_path: None,
            key_path: None,
            ca_path: None,
            verify_peer: false,
            enable_token_auth: false,
            token: None,
            server_name: "localhost".to_owned(),
            check_address: false,
        }
    }
}

impl SecurityConfig {
    /// Checks that the options are coherent.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field (relative to `security`).
    pub fn validate(&self) -> Result<()> {
        if !self.enable_tls {
            return Err(Error::config(
                "enableTLS",
                "QUIC always uses TLS 1.3; it cannot be turned off",
            ));
        }
        if self.cert_path.is_some() != self.key_path.is_some() {
            let field = if self.cert_path.is_some() {
                "keyPath"
            } else {
                "certPath"
            };
            return Err(Error::config(field, "certPath and keyPath go together"));
        }
        if self.verify_peer && self.ca_path.is_none() {
            return Err(Error::config(
                "caPath",
                "verifyPeer needs a CA to verify against",
            ));
        }
        if self.verify_peer && self.cert_path.is_none() {
            return Err(Error::config(
                "certPath",
                "verifyPeer (mutual TLS) needs this endpoint's own certificate",
            ));
        }
        if self.server_name.is_empty() {
            return Err(Error::config("serverName", "cannot be empty"));
        }
        if self.cert_path.is_some() && self.ca_path.is_none() {
            return Err(Error::config(
                "caPath",
                "a configured certificate needs a CA to verify peers against",
            ));
        }
        if self.enable_token_auth && self.token.as_ref().is_none_or(|t| t.expose().is_empty()) {
            return Err(Error::config(
                "token",
                "enableTokenAuth needs a non-empty token",
            ));
        }
        Ok(())
    }
}

/// Bounds on what peers can make a QUIC endpoint hold or do. Every resource a peer drives is
/// bounded by one of these (or by the window, the request lane's limit or a stream limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct QuicLimits {
    /// Connections open at once; further connection attempts are refused. Default 1024.
    pub max_connections: u32,
    /// TLS handshakes in progress at once; beyond, new attempts must first prove their
    /// address (a QUIC Retry), and beyond twice this they are dropped. Default 64.
    pub max_handshakes: u32,
    /// Largest hello frame accepted, before the peer is authenticated (a hello holds no
    /// agent list: membership follows it). Default 16 KiB.
    pub hello_frame: u32,
    /// Largest control frame (an agent's announcement, say) accepted. Default 256 KiB.
    pub control_frame: u32,
    /// Agents one peer endpoint may announce. Default 4096.
    pub agents_per_peer: u32,
    /// Other endpoints one peer may tell this endpoint about (peer exchange). Default 1024.
    pub endpoints_per_peer: u32,
    /// Connections being dialed at once. Default 16.
    pub concurrent_dials: u32,
    /// Requests of one peer held in hand (queued or running); further ones are answered
    /// "busy". Default 1024.
    pub requests_in_hand: u32,
    /// Unsettled reliable payload bytes one peer may have this endpoint hold (announced in
    /// the hello; senders wait beyond it). Default 16 MiB.
    pub session_bytes: u64,
    /// Unsettled reliable payload bytes all peers together may have this endpoint hold;
    /// beyond, messages are refused (their senders report them failed). Default 256 MiB.
    pub endpoint_bytes: u64,
    /// Encoded registration bytes one peer may announce, all its agents together. Default
    /// 4 MiB.
    pub registration_bytes: u64,
    /// Encoded registration bytes of all peers together; beyond, announcements are ignored.
    /// Default 64 MiB.
    pub membership_bytes: u64,
    /// Frames held per peer while the announcement of their sending agent is on its way;
    /// beyond, refused. Default 1024, the default window: a lost control packet can hold
    /// an announcement back while a window's worth of the new agent's messages arrives.
    pub parked: u32,
    /// Bytes of received datagrams each of the endpoint's two sockets (listening, dialing)
    /// buffers inside s2n-quic before the endpoint reads them. s2n-quic's default, 8 MiB per
    /// socket, is allocated and zeroed when the endpoint starts: most of an endpoint's start
    /// time and memory. Default 1 MiB (enough for loopback at full speed; raise it for
    /// long fat links).
    pub socket_buffer: u32,
    /// Bytes a peer may send on one connection (and on each of its streams) ahead of what
    /// the endpoint has read: QUIC's flow-control windows, which s2n-quic buffers. With
    /// `maxConnections`, it bounds what connections can make s2n-quic hold. Each socket
    /// asks the kernel for twice this as its receive buffer (`SO_RCVBUF`, within
    /// `net.core.rmem_max`), so that a peer's whole window in flight fits with the kernel's
    /// overhead per packet. Default 2 MiB (a full window at 100 MB/s and 20 ms; raise it for
    /// long fat links).
    pub connection_window: u32,
    /// Bytes s2n-quic holds per stream that this endpoint wrote, unsent or unacknowledged.
    /// A higher-priority frame overtakes lower-priority data still waiting in aqe, but
    /// shares the connection with what s2n-quic already holds (it sends its streams
    /// round-robin): this bounds that share. Default 1 MiB (one stream then moves at most
    /// 1 MiB per round trip: about 100 MB/s at 10 ms; raise it for long fat links).
    pub stream_send_buffer: u32,
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 64,
            hello_frame: 16 * 1024,
            control_frame: 256 * 1024,
            agents_per_peer: 4096,
            endpoints_per_peer: 1024,
            concurrent_dials: 16,
            requests_in_hand: 1024,
            session_bytes: 16 << 20,
            endpoint_bytes: 256 << 20,
            registration_bytes: 4 << 20,
            membership_bytes: 64 << 20,
            parked: 1024,
            socket_buffer: 1 << 20,
            connection_window: 2 << 20,
            stream_send_buffer: 1 << 20,
        }
    }
}

impl QuicLimits {
    /// Checks the bounds.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let checks: [(&str, u32, u32); 12] = [
            ("maxConnections", self.max_connections, 1),
            ("maxHandshakes", self.max_handshakes, 1),
            ("helloFrame", self.hello_frame, 1024),
            ("controlFrame", self.control_frame, 128 * 1024),
            ("agentsPerPeer", self.agents_per_peer, 1),
            ("endpointsPerPeer", self.endpoints_per_peer, 0),
            ("concurrentDials", self.concurrent_dials, 1),
            ("requestsInHand", self.requests_in_hand, 1),
            ("socketBuffer", self.socket_buffer, 64 * 1024),
            ("parked", self.parked, 1),
            ("connectionWindow", self.connection_window, 64 * 1024),
            ("streamSendBuffer", self.stream_send_buffer, 64 * 1024),
        ];
        for (field, value, min) in checks {
            if value < min {
                return Err(Error::config(field, format!("must be at least {min}")));
            }
        }
        for (field, value, min) in [
            ("sessionBytes", self.session_bytes, 64 * 1024),
            ("endpointBytes", self.endpoint_bytes, 64 * 1024),
            ("registrationBytes", self.registration_bytes, 64 * 1024),
            ("membershipBytes", self.membership_bytes, 64 * 1024),
        ] {
            if value < min {
                return Err(Error::config(field, format!("must be at least {min}")));
            }
        }
        for (field, value) in [
            ("helloFrame", self.hello_frame),
            ("controlFrame", self.control_frame),
        ] {
            if value as usize > MAX_FRAME_LEN {
                return Err(Error::config(
                    field,
                    format!("must be at most {}", MAX_FRAME_LEN),
                ));
            }
        }
        Ok(())
    }
}

/// Options of a QUIC endpoint: where it listens, whom it dials, how long it waits, what it
/// bounds, and its [`SecurityConfig`]. In an agent definition file these are the
/// `quicConfig` object (whose `channels` belong to the agent, not to the endpoint).
///
/// ```
/// let config: aqe_quic::QuicConfig = serde_json::from_str(
///     r#"{"host": "0.0.0.0", "port": 4433, "livenessTimeout": 2000}"#,
/// ).unwrap();
/// assert_eq!(config.port, 4433);
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct QuicConfig {
    /// Host or IP to listen on.
    pub host: String,
    /// UDP port to listen on; 0 picks a free one.
    pub port: u16,
    /// How long a connection attempt may take.
    #[serde(with = "millis")]
    pub connection_timeout: Duration,
    /// How long a silent connection lives before the peer is declared gone.
    #[serde(with = "millis")]
    pub idle_timeout: Duration,
    /// How long a reliable send may wait for the receiver (flow control, a full inbox).
    #[serde(with = "millis")]
    pub send_timeout: Duration,
    /// 0-RTT early data on resumed connections.
    #[serde(rename = "enable0RTT")]
    pub enable_0rtt: bool,
    /// Follow a peer whose address changes.
    pub enable_migration: bool,
    /// Streams a peer may have open at once on a connection.
    pub max_concurrent_streams: u32,
    /// How often each side of a connection proves it is alive (a heartbeat on the control
    /// stream).
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// How long a connection may stay silent (no heartbeat, acknowledgement or other control
    /// frame) before its peer is declared unreachable: requests to it fail at once, and its
    /// agents leave. A few heartbeats, so that loss alone does not trigger it.
    #[serde(with = "millis")]
    pub liveness_timeout: Duration,
    /// How long a reliable message accepted for delivery may take to reach its receiver,
    /// redeliveries after a connection failure included, before it is reported failed.
    #[serde(with = "millis")]
    pub delivery_deadline: Duration,
    /// Reliable messages a sender may have unacknowledged per receiving agent and connection;
    /// a full window makes the sender wait (up to `sendTimeout`).
    pub window: u32,
    /// Addresses (`host:port`) of endpoints to connect to at start.
    pub bootstrap_peers: Vec<String>,
    /// Whose word this endpoint takes about other endpoints (default: authenticated peers).
    pub peer_exchange: PeerExchange,
    /// Bounds on what peers can make this endpoint hold or do.
    pub limits: QuicLimits,
    /// Certificates, verification, tokens.
    pub security: SecurityConfig,
    /// Who may read this endpoint's report (`aqe stats`, `aqe top`): `"verified"` (peers
    /// whose certificate it verified: mutual TLS; the default), `"authenticated"` (token
    /// holders too), `"nobody"`, or a list of endpoint keys (16 hex digits each).
    pub introspection: IntrospectionConfig,
}

/// Who may read an endpoint's report, as a definition file says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntrospectionConfig {
    /// `"verified"` (the default), `"authenticated"` or `"nobody"`.
    Who(IntrospectionWho),
    /// Keys (16 hex digits each, as `aqe peers` shows endpoint ids' first half).
    Keys(Vec<String>),
}

impl Default for IntrospectionConfig {
    fn default() -> Self {
        Self::Who(IntrospectionWho::Verified)
    }
}

/// A class of peers that may read an endpoint's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntrospectionWho {
    /// Peers whose certificate this endpoint verified (mutual TLS).
    Verified,
    /// Peers that proved who they are in any way (a token included).
    Authenticated,
    /// Nobody.
    Nobody,
}

impl IntrospectionConfig {
    /// The policy it stands for.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a key that is not 16 hex digits.
    pub fn policy(&self) -> Result<Introspection> {
        Ok(match self {
            IntrospectionConfig::Who(IntrospectionWho::Verified) => Introspection::Verified,
            IntrospectionConfig::Who(IntrospectionWho::Authenticated) => {
                Introspection::Authenticated
            }
            IntrospectionConfig::Who(IntrospectionWho::Nobody) => Introspection::Nobody,
            IntrospectionConfig::Keys(keys) => Introspection::Keys(
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| {
                        u64::from_str_radix(k, 16)
                            .ok()
                            .filter(|_| k.len() == 16)
                            .ok_or_else(|| {
                                Error::config(format!("[{i}]"), "an endpoint key is 16 hex digits")
                            })
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 0,
            connection_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(5),
            enable_0rtt: false,
            enable_migration: false,
            max_concurrent_streams: 100,
            heartbeat_interval: Duration::from_millis(500),
            liveness_timeout: Duration::from_secs(3),
            delivery_deadline: Duration::from_secs(10),
            window: 1024,
            bootstrap_peers: Vec::new(),
            peer_exchange: PeerExchange::default(),
            limits: QuicLimits::default(),
            security: SecurityConfig::default(),
            introspection: IntrospectionConfig::default(),
        }
    }
}

impl QuicConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.connection_timeout.is_zero() {
            return Err(Error::config("connectionTimeout", "must be above zero"));
        }
        if self.send_timeout.is_zero() {
            return Err(Error::config("sendTimeout", "must be above zero"));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::config("idleTimeout", "must be above zero"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(Error::config("maxConcurrentStreams", "must be above zero"));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(Error::config("heartbeatInterval", "must be above zero"));
        }
        if self.liveness_timeout < self.heartbeat_interval * 2 {
            return Err(Error::config(
                "livenessTimeout",
                "must be at least two heartbeat intervals, or loss alone would trip it",
            ));
        }
        if self.delivery_deadline.is_zero() {
            return Err(Error::config("deliveryDeadline", "must be above zero"));
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
        self.limits
            .validate()
            .map_err(|e| e.in_config(None, "limits."))?;
        self.introspection
            .policy()
            .map_err(|e| e.in_config(None, "introspection"))?;
        self.security
            .validate()
            .map_err(|e| e.in_config(None, "security."))
    }

    /// What the session layer is told: these limits and timers over a wire that loses
    /// nothing while a connection lives.
    pub(crate) fn host(&self) -> Result<HostConfig> {
        let l = &self.limits;
        Ok(HostConfig {
            session: Config {
                window: self.window,
                session_bytes: l.session_bytes,
                agents_per_peer: l.agents_per_peer,
                registration_bytes: l.registration_bytes,
                endpoint_bytes: l.endpoint_bytes,
                membership_bytes: l.membership_bytes,
                endpoints_per_peer: l.endpoints_per_peer,
                requests_in_hand: l.requests_in_hand,
                parked: l.parked,
                heartbeat: self.heartbeat_interval,
                liveness: self.liveness_timeout,
                delivery_deadline: self.delivery_deadline,
                exchange: self.peer_exchange,
                wire: WirePolicy::RELIABLE,
            },
            send_timeout: self.send_timeout,
            introspection: self.introspection.policy()?,
        })
    }
}
