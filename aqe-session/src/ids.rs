//! Who is who: endpoints are their key plus the incarnation of the process holding it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An endpoint: a key it can prove (over QUIC, derived from its certificate's public key)
/// and the incarnation of the process that holds it (chosen at start, never reused).
///
/// Several processes may hold one key (one certificate shared by many commands): they are
/// distinct endpoints, told apart by their incarnations, and one principal for
/// authorization. A restarted process is the same key with a newer incarnation. Nothing
/// about identity is inferred from an address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointId {
    /// The key the endpoint proves (QUIC: the first 8 bytes, big-endian, of the SHA-256 of
    /// its certificate's SubjectPublicKeyInfo; NATS: random per endpoint).
    pub key: u64,
    /// The incarnation: microseconds since the Unix epoch when the endpoint started, made
    /// unique within its process. Newer processes have larger incarnations.
    pub incarnation: u64,
}

impl EndpointId {
    /// The endpoint of `key` in `incarnation`.
    pub const fn new(key: u64, incarnation: u64) -> Self {
        Self { key, incarnation }
    }
}

impl fmt::Display for EndpointId {
    /// 32 lowercase hex digits: the key, then the incarnation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.key, self.incarnation)
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ep({:016x}.{:016x})", self.key, self.incarnation)
    }
}

impl std::str::FromStr for EndpointId {
    type Err = std::num::ParseIntError;

    /// Parses the 32 hex digits [`EndpointId`]'s `Display` writes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, incarnation) = if s.len() == 32 && s.is_ascii() {
            s.split_at(16)
        } else {
            // Any malformed input: let the integer parser say why.
            (s, "")
        };
        Ok(Self {
            key: u64::from_str_radix(key, 16)?,
            incarnation: u64::from_str_radix(incarnation, 16)?,
        })
    }
}

/// A session's handle in its [`Node`](crate::Node), unique for the node's life.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Who a peer is for authorization, as far as it proved it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Principal {
    /// It proved this key (a certificate this side verified).
    Key(u64),
    /// A member of a fleet whose server authenticated everyone alike (NATS): every endpoint
    /// of the fleet is the same principal.
    Fleet,
    /// It proved nothing about its key: only its own session is itself.
    Unverified,
}

/// What a peer proved in its handshake.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Trust {
    /// It proved who it is (a verified certificate, the shared token, or a server that
    /// authenticated it): its word about other endpoints may be taken, and it may hear of
    /// them.
    pub authenticated: bool,
    /// Whose it is.
    pub principal: Principal,
}

impl Trust {
    /// Whether what was in doubt with `self`'s session may go to a session of `other`: the
    /// same principal (a restart, or a sibling holding the same key), never a stranger.
    pub fn same_principal(&self, other: &Trust) -> bool {
        match (self.principal, other.principal) {
            (Principal::Key(a), Principal::Key(b)) => a == b,
            (Principal::Fleet, Principal::Fleet) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_print_and_parse_as_32_hex_digits() {
        let e = EndpointId::new(0xab, 0x0123_4567_89ab_cdef);
        let s = e.to_string();
        assert_eq!(s, "00000000000000ab0123456789abcdef");
        assert_eq!(s.parse::<EndpointId>(), Ok(e));
        assert!("xyz".parse::<EndpointId>().is_err());
        assert!(
            "00000000000000ab0123456789abcdeg"
                .parse::<EndpointId>()
                .is_err()
        );
    }

    #[test]
    fn only_the_same_proven_key_or_fleet_is_the_same_principal() {
        let k = |k| Trust {
            authenticated: true,
            principal: Principal::Key(k),
        };
        let fleet = Trust {
            authenticated: true,
            principal: Principal::Fleet,
        };
        let stranger = Trust {
            authenticated: false,
            principal: Principal::Unverified,
        };
        assert!(k(1).same_principal(&k(1)));
        assert!(!k(1).same_principal(&k(2)));
        assert!(fleet.same_principal(&fleet));
        assert!(!fleet.same_principal(&k(1)));
        assert!(!stranger.same_principal(&stranger));
    }
}
