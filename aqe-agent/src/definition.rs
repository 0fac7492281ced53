//! Agent definition files: who an agent is, its channels, and the transports it uses.
//!
//! The file layout is the guide's: `agentType`, `capabilities`, `enableQUIC` and a
//! `quicConfig` object whose `channels` are the agent's channels and whose other fields are
//! the QUIC endpoint's options. Channels may also be given at the top level as `channels`.
//! Every transport built in has its section (`quicConfig`, `natsConfig`), read by that
//! transport's crate through its [`Provider`]; `chain` orders the transports the agent uses
//! (by default, the order of [`crate::providers`]). A section no transport of this build reads
//! is ignored with a warning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use aqe_core::{
    AgentId, AgentType, Capability, Channel, Error, HealthThresholds, Provider, Registration,
    Result, TransportConfig, TransportKind, default_channels,
};

/// An agent as described by a definition file.
///
/// ```
/// let def = aqe_agent::AgentDefinition::from_json(r#"{
///     "agentType": "qe-test-executor",
///     "enableQUIC": true,
///     "quicConfig": { "host": "localhost", "port": 9000, "channels": ["coordination", "results"] }
/// }"#, None)?;
/// assert_eq!(def.channels.len(), 2);
/// # Ok::<(), aqe_core::Error>(())
/// ```
#[derive(Debug, Clone)]
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
    /// The transports the agent uses, in chain order; the transport it is started on comes
    /// after them.
    pub transports: Vec<Arc<dyn TransportConfig>>,
    /// Every transport section the file configures, asked for or not (QUIC options without
    /// `enableQUIC` still tell a command how to join).
    configured: Vec<Arc<dyn TransportConfig>>,
}

