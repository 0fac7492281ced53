//! Identifiers: cheap-to-clone names and process-unique numbers.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(NameVisitor).map(Self)
            }
        }

        impl $name {
            /// Creates the name from any string (a short one seen recently on this thread
            /// is shared, not allocated again).
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(interned::name(name.as_ref()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Names made or decoded recently on this thread, shared rather than allocated again:
/// every frame names its sender, recipient and channel, and they repeat. Bounded: short names only, and
/// the table is emptied when full (a peer sending ever-new names gains nothing but misses).
mod interned {
    use std::cell::RefCell;
    use std::sync::Arc;

    use crate::plumbing::FastSet;

    /// Longer names are allocated as they come.
    const MAX_LEN: usize = 64;
    /// Names kept per thread.
    const MAX_NAMES: usize = 1024;

    thread_local! {
        static NAMES: RefCell<FastSet<Arc<str>>> = RefCell::new(FastSet::default());
    }

    pub(super) fn name(s: &str) -> Arc<str> {
        if s.len() > MAX_LEN {
            return Arc::from(s);
        }
        NAMES
            .try_with(|names| {
                let mut names = names.borrow_mut();
                if let Some(n) = names.get(s) {
                    return n.clone();
                }
                if names.len() >= MAX_NAMES {
                    names.clear();
                }
                let n: Arc<str> = Arc::from(s);
                names.insert(n.clone());
                n
            })
            .unwrap_or_else(|_| Arc::from(s))
    }
}

/// Decodes a name into a shared string, through [`interned`].
struct NameVisitor;

impl serde::de::Visitor<'_> for NameVisitor {
    type Value = Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name (a string)")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
        Ok(interned::name(v))
    }
}

name_type!(
    /// The address of one agent within the fleet, unique across it.
    AgentId
);
name_type!(
    /// What an agent is (`commander`, `test-executor`, `analyzer`...); used for discovery.
    AgentType
);
name_type!(
    /// Something an agent can do, advertised to its peers.
    Capability
);
name_type!(
    /// The name of a channel, which is how messages refer to it on the wire.
    ChannelName
);
name_type!(
    /// The configured identifier of a channel (informational; the wire uses the name).
    ChannelId
);

impl AgentId {
    /// A fresh id of the form `{agent_type}-{n}`, unique within this process and very likely
    /// across processes (the counter starts at a random point).
    pub fn generate(agent_type: &AgentType) -> Self {
        Self::new(format!("{agent_type}-{:08x}", next_number() as u32))
    }
}

macro_rules! number_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// A fresh number, unique within this process.
            pub fn next() -> Self {
                Self(next_number())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:016x})", stringify!($name), self.0)
            }
        }
    };
}

number_type!(
    /// Identifies one message; unique per sender.
    MessageId
);
number_type!(
    /// Identifies one stream; unique per opening agent.
    StreamId
);

/// A process-wide counter that starts at a random point, so that ids of two processes
/// rarely collide even though nothing coordinates them.
fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.write_u32(std::process::id());
        // Keep the top bit clear so the counter never wraps in practice.
        h.finish() >> 1
    });
    start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_and_print_as_strings() {
        let a = AgentId::from("worker-1");
        assert_eq!(a.as_str(), "worker-1");
        assert_eq!(a.to_string(), "worker-1");
        assert_eq!(format!("{a:?}"), "\"worker-1\"");
        assert_eq!(a, AgentId::new(String::from("worker-1")));
    }

    #[test]
    fn numbers_are_unique() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| MessageId::next()).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn generated_agent_ids_carry_the_type() {
        let t = AgentType::from("worker");
        let a = AgentId::generate(&t);
        let b = AgentId::generate(&t);
        assert!(a.as_str().starts_with("worker-"));
        assert_ne!(a, b);
    }
}
