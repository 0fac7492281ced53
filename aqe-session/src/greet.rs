//! Handshakes over a wire without connections (NATS): hellos travel as messages that may be
//! lost, repeated, or cross one sent the other way.
//!
//! The side that wants a session (it heard of a peer it has none with) sends its hello with a
//! fresh nonce and sends it again, with the same nonce, until answered or until it gives up.
//! A hello is answered with a hello (`reply`). Two hellos that cross are decided by rank: the
//! smaller `(initiator, nonce)` is the session both keep, the other is dropped. A hello from
//! a peer this side already has a session with is decided by [`Node::open`](crate::Node::open).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::{EndpointId, Rank};

/// What the transport must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// Send this endpoint's hello to `to`, with `nonce`; `reply`: it answers theirs.
    Hello {
        /// The peer.
        to: EndpointId,
        /// The nonce.
        nonce: u64,
        /// Whether it answers a hello.
        reply: bool,
    },
    /// Open the session of `rank` with `peer`, from the hello just received
    /// ([`Node::open`](crate::Node::open)); if it is refused, send no reply.
    Open {
        /// The peer.
        peer: EndpointId,
        /// The session.
        rank: Rank,
    },
}

struct Pending {
    nonce: u64,
    since: Instant,
    next: Instant,
}

/// The handshakes in progress of one endpoint.
pub struct Greeter {
    me: EndpointId,
    pending: BTreeMap<EndpointId, Pending>,
    retry: Duration,
    give_up: Duration,
}

impl std::fmt::Debug for Greeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greeter")
            .field("me", &self.me)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Greeter {
    /// Handshakes of `me`: hellos sent again every `retry`, given up after `give_up`.
    pub fn new(me: EndpointId, retry: Duration, give_up: Duration) -> Self {
        Self {
            me,
            pending: BTreeMap::new(),
            retry,
            give_up,
        }
    }

    /// A session with `peer` is wanted and none exists: starts a handshake with `nonce`
    /// (fresh, random) unless one is under way.
    pub fn greet(&mut self, peer: EndpointId, nonce: u64, now: Instant) -> Option<Greeting> {
        if peer == self.me || self.pending.contains_key(&peer) {
            return None;
        }
        self.pending.insert(
            peer,
            Pending {
                nonce,
                since: now,
                next: now + self.retry,
            },
        );
        Some(Greeting::Hello {
            to: peer,
            nonce,
            reply: false,
        })
    }

    /// Whether a handshake with `peer` of that nonce is under way (frames of its session may
    /// arrive before the answer).
    pub fn is_pending(&self, peer: &EndpointId, nonce: u64) -> bool {
        self.pending.get(peer).is_some_and(|p| p.nonce == nonce)
    }

    /// A hello from `peer` passed its checks; `current` is the rank of the session with it,
    /// if there is one.
    pub fn on_hello(
        &mut self,
        peer: EndpointId,
        nonce: u64,
        reply: bool,
        current: Option<Rank>,
    ) -> Vec<Greeting> {
        let rank = Rank {
            initiator: if reply { self.me } else { peer },
            nonce,
        };
        let answer = Greeting::Hello {
            to: peer,
            nonce,
            reply: true,
        };
        if current == Some(rank) {
            // A hello repeated (its answer was lost), or an answer repeated.
            return if reply { Vec::new() } else { vec![answer] };
        }
        if reply {
            return match self.pending.get(&peer) {
                Some(p) if p.nonce == nonce => {
                    self.pending.remove(&peer);
                    vec![Greeting::Open { peer, rank }]
                }
                // The answer to a handshake given up, or replaced.
                _ => Vec::new(),
            };
        }
        if let Some(p) = self.pending.get(&peer) {
            let ours = Rank {
                initiator: self.me,
                nonce: p.nonce,
            };
            if ours < rank {
                // Ours wins: the peer drops its own and answers ours.
                return Vec::new();
            }
            self.pending.remove(&peer);
        }
        vec![Greeting::Open { peer, rank }, answer]
    }

    /// How many handshakes are under way (a wire bounds them).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A handshake is no longer wanted (a session exists, or the peer is gone).
    pub fn forget(&mut self, peer: &EndpointId) {
        self.pending.remove(peer);
    }

    /// When [`Greeter::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next).min()
    }

    /// Hellos unanswered go again; those unanswered for the give-up time are dropped.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Greeting> {
        let give_up = self.give_up;
        self.pending.retain(|_, p| now < p.since + give_up);
        let mut out = Vec::new();
        for (peer, p) in &mut self.pending {
            if now >= p.next {
                p.next = now + self.retry;
                out.push(Greeting::Hello {
                    to: *peer,
                    nonce: p.nonce,
                    reply: false,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_hellos_settle_on_the_smaller_rank_on_both_sides() {
        let now = Instant::now();
        let (a, b) = (EndpointId::new(1, 1), EndpointId::new(2, 1));
        let d = Duration::from_millis(100);
        let mut ga = Greeter::new(a, d, d * 10);
        let mut gb = Greeter::new(b, d, d * 10);
        assert!(ga.greet(b, 7, now).is_some());
        assert!(gb.greet(a, 3, now).is_some());
        // Ranks: (a, 7) < (b, 3) since a < b.
        let at_b = gb.on_hello(a, 7, false, None);
        assert_eq!(
            at_b,
            [
                Greeting::Open {
                    peer: a,
                    rank: Rank {
                        initiator: a,
                        nonce: 7
                    }
                },
                Greeting::Hello {
                    to: a,
                    nonce: 7,
                    reply: true
                }
            ]
        );
        assert!(ga.on_hello(b, 3, false, None).is_empty(), "a's own wins");
        let at_a = ga.on_hello(b, 7, true, None);
        assert_eq!(
            at_a,
            [Greeting::Open {
                peer: b,
                rank: Rank {
                    initiator: a,
                    nonce: 7
                }
            }]
        );
        // A repeated hello is answered again, a repeated answer ignored.
        let r = Rank {
            initiator: a,
            nonce: 7,
        };
        assert_eq!(gb.on_hello(a, 7, false, Some(r)).len(), 1);
        assert!(ga.on_hello(b, 7, true, Some(r)).is_empty());
    }

    #[test]
    fn unanswered_hellos_go_again_then_are_given_up() {
        let now = Instant::now();
        let d = Duration::from_millis(100);
        let mut g = Greeter::new(EndpointId::new(1, 1), d, d * 3);
        let peer = EndpointId::new(2, 1);
        assert!(g.greet(peer, 5, now).is_some());
        assert!(g.greet(peer, 6, now).is_none(), "one at a time");
        assert_eq!(g.handle_timeout(now + d).len(), 1);
        assert!(g.is_pending(&peer, 5));
        assert!(g.handle_timeout(now + d * 3).is_empty());
        assert!(!g.is_pending(&peer, 5));
        assert!(g.poll_timeout().is_none());
    }
}