/// The file as written, before each transport's section is handed to its crate.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    #[serde(default)]
    id: Option<AgentId>,
    #[serde(alias = "type")]
    agent_type: AgentType,
    #[serde(default)]
    capabilities: Vec<Capability>,
    #[serde(default, deserialize_with = "deserialize_channels")]
    channels: Option<Vec<Channel>>,
    /// The transports used, in order, by kind (`["QUIC", "NATS"]`).
    #[serde(default)]
    chain: Option<Vec<String>>,
    #[serde(default)]
    health: HealthThresholds,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Transport sections and flags, and anything else (refused unless it looks like a
    /// transport's).
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Whether `key` is a transport's section or flag (`xyzConfig`, `enableXyz`), perhaps of a
/// transport this build lacks.
fn transport_like(key: &str) -> bool {
    (key.ends_with("Config") && key.len() > "Config".len())
        || key
            .strip_prefix("enable")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// Takes the agent's channels out of the transport section `name`, if it has them; they may
/// be given once in the whole file.
fn take_channels(
    channels: &mut Option<(String, Vec<Channel>)>,
    name: &str,
    body: &mut Map<String, Value>,
    file: Option<&Path>,
) -> Result<()> {
    let Some(v) = body.remove("channels") else {
        return Ok(());
    };
    let field = format!("{name}.channels");
    if let Some((at, _)) = channels {
        let (field, other) = if at.is_empty() {
            ("channels".to_owned(), name)
        } else {
            (field, at.trim_end_matches(".channels"))
        };
        return Err(Error::Configuration {
            file: file.map(Path::to_path_buf),
            field,
            message: format!("channels are given both here and in {other}; keep one"),
        });
    }
    let list: ChannelList = section(v, file, &field)?;
    *channels = Some((field, list.0.into_iter().map(|s| s.0).collect()));
    Ok(())
}

/// The provider whose section or flag `key` is.
fn owner_of(key: &str) -> Option<&'static dyn Provider> {
    crate::providers()
        .iter()
        .copied()
        .find(|p| p.section() == key || p.flag() == Some(key))
}

/// The transports the agent uses, in order: `chain` (by kind, any case; those this build
/// lacks are left out with a warning; one named without a section gets its defaults), or
/// those asked for, in the providers' order.
fn chain(
    chain: Option<Vec<String>>,
    configured: &[(&'static dyn Provider, bool, Arc<dyn TransportConfig>)],
    file: Option<&Path>,
) -> Result<Vec<Arc<dyn TransportConfig>>> {
    let Some(names) = chain else {
        return Ok(configured
            .iter()
            .filter(|(_, asked, _)| *asked)
            .map(|(_, _, c)| c.clone())
            .collect());
    };
    let mut out: Vec<Arc<dyn TransportConfig>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("chain[{i}]");
        let Some(p) = crate::providers()
            .iter()
            .find(|p| p.kind().name().eq_ignore_ascii_case(name))
        else {
            tracing::warn!(file = ?file, field = %field, transport = %name, built_in = ?crate::transports(),
                "the chain names a transport this build lacks; it is left out");
            continue;
        };
        if out.iter().any(|c| c.kind() == p.kind()) {
            return Err(Error::Configuration {
                file: file.map(Path::to_path_buf),
                field,
                message: format!("{name} is in the chain twice"),
            });
        }
        let config = match configured.iter().find(|(q, _, _)| q.kind() == p.kind()) {
            Some((_, _, c)) => c.clone(),
            None => p
                .parse(Value::Object(Map::new()), file.and_then(Path::parent))
                .map_err(|e| placed(e, file, p.section()))?,
        };
        out.push(config);
    }
    Ok(out)
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

/// Reads `value` as a `T`, naming `file` and the field path under `field` in errors.
fn section<T: serde::de::DeserializeOwned>(
    value: Value,
    file: Option<&Path>,
    field: &str,
) -> Result<T> {
    aqe_core::provider::read_section(value).map_err(|e| placed(e, file, field))
}

/// A configuration error of the section at `field` (`quicConfig`), placed in `file`.
fn placed(e: Error, file: Option<&Path>, field: &str) -> Error {
    match e.in_config(file, "") {
        Error::Configuration {
            file,
            field: inner,
            message,
        } => Error::Configuration {
            file,
            field: match inner.chars().next() {
                None => field.to_owned(),
                Some('[') => format!("{field}{inner}"),
                Some(_) => format!("{field}.{inner}"),
            },
            message,
        },
        other => other,
    }
}

impl AgentDefinition {
    /// Whether `text` looks like an agent definition rather than another JSON file of a
    /// project (`package.json`, `tsconfig.json`): an object with `agentType`, or with `type`
    /// and either only a definition's keys or a key only definitions have (`id`,
    /// `capabilities`, `channels`, `chain`, a transport's section or flag).
    pub fn looks_like(text: &str) -> bool {
        const ONLY_HERE: [&str; 4] = ["id", "capabilities", "channels", "chain"];
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(&jsonc::strip(text)) else {
            return false;
        };
        let transport_key = |k: &str| transport_like(k) || owner_of(k).is_some();
        let only_here = |k: &str| ONLY_HERE.contains(&k) || transport_key(k);
        let known = |k: &str| only_here(k) || ["type", "health", "metadata"].contains(&k);
        doc.contains_key("agentType")
            || (doc.contains_key("type")
                && (doc.keys().all(|k| known(k)) || doc.keys().any(|k| only_here(k))))
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
        let mut doc: File = serde_path_to_error::deserialize(de).map_err(|e| {
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
        let base = file.and_then(Path::parent);
        // Each transport's section: its channels and `enabled` are the definition's; the
        // rest goes to the transport's crate.
        let mut channels = doc.channels.take().map(|c| (String::new(), c));
        let mut configured: Vec<(&'static dyn Provider, bool, Arc<dyn TransportConfig>)> =
            Vec::new();
        for p in crate::providers() {
            let name = p.section();
            let flagged = match p.flag().and_then(|f| doc.rest.remove(f)) {
                Some(v) => section::<bool>(v, file, p.flag().unwrap_or(name))?,
                None => false,
            };
            let mut body = match doc.rest.remove(name) {
                Some(Value::Object(m)) => Some(m),
                Some(_) => {
                    return Err(Error::Configuration {
                        file: file.map(Path::to_path_buf),
                        field: name.to_owned(),
                        message: "expected an object".to_owned(),
                    });
                }
                None => None,
            };
            let present = body.is_some();
            let mut section_body = body.take().unwrap_or_default();
            let enabled = match section_body.remove("enabled") {
                Some(v) => Some(section::<bool>(v, file, &format!("{name}.enabled"))?),
                None => None,
            };
            take_channels(&mut channels, name, &mut section_body, file)?;
            let asked = match p.flag() {
                Some(_) => flagged || enabled == Some(true),
                None => present && enabled != Some(false),
            };
            if present || asked {
                let config = p
                    .parse(Value::Object(section_body), base)
                    .map_err(|e| placed(e, file, name))?;
                configured.push((*p, asked, config));
            }
        }
        for (key, mut value) in std::mem::take(&mut doc.rest) {
            if transport_like(&key) {
                // The guide's channels are in `quicConfig`, read with or without QUIC.
                if let Value::Object(m) = &mut value {
                    take_channels(&mut channels, &key, m, file)?;
                }
                tracing::warn!(file = ?file, field = %key, built_in = ?crate::transports(),
                    "no transport of this build reads this field; it is ignored");
            } else {
                return Err(Error::Configuration {
                    file: file.map(Path::to_path_buf),
                    field: key,
                    message: "unknown field".to_owned(),
                });
            }
        }
        let transports = chain(doc.chain, &configured, file)?;
        let (channels_at, channels) = match channels {
            Some((at, c)) => (at, c),
            None => (String::new(), default_channels()),
        };
        let def = AgentDefinition {
            id: doc.id,
            agent_type: doc.agent_type,
            capabilities: doc.capabilities,
            channels,
            health: doc.health,
            metadata: doc.metadata,
            transports,
            configured: configured.into_iter().map(|(_, _, c)| c).collect(),
        };
        let mut reg = def.registration();
        reg.id = AgentId::new("check");
        let prefix = channels_at
            .strip_suffix("channels")
            .unwrap_or_default()
            .to_owned();
        reg.validate().map_err(|e| e.in_config(file, &prefix))?;
        Ok(def)
    }

    /// The configuration the file gives a transport of type `T` (`aqe_quic::QuicConfig`),
    /// whether the agent uses that transport or not.
    pub fn config<T: 'static>(&self) -> Option<&T> {
        self.configured
            .iter()
            .find_map(|c| c.as_any().downcast_ref::<T>())
    }

    /// Whether the agent uses a transport of this kind.
    pub fn uses(&self, kind: TransportKind) -> bool {
        self.transports.iter().any(|t| t.kind() == kind)
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
        #[cfg(feature = "quic")]
        {
            assert!(def.uses(aqe_quic::QuicTransport::KIND));
            assert_eq!(
                def.config::<aqe_quic::QuicConfig>().map(|c| c.port),
                Some(9000)
            );
        }
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
                "quicConfig":{"channels":["metrics",{"name":"alerts","type":"unicast","priority":9,"ordered":false,"ttlMs":500}],
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
                alerts.reliable,
                alerts.ttl_ms
            ),
            (ChannelKind::Unicast, 9, false, true, Some(500))
        );
        #[cfg(feature = "quic")]
        assert_eq!(
            def.config::<aqe_quic::QuicConfig>()
                .map(|c| c.connection_timeout),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(def.health.degraded_rtt, Duration::from_millis(50));
        assert!(
            !format!("{def:?}").contains("s3cret"),
            "tokens are never printed"
        );
        assert!(def.transports.is_empty(), "QUIC configured, not asked for");
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
        assert_eq!(
            def.config::<aqe_quic::QuicConfig>().map(|c| c.send_timeout),
            Some(Duration::from_secs(5))
        );
        #[cfg(feature = "nats")]
        assert_eq!(
            def.config::<aqe_nats::NatsConfig>()
                .map(|n| n.fleet.as_str()),
            Some("qe")
        );
    }

    #[test]
    fn the_chain_orders_the_transports_and_unknown_fields_are_told_apart() {
        let kinds = |json: &str| -> Vec<&'static str> {
            AgentDefinition::from_json(json, None)
                .expect("valid")
                .transports
                .iter()
                .map(|t| t.kind().name())
                .collect()
        };
        // A section of a transport this build lacks, or of none, is ignored; a typo is not.
        assert!(
            kinds(r#"{"type":"w","carrierPigeonConfig":{},"enableCarrierPigeon":true}"#).is_empty()
        );
        assert_eq!(err_of(r#"{"type":"w","capabilites":[]}"#).0, "capabilites");
        assert!(kinds(r#"{"type":"w","chain":["carrier pigeon"]}"#).is_empty());
        #[cfg(all(feature = "quic", feature = "nats"))]
        {
            let both = r#""enableQUIC":true,"natsConfig":{"servers":["nats://127.0.0.1:4222"]}"#;
            assert_eq!(
                kinds(&format!(r#"{{"type":"w",{both}}}"#)),
                ["QUIC", "NATS"]
            );
            assert_eq!(
                kinds(&format!(r#"{{"type":"w",{both},"chain":["nats","QUIC"]}}"#)),
                ["NATS", "QUIC"]
            );
            // Named in the chain without a section: its defaults.
            assert_eq!(kinds(r#"{"type":"w","chain":["NATS"]}"#), ["NATS"]);
            assert_eq!(
                err_of(r#"{"type":"w","chain":["QUIC","quic"]}"#).0,
                "chain[1]"
            );
            assert_eq!(
                err_of(r#"{"type":"w","natsConfig":{"enabled":"yes"}}"#).0,
                "natsConfig.enabled"
            );
            assert!(kinds(r#"{"type":"w","natsConfig":{"enabled":false}}"#).is_empty());
            assert_eq!(
                kinds(r#"{"type":"w","quicConfig":{"enabled":true}}"#),
                ["QUIC"]
            );
            assert_eq!(
                err_of(r#"{"type":"w","natsConfig":{"channels":["metrics"]},"quicConfig":{"channels":["metrics"]}}"#).0,
                "natsConfig.channels"
            );
        }
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
