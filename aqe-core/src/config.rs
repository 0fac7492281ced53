//! Configuration: the QUIC options, security, and agent definition files (JSON).
//!
//! Field names follow the camelCase of the definition files; durations are milliseconds there.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    AgentId, AgentType, Capability, Channel, Error, HealthThresholds, Registration, Result,
};

/// Durations as whole milliseconds in configuration files.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A secret token, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

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
    /// Requests of one peer's request lane held in hand (queued or running); further ones are
    /// answered "busy". Default 1024.
    pub requests_in_hand: u32,
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
        }
    }
}

impl QuicLimits {
    fn validate(&self) -> Result<()> {
        let checks: [(&str, u32, u32); 8] = [
            ("maxConnections", self.max_connections, 1),
            ("maxHandshakes", self.max_handshakes, 1),
            ("helloFrame", self.hello_frame, 1024),
            ("controlFrame", self.control_frame, 128 * 1024),
            ("agentsPerPeer", self.agents_per_peer, 1),
            ("endpointsPerPeer", self.endpoints_per_peer, 0),
            ("concurrentDials", self.concurrent_dials, 1),
            ("requestsInHand", self.requests_in_hand, 1),
        ];
        for (field, value, min) in checks {
            if value < min {
                return Err(Error::config(field, format!("must be at least {min}")));
            }
        }
        for (field, value) in [
            ("helloFrame", self.hello_frame),
            ("controlFrame", self.control_frame),
        ] {
            if value as usize > crate::MAX_FRAME_LEN {
                return Err(Error::config(
                    field,
                    format!("must be at most {}", crate::MAX_FRAME_LEN),
                ));
            }
        }
        Ok(())
    }
}

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
    /// From nobody: every connection is configured or dialed by hand.
    Off,
}

/// Options of the QUIC transport, and the channels of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct QuicConfig {
    /// Whether QUIC is used at all (opt-in; the event bus serves otherwise).
    pub enabled: bool,
    /// Host or IP to listen on.
    pub host: String,
    /// UDP port to listen on; 0 picks a free one.
    pub port: u16,
    /// The agent's channels: preset names or full definitions. Default: the three presets.
    #[serde(deserialize_with = "deserialize_channels")]
    pub channels: Vec<Channel>,
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
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".to_owned(),
            port: 0,
            channels: default_channels(),
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
        }
    }
}

/// The three presets: `coordination`, `results`, `metrics`.
pub fn default_channels() -> Vec<Channel> {
    vec![
        Channel::coordination(),
        Channel::results(),
        Channel::metrics(),
    ]
}

impl QuicConfig {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let mut probe = Registration::new("probe", "probe");
        probe.channels = self.channels.clone();
        probe.validate()?;
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
        if self.window == 0 || self.window as usize > crate::DEDUP_WINDOW / 2 {
            return Err(Error::config(
                "window",
                format!(
                    "must be within 1..={} (half the receivers' duplicate window)",
                    crate::DEDUP_WINDOW / 2
                ),
            ));
        }
        self.limits
            .validate()
            .map_err(|e| e.in_config(None, "limits."))?;
        self.security
            .validate()
            .map_err(|e| e.in_config(None, "security."))
    }
}

fn deserialize_channels<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Channel>, D::Error> {
    Ok(Vec::<ChannelSpec>::deserialize(d)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

/// A channel given by preset name or in full.
struct ChannelSpec(Channel);

impl<'de> Deserialize<'de> for ChannelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = ChannelSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a preset name (coordination, results, metrics) or a channel object")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<ChannelSpec, E> {
                Channel::preset(s).map(ChannelSpec).ok_or_else(|| {
                    E::custom(format!(
                        "unknown channel preset {s:?}; expected coordination, results or metrics, or a full channel object"
                    ))
                })
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<ChannelSpec, A::Error> {
                Channel::deserialize(de::value::MapAccessDeserializer::new(map)).map(ChannelSpec)
            }
        }
        d.deserialize_any(SpecVisitor)
    }
}

