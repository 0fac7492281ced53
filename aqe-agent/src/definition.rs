//! Agent definition files: who an agent is, its channels, and the transports it uses.
//!
//! The file layout is the guide's: `agentType`, `capabilities`, `enableQUIC` and a
//! `quicConfig` object whose `channels` are the agent's channels and whose other fields are
//! the QUIC endpoint's options (`aqe_quic::QuicConfig`). Channels may also be given at the
//! top level as `channels`. A `natsConfig` object (`aqe_nats::NatsConfig`: servers, fleet,
//! credentials, TLS) adds the NATS fallback. Each transport section is read by the crate of that transport,
//! so a build without that transport's feature cannot check it: it is then ignored, with a
//! warning when the definition asks for the transport.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use aqe_core::{
    AgentId, AgentType, Capability, Channel, Error, HealthThresholds, Registration, Result,
    default_channels,
};

/// An agent as described by a definition file.
///
/// ```
/// let def = aqe_agent::AgentDefinition::from_json(r#"{
///     "agentType": "qe-test-executor",
///     "enableQUIC": true,
///     "quicConfig": { "host": "localhost", "port": 9000, "channels": ["coordination", "results"] }
/// }"#, None)?;
/// assert!(def.enable_quic);
/// assert_eq!(def.channels.len(), 2);
/// # Ok::<(), aqe_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AgentDefinition {
    /// The agent's id; generated from its type when absent.
    pub id: Option<AgentId>,
    /// Its type.
    pub agent_type: AgentType,
    /// What it can do.
    pub capabilities: Vec<Capability>,
    /// Its channels (`quicConfig.channels` or `channels`); the three presets when absent.
    pub channels: Vec<Channel>,
    /// Health thresholds.
    pub health: HealthThresholds,
    /// Free-form labels, visible to peers.
    pub metadata: BTreeMap<String, String>,
    /// Whether the agent asks for QUIC (`enableQUIC`, or `quicConfig.enabled`).
    pub enable_quic: bool,
    /// The QUIC endpoint's options (`quicConfig` without its `channels`).
    #[cfg(feature = "quic")]
    pub quic_config: aqe_quic::QuicConfig,
    /// The NATS connection (`natsConfig`): when present, the agent also joins its fleet on
    /// that server, as the fallback after QUIC.
    #[cfg(feature = "nats")]
    pub nats_config: Option<aqe_nats::NatsConfig>,
}

/// The file as written, before each transport's section is handed to its crate.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default)]
    id: Option<AgentId>,
    #[serde(alias = "type")]
    agent_type: AgentType,
    #[serde(default)]
    capabilities: Vec<Capability>,
    #[serde(default, rename = "enableQUIC")]
    enable_quic: bool,
    #[serde(default, deserialize_with = "deserialize_channels")]
    channels: Option<Vec<Channel>>,
    #[serde(default)]
    quic_config: Option<Map<String, Value>>,
    #[serde(default)]
    nats_config: Option<Value>,
    #[serde(default)]
    health: HealthThresholds,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// A relative path in a definition file is relative to the file's folder.
#[cfg(any(feature = "quic", feature = "nats"))]
fn relative_to(base: &Path, path: &mut Option<std::path::PathBuf>) {
    if let Some(p) = path.as_mut()
        && p.is_relative()
    {
        *p = base.join(&*p);
    }
}

/// JSON with comments, as people write definition files.
mod jsonc {
    /// `text` with `//` and `/* */` comments and trailing commas blanked out (spaces, newlines
    /// kept), so that positions in errors stay those of the file.
    pub(super) fn strip(text: &str) -> String {
        let mut out: Vec<u8> = text.as_bytes().to_vec();
        let b = text.as_bytes();
        let (mut i, mut in_string) = (0, false);
        // The last comma outside strings and comments, and whether only blanks followed it.
        let mut comma: Option<usize> = None;
        while i < b.len() {
            let c = b[i];
            if in_string {
                if c == b'\\' {
                    i += 2;
                    continue;
                }
                if c == b'"' {
                    in_string = false;
                }
                i += 1;
                continue;
            }
            match c {
                b'"' => {
                    in_string = true;
                    comma = None;
                }
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    while i < b.len() && b[i] != b'\n' {
                        out[i] = b' ';
                        i += 1;
                    }
                    continue;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let start = i;
                    i += 2;
                    while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                        i += 1;
                    }
                    let end = (i + 2).min(b.len());
                    for (j, o) in out.iter_mut().enumerate().take(end).skip(start) {
                        if b[j] != b'\n' {
                            *o = b' ';
                        }
                    }
                    i = end;
                    continue;
                }
                b',' => comma = Some(i),
                b'}' | b']' => {
                    if let Some(at) = comma.take() {
                        out[at] = b' ';
                    }
                }
                c if c.is_ascii_whitespace() => {}
                _ => comma = None,
            }
            i += 1;
        }
        // Only ASCII bytes were replaced, by ASCII spaces: still UTF-8.
        String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn comments_and_trailing_commas_go_strings_stay() {
            let text = "{ // a comment\n  \"a\": \"http://x//y\", /* b */ \"b\": [1, 2,],\n}";
            let v: serde_json::Value = serde_json::from_str(&super::strip(text)).expect("JSON");
            assert_eq!(v["a"], "http://x//y");
            assert_eq!(v["b"], serde_json::json!([1, 2]));
            assert_eq!(super::strip(text).len(), text.len());
        }
    }
}

