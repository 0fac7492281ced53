//! How a transport crate plugs into agent definitions and the agent runtime, without the
//! runtime naming it: the crate registers a [`Provider`] (its kind, its section of a
//! definition file, how to read it) and its configuration type implements
//! [`TransportConfig`] (how to start it). aqe-agent holds a list of providers, one line per
//! transport crate, and nothing else of them.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::{Error, Result, Transport, TransportKind};

/// A transport crate's registration.
pub trait Provider: Send + Sync + 'static {
    /// The kind of transport it provides.
    fn kind(&self) -> TransportKind;

    /// Its section in a definition file (`quicConfig`).
    fn section(&self) -> &'static str;

    /// A top-level flag that asks for the transport (`enableQUIC`). With one, the section
    /// alone only configures the transport, and the flag (or `enabled: true` in the
    /// section) asks for it; without one, the section's presence asks for it.
    fn flag(&self) -> Option<&'static str> {
        None
    }

    /// Reads and checks its section (an object, `{}` when only the flag is given), without
    /// the `channels` and `enabled` keys, which the definition reads. Relative paths in it
    /// are relative to `base`, the definition file's folder.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the field within the section.
    fn parse(
        &self,
        section: serde_json::Value,
        base: Option<&Path>,
    ) -> Result<Arc<dyn TransportConfig>>;
}

/// A transport's configuration, as read from a definition or built in code: what starts it.
#[async_trait]
pub trait TransportConfig: std::fmt::Debug + Send + Sync + 'static {
    /// The kind of transport it starts.
    fn kind(&self) -> TransportKind;

    /// Whether a transport started for `other` serves this configuration too (one QUIC
    /// endpoint per host and port, one NATS connection per equal configuration).
    fn shares_with(&self, other: &dyn TransportConfig) -> bool;

    /// How long a message sent through it may take to be confirmed: what an agent waits,
    /// at most, before it closes the transport it disables.
    fn delivery_deadline(&self) -> Duration;

    /// Starts the transport.
    ///
    /// # Errors
    /// What starting it meets: configuration, certificates, a port in use, a server that
    /// refuses.
    async fn start(&self) -> Result<Started>;

    /// Starts the transport for a long-running process (a node): one whose server is away
    /// starts anyway and connects when it can, saying so. The provided implementation is
    /// [`TransportConfig::start`].
    ///
    /// # Errors
    /// As [`TransportConfig::start`], less what waiting for a server would meet.
    async fn start_persistent(&self) -> Result<Started> {
        self.start().await
    }

    /// The configuration itself, for callers that know its type.
    fn as_any(&self) -> &dyn Any;
}

/// A started transport: as the runtime uses it, and as its crate's type, for callers that
/// know it (a QUIC endpoint's address).
#[derive(Clone)]
pub struct Started {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// The same transport as its own type.
    pub concrete: Arc<dyn Any + Send + Sync>,
}

impl Started {
    /// Wraps a started transport of type `T`.
    pub fn new<T: Transport + Clone + 'static>(t: T) -> Self {
        Self {
            transport: Arc::new(t.clone()),
            concrete: Arc::new(t),
        }
    }

    /// The transport as a `T`, if it is one.
    pub fn as_type<T: 'static>(&self) -> Option<&T> {
        self.concrete.downcast_ref()
    }
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("kind", &self.transport.kind())
            .finish_non_exhaustive()
    }
}

/// Reads `value` as a `T`; an error names the field path within it (`security.token`), or
/// `(section)` for the value as a whole.
///
/// # Errors
/// [`Error::Configuration`].
pub fn read_section<T: DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Error::Configuration {
            file: None,
            field: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

/// A relative path in a definition file is relative to the file's folder.
pub fn relative_to(base: Option<&Path>, path: &mut Option<std::path::PathBuf>) {
    if let (Some(base), Some(p)) = (base, path.as_mut())
        && p.is_relative()
    {
        *p = base.join(&*p);
    }
}
