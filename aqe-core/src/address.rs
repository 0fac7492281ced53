//! Where things are, as the transport that reaches them names it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The address of a remote endpoint or server, in the terms of the transport that reaches it:
/// a socket address for QUIC, a URL or a subject-level name for a broker such as NATS.
///
/// ```
/// use aqe_core::Address;
/// let quic = Address::from("127.0.0.1:4433".parse::<std::net::SocketAddr>().unwrap());
/// assert_eq!(quic.to_string(), "127.0.0.1:4433");
/// assert_eq!(quic.socket(), Some("127.0.0.1:4433".parse().unwrap()));
/// let nats = Address::named("nats://127.0.0.1:4222");
/// assert_eq!(nats.socket(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Address {
    /// A UDP or TCP socket address.
    Socket(SocketAddr),
    /// Anything else: a server URL, an endpoint's name on a broker.
    Named(Arc<str>),
}

impl Address {
    /// A named address.
    pub fn named(name: impl AsRef<str>) -> Self {
        Address::Named(Arc::from(name.as_ref()))
    }

    /// The socket address, when this is one.
    pub fn socket(&self) -> Option<SocketAddr> {
        match self {
            Address::Socket(a) => Some(*a),
            Address::Named(_) => None,
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::Socket(a)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Socket(a) => a.fmt(f),
            Address::Named(n) => f.write_str(n),
        }
    }
}

/// Which transport something is: an open set, each transport crate naming its own
/// (`aqe_eventbus::EventBus::KIND`, `aqe_quic::QuicTransport::KIND`...), so that adding a
/// transport never touches this crate.
///
/// ```
/// use aqe_core::TransportKind;
/// const CARRIER_PIGEON: TransportKind = TransportKind::new("carrier pigeon");
/// assert_eq!(CARRIER_PIGEON.to_string(), "carrier pigeon");
/// assert_ne!(CARRIER_PIGEON, TransportKind::new("QUIC"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransportKind(&'static str);

impl TransportKind {
    /// A transport named `name`, as logs and events show it.
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// Its name.
    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