#[test]
fn definitions_are_told_from_other_json_files() {
    for yes in [
        r#"{"type": "worker"}"#,
        r#"{"agentType": "worker", "capabilitees": []}"#,
        r#"// a comment
               {"type": "worker", "capabilities": ["lint"],}"#,
        r#"{"type": "w", "id": "w1", "extra": 1}"#,
    ] {
        assert!(AgentDefinition::looks_like(yes), "{yes}");
    }
    for no in [
        r#"{"name": "web", "version": "1.0.0", "type": "module"}"#,
        r#"{"compilerOptions": {"strict": true}}"#,
        r#"[1, 2]"#,
        "not json",
    ] {
        assert!(!AgentDefinition::looks_like(no), "{no}");
    }
}

/// Reads `value` as a `T`, naming `file` and the field path under `prefix` in errors.
fn section<T: serde::de::DeserializeOwned>(
    value: Value,
    file: Option<&Path>,
    prefix: &str,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Error::Configuration {
            file: file.map(Path::to_path_buf),
            field: if path == "." {
                prefix.trim_end_matches('.').to_owned()
            } else {
                format!("{prefix}{path}")
            },
            message: e.into_inner().to_string(),
        }
    })
}

impl AgentDefinition {
    /// Whether `text` looks like an agent definition rather than another JSON file of a
    /// project (`package.json`, `tsconfig.json`): an object with `agentType`, or with `type`
    /// and either only a definition's keys or a key only definitions have (`id`,
    /// `capabilities`, `channels`, `enableQUIC`, `quicConfig`, `natsConfig`).
    pub fn looks_like(text: &str) -> bool {
        const ONLY_HERE: [&str; 6] = [
            "id",
            "capabilities",
            "channels",
            "enableQUIC",
            "quicConfig",
            "natsConfig",
        ];
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(&jsonc::strip(text)) else {
            return false;
        };
        let known = |k: &str| ONLY_HERE.contains(&k) || ["type", "health", "metadata"].contains(&k);
        doc.contains_key("agentType")
            || (doc.contains_key("type")
                && (doc.keys().all(|k| known(k)) || ONLY_HERE.iter().any(|k| doc.contains_key(*k))))
    }

