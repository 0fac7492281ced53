//! W3C trace context: the `traceparent` an envelope may carry, so that what one agent does
//! for a message and what the sender did are spans of one trace, across processes.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A `traceparent` (W3C Trace Context, level 1): the trace, the span that sent the message,
/// and the trace flags. Written `00-<trace id, 32 hex>-<parent id, 16 hex>-<flags, 2 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceParent {
    /// The format's version; 0 is the one this build writes. A receiver keeps what it does
    /// not know as it is.
    pub version: u8,
    /// The trace: the same on every message of one piece of work. Never all zeros.
    pub trace_id: [u8; 16],
    /// The span that sent the message. Never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0: sampled.
    pub flags: u8,
}

/// A `traceparent` string that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadTraceParent;

impl From<BadTraceParent> for crate::Error {
    fn from(_: BadTraceParent) -> Self {
        crate::Error::config(
            "traceparent",
            "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, ids not all zeros)",
        )
    }
}

fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Randomly keyed per call: the counter keeps two calls apart, the keys unpredictable.
    std::collections::hash_map::RandomState::new().hash_one(n) | 1
}

impl TraceParent {
    /// A new trace, sampled, its first span.
    pub fn root() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&random_u64().to_be_bytes());
        trace_id[8..].copy_from_slice(&random_u64().to_be_bytes());
        Self {
            version: 0,
            trace_id,
            parent_id: random_u64().to_be_bytes(),
            flags: 1,
        }
    }

    /// A new span of the same trace (what a receiver sends on while handling this).
    pub fn child(&self) -> Self {
        Self {
            parent_id: random_u64().to_be_bytes(),
            ..*self
        }
    }

    /// The trace id in hex (32 digits), as tracing systems show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent (span) id in hex (16 digits).
    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Result<[u8; N], BadTraceParent> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(BadTraceParent);
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BadTraceParent)?;
    }
    Ok(out)
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}-{}-{}-{:02x}",
            self.version,
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl FromStr for TraceParent {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, crate::Error> {
        Ok(Self::parse(s)?)
    }
}

impl TraceParent {
    fn parse(s: &str) -> Result<Self, BadTraceParent> {
        let mut parts = s.split('-');
        let (Some(v), Some(t), Some(p), Some(fl)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadTraceParent);
        };
        let [version] = unhex::<1>(v)?;
        // Version 0 has exactly four fields; later versions may add some after them.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return Err(BadTraceParent);
        }
        let tp = Self {
            version,
            trace_id: unhex(t)?,
            parent_id: unhex(p)?,
            flags: unhex::<1>(fl)?[0],
        };
        if tp.trace_id == [0; 16] || tp.parent_id == [0; 8] {
            return Err(BadTraceParent);
        }
        Ok(tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_w3c_example_reads_and_writes_back() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp: TraceParent = s.parse().expect("valid");
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), s);
    }

    #[test]
    fn malformed_ones_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), Err(BadTraceParent), "{bad:?}");
            assert!(bad.parse::<TraceParent>().is_err());
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_a_new_span() {
        let root = TraceParent::root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
        assert_ne!(TraceParent::root().trace_id, root.trace_id);
    }
}