/// An agent as described by a definition file.
///
/// ```
/// let def = aqe_core::AgentDefinition::from_json(r#"{
///     "agentType": "qe-test-executor",
///     "enableQUIC": true,
///     "quicConfig": { "host": "localhost", "port": 9000, "channels": ["coordination", "results"] }
/// }"#, None)?;
/// assert!(def.enable_quic);
/// assert_eq!(def.quic_config.channels.len(), 2);
/// # Ok::<(), aqe_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentDefinition {
    /// The agent's id; generated from its type when absent.
    #[serde(default)]
    pub id: Option<AgentId>,
    /// Its type.
    pub agent_type: AgentType,
    /// What it can do.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Whether to use QUIC (opt-in).
    #[serde(default, rename = "enableQUIC")]
    pub enable_quic: bool,
    /// QUIC options and the agent's channels.
    #[serde(default)]
    pub quic_config: QuicConfig,
    /// Health thresholds.
    #[serde(default)]
    pub health: HealthThresholds,
    /// Free-form labels, visible to peers.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl AgentDefinition {
    /// Parses and checks a definition; `file` only serves to name the file in errors.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file (if given) and the field path.
    pub fn from_json(text: &str, file: Option<&Path>) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let mut def: AgentDefinition = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::Configuration {
                file: file.map(Path::to_path_buf),
                field: if path == "." {
                    "(document)".to_owned()
                } else {
                    path
                },
                message: e.into_inner().to_string(),
            }
        })?;
        // The flag outside and the one inside quicConfig mean the same thing.
        def.quic_config.enabled |= def.enable_quic;
        def.enable_quic = def.quic_config.enabled;
        def.quic_config
            .validate()
            .map_err(|e| e.in_config(file, "quicConfig."))?;
        Ok(def)
    }

    /// Reads a definition file. This is blocking I/O, meant for start-up; async code reads the
    /// text itself and calls [`AgentDefinition::from_json`].
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file, and the field when the content is wrong.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Configuration {
            file: Some(path.to_path_buf()),
            field: "(file)".to_owned(),
            message: e.to_string(),
        })?;
        Self::from_json(&text, Some(path))
    }

    /// The registration of the agent this definition describes.
    pub fn registration(&self) -> Registration {
        Registration {
            id: self
                .id
                .clone()
                .unwrap_or_else(|| AgentId::generate(&self.agent_type)),
            agent_type: self.agent_type.clone(),
            capabilities: self.capabilities.clone(),
            channels: self.quic_config.channels.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChannelKind;

    fn err_of(json: &str) -> (String, String) {
        match AgentDefinition::from_json(json, Some(Path::new("agents/x.json"))) {
            Err(Error::Configuration {
                file,
                field,
                message,
            }) => {
                assert_eq!(file.as_deref(), Some(Path::new("agents/x.json")));
                (field, message)
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn the_guides_definition_loads() {
        let def = AgentDefinition::from_json(
            r#"{"agentType":"qe-test-executor","enableQUIC":true,
                "quicConfig":{"host":"localhost","port":9000,"channels":["coordination","results","metrics"]}}"#,
            None,
        )
        .expect("valid");
        assert!(def.enable_quic && def.quic_config.enabled);
        assert_eq!(def.quic_config.port, 9000);
        assert_eq!(def.quic_config.channels, default_channels());
        assert!(
            def.registration()
                .id
                .as_str()
                .starts_with("qe-test-executor-")
        );
    }

    #[test]
    fn full_channels_and_options_load() {
        let def = AgentDefinition::from_json(
            r#"{"id":"w1","agentType":"worker","capabilities":["lint"],
                "quicConfig":{"channels":["metrics",{"name":"alerts","type":"unicast","priority":9,"ordered":false}],
                "connectionTimeout":2500,"enable0RTT":false,"maxConcurrentStreams":8,
                "security":{"enableTokenAuth":true,"token":"s3cret"}},
                "health":{"unhealthyLoss":0.2,"degradedRttMs":50}}"#,
            None,
        )
        .expect("valid");
        let alerts = &def.quic_config.channels[1];
        assert_eq!(
            (
                alerts.kind,
                alerts.priority.get(),
                alerts.ordered,
                alerts.reliable
            ),
            (ChannelKind::Unicast, 9, false, true)
        );
        assert_eq!(
            def.quic_config.connection_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(def.health.degraded_rtt, Duration::from_millis(50));
        assert!(
            !format!("{def:?}").contains("s3cret"),
            "tokens are never printed"
        );
        assert!(!def.enable_quic);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let (field, msg) = err_of(
            r#"{"agentType":"w","quicConfig":{"channels":["coordination",{"name":"x","type":"unicast","priority":12}]}}"#,
        );
        assert_eq!(field, "quicConfig.channels[1].priority");
        assert!(msg.contains("0..=9"), "{msg}");
        let (field, msg) = err_of(r#"{"agentType":"w","quicConfig":{"channels":["bogus"]}}"#);
        assert_eq!(field, "quicConfig.channels[0]");
        assert!(msg.contains("bogus"), "{msg}");
        let (field, _) = err_of(r#"{"agentType":"w","quicConfig":{"prot":1}}"#);
        assert_eq!(field, "quicConfig.prot");
        let (field, _) = err_of(r#"{"quicConfig":{}}"#);
        assert_eq!(field, "(document)");
        let (field, _) =
            err_of(r#"{"agentType":"w","quicConfig":{"security":{"enableTokenAuth":true}}}"#);
        assert_eq!(field, "quicConfig.security.token");
        let (field, _) =
            err_of(r#"{"agentType":"w","quicConfig":{"security":{"enableTLS":false}}}"#);
        assert_eq!(field, "quicConfig.security.enableTLS");
        let (field, _) =
            err_of(r#"{"agentType":"w","quicConfig":{"channels":["metrics","metrics"]}}"#);
        assert_eq!(field, "quicConfig.channels[1].name");
        let (field, _) = err_of("{not json");
        assert!(!field.is_empty());
    }

    #[test]
    fn the_readme_example_definition_is_valid() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let start = readme
            .find("```json\n")
            .expect("a JSON example in the README")
            + "```json\n".len();
        let end = start + readme[start..].find("```").expect("closed");
        let def = AgentDefinition::from_json(&readme[start..end], Some(Path::new("README.md")))
            .expect("valid");
        assert_eq!(def.quic_config.channels.len(), 3);
        assert_eq!(def.quic_config.send_timeout, Duration::from_secs(5));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.json");
        match AgentDefinition::from_file(&path) {
            Err(Error::Configuration { file, .. }) => {
                assert_eq!(file.as_deref(), Some(path.as_path()))
            }
            other => panic!("{other:?}"),
        }
    }
}