    /// Parses and checks a definition: JSON with comments (`//`, `/* */`) and trailing commas
    /// allowed, `type` accepted for `agentType`. `file` names the file in errors, and relative
    /// paths in it (certificates, keys, credentials) are taken relative to its folder.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file (if given) and the field path.
    pub fn from_json(text: &str, file: Option<&Path>) -> Result<Self> {
        let text = jsonc::strip(text);
        let de = &mut serde_json::Deserializer::from_str(&text);
        let doc: File = serde_path_to_error::deserialize(de).map_err(|e| {
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
        let mut quic = doc.quic_config.unwrap_or_default();
        let mut enable_quic = doc.enable_quic;
        if let Some(enabled) = quic.remove("enabled") {
            // The flag outside and the one inside quicConfig mean the same thing.
            enable_quic |= section::<bool>(enabled, file, "quicConfig.enabled")?;
        }
        // Where the channels came from, to name them in errors.
        let mut channels_at = "quicConfig.";
        let channels = match (quic.remove("channels"), doc.channels) {
            (Some(_), Some(_)) => {
                return Err(Error::Configuration {
                    file: file.map(Path::to_path_buf),
                    field: "channels".to_owned(),
                    message: "channels are given both here and in quicConfig; keep one".to_owned(),
                });
            }
            (Some(v), None) => section::<ChannelList>(v, file, "quicConfig.channels")?
                .0
                .into_iter()
                .map(|s| s.0)
                .collect(),
            (None, Some(c)) => {
                channels_at = "";
                c
            }
            (None, None) => default_channels(),
        };
        let base = file.and_then(Path::parent);
        #[cfg(feature = "quic")]
        let quic_config: aqe_quic::QuicConfig = {
            let mut c: aqe_quic::QuicConfig = section(Value::Object(quic), file, "quicConfig.")?;
            if let Some(base) = base {
                let s = &mut c.security;
                for p in [&mut s.cert_path, &mut s.key_path, &mut s.ca_path] {
                    relative_to(base, p);
                }
            }
            c.validate().map_err(|e| e.in_config(file, "quicConfig."))?;
            c
        };
        #[cfg(not(feature = "quic"))]
        drop(quic);
        #[cfg(feature = "nats")]
        let nats_config = match doc.nats_config {
            None => None,
            Some(v) => {
                let mut c: aqe_nats::NatsConfig = section(v, file, "natsConfig.")?;
                if let Some(base) = base {
                    let t = &mut c.tls;
                    for p in [
                        &mut c.credentials,
                        &mut t.ca_path,
                        &mut t.cert_path,
                        &mut t.key_path,
                    ] {
                        relative_to(base, p);
                    }
                }
                c.validate().map_err(|e| e.in_config(file, "natsConfig."))?;
                Some(c)
            }
        };
        #[cfg(not(any(feature = "quic", feature = "nats")))]
        let _ = base;
        #[cfg(not(feature = "nats"))]
        if doc.nats_config.is_some() {
            tracing::warn!(file = ?file, "the definition configures NATS, but aqe-agent was built without the `nats` feature; natsConfig is ignored");
        }
        let def = AgentDefinition {
            id: doc.id,
            agent_type: doc.agent_type,
            capabilities: doc.capabilities,
            channels,
            health: doc.health,
            metadata: doc.metadata,
            enable_quic,
            #[cfg(feature = "quic")]
            quic_config,
            #[cfg(feature = "nats")]
            nats_config,
        };
        let mut reg = def.registration();
        reg.id = AgentId::new("check");
        reg.validate().map_err(|e| e.in_config(file, channels_at))?;
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
            channels: self.channels.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

fn deserialize_channels<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<Channel>>, D::Error> {
    Ok(Some(
        ChannelList::deserialize(d)?
            .0
            .into_iter()
            .map(|s| s.0)
            .collect(),
    ))
}

/// Channels given by preset name or in full.
#[derive(Deserialize)]
#[serde(transparent)]
struct ChannelList(Vec<ChannelSpec>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use aqe_core::ChannelKind;

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
        assert!(def.enable_quic);
        #[cfg(feature = "quic")]
        assert_eq!(def.quic_config.port, 9000);
        assert_eq!(def.channels, default_channels());
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
        let alerts = &def.channels[1];
        assert_eq!(
            (
                alerts.kind,
                alerts.priority.get(),
                alerts.ordered,
                alerts.reliable
            ),
            (ChannelKind::Unicast, 9, false, true)
        );
        #[cfg(feature = "quic")]
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
        let (field, _) = err_of(r#"{"quicConfig":{}}"#);
        assert_eq!(field, "(document)");
        let (field, _) = err_of(
            r#"{"agentType":"w","channels":["metrics"],"quicConfig":{"channels":["metrics"]}}"#,
        );
        assert_eq!(field, "channels");
        let (field, _) = err_of(r#"{"agentType":"w","channels":["results","results"]}"#);
        assert_eq!(field, "channels[1].name");
        #[cfg(feature = "nats")]
        {
            let (field, _) = err_of(r#"{"agentType":"w","natsConfig":{"fleet":"a.b"}}"#);
            assert_eq!(field, "natsConfig.fleet");
            let (field, _) = err_of(r#"{"agentType":"w","natsConfig":{"srevers":[]}}"#);
            assert_eq!(field, "natsConfig.srevers");
        }
        #[cfg(feature = "quic")]
        {
            let (field, _) = err_of(r#"{"agentType":"w","quicConfig":{"prot":1}}"#);
            assert_eq!(field, "quicConfig.prot");
            let (field, _) =
                err_of(r#"{"agentType":"w","quicConfig":{"security":{"enableTokenAuth":true}}}"#);
            assert_eq!(field, "quicConfig.security.token");
            let (field, _) =
                err_of(r#"{"agentType":"w","quicConfig":{"security":{"enableTLS":false}}}"#);
            assert_eq!(field, "quicConfig.security.enableTLS");
        }
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
        assert_eq!(def.channels.len(), 3);
        #[cfg(feature = "quic")]
        assert_eq!(def.quic_config.send_timeout, Duration::from_secs(5));
        #[cfg(feature = "nats")]
        assert_eq!(def.nats_config.map(|n| n.fleet).as_deref(), Some("qe"));
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
