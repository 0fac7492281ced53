//! The checks every hello passes before a session exists: version, identity, token.

use crate::frame::{Hello, SESSION_VERSION};
use crate::{EndpointId, Principal, Trust};

/// Why a hello is refused. Each wire tells the peer with its own code (PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    /// It speaks another version.
    #[error("the peer speaks session version {found}, this endpoint {SESSION_VERSION}")]
    Version {
        /// The version it announced.
        found: u8,
    },
    /// It is this endpoint (same key, same incarnation): a link to itself.
    #[error("a link to itself")]
    SelfLink,
    /// It announced a key its certificate does not give.
    #[error("the peer claimed a key its certificate does not give")]
    IdentityMismatch,
    /// Token authentication is on and it presented none.
    #[error("token missing")]
    TokenMissing,
    /// It presented another token.
    #[error("token rejected")]
    TokenRejected,
}

/// Checks `hello` from a peer against this endpoint (`me`), the shared `token` if token
/// authentication is on, and the key the link's handshake proved for the peer, if it proved
/// one (`verified`). What the peer proved, if it passes.
///
/// # Errors
/// [`HelloRefusal`], checked in this order: version, link to itself, identity, token.
pub fn check_hello(
    hello: &Hello,
    me: EndpointId,
    token: Option<&str>,
    verified: Option<u64>,
) -> Result<Trust, HelloRefusal> {
    if hello.version != SESSION_VERSION {
        return Err(HelloRefusal::Version {
            found: hello.version,
        });
    }
    if hello.endpoint == me {
        return Err(HelloRefusal::SelfLink);
    }
    if verified.is_some_and(|k| k != hello.endpoint.key) {
        return Err(HelloRefusal::IdentityMismatch);
    }
    let token_ok = match (token, hello.token.as_deref()) {
        (None, _) => false,
        (Some(_), None) => return Err(HelloRefusal::TokenMissing),
        (Some(ours), Some(theirs)) if !constant_time_eq(ours.as_bytes(), theirs.as_bytes()) => {
            return Err(HelloRefusal::TokenRejected);
        }
        (Some(_), Some(_)) => true,
    };
    Ok(Trust {
        authenticated: token_ok || verified.is_some(),
        principal: verified.map_or(Principal::Unverified, Principal::Key),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(endpoint: EndpointId, token: Option<&str>) -> Hello {
        Hello {
            version: SESSION_VERSION,
            endpoint,
            nonce: 1,
            listen: None,
            token: token.map(str::to_owned),
            window: 8,
            session_bytes: 1 << 20,
            heartbeat_ms: 500,
            liveness_ms: 3000,
        }
    }

    #[test]
    fn hellos_are_checked_for_version_self_identity_and_token() {
        let me = EndpointId::new(1, 10);
        let sibling = EndpointId::new(1, 11);
        let other = EndpointId::new(2, 5);
        // A sibling holding the same key is another endpoint.
        let t = check_hello(&hello(sibling, None), me, None, Some(1)).expect("sibling");
        assert_eq!(t.principal, Principal::Key(1));
        assert!(t.authenticated);
        assert_eq!(
            check_hello(&hello(me, None), me, None, Some(1)),
            Err(HelloRefusal::SelfLink)
        );
        assert_eq!(
            check_hello(&hello(other, None), me, None, Some(3)),
            Err(HelloRefusal::IdentityMismatch)
        );
        let stranger = check_hello(&hello(other, None), me, None, None).expect("stranger");
        assert!(!stranger.authenticated);
        assert_eq!(stranger.principal, Principal::Unverified);
        assert_eq!(
            check_hello(&hello(other, None), me, Some("t0k3n"), None),
            Err(HelloRefusal::TokenMissing)
        );
        assert_eq!(
            check_hello(&hello(other, Some("t0k3N")), me, Some("t0k3n"), None),
            Err(HelloRefusal::TokenRejected)
        );
        let holder = check_hello(&hello(other, Some("t0k3n")), me, Some("t0k3n"), None)
            .expect("token holder");
        assert!(holder.authenticated);
        assert_eq!(holder.principal, Principal::Unverified);
        let mut old = hello(other, None);
        old.version = 3;
        assert_eq!(
            check_hello(&old, me, None, None),
            Err(HelloRefusal::Version { found: 3 })
        );
    }
}
