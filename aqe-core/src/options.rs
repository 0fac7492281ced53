//! Options of the agent operations, with the defaults a caller gets when it says nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{AgentId, ChannelName, PeerInfo, Priority};

/// How a request waits and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOptions {
    /// How long one attempt waits for the response. Default 5 s.
    pub timeout: Duration,
    /// How many more attempts after a timeout or an unreachable peer. Default 0.
    pub retries: u32,
    /// Pause between attempts. Default 100 ms.
    pub retry_delay: Duration,
    /// The channel the request travels on. Default `coordination`.
    pub channel: ChannelName,
}

impl Default for RequestOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            retries: 0,
            retry_delay: Duration::from_millis(100),
            channel: ChannelName::from("coordination"),
        }
    }
}

impl RequestOptions {
    /// Sets the per-attempt timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the number of retries.
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets the pause between attempts.
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Sets the channel.
    pub fn with_channel(mut self, channel: impl Into<ChannelName>) -> Self {
        self.channel = channel.into();
        self
    }
}

/// How one direct message is sent ([`SendOptions::on`] a channel, then the rest).
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The channel. Default `coordination`.
    pub channel: ChannelName,
    /// How long the message may wait to be taken, from when it is sent: a message its
    /// receiving agent has not taken by then is dropped wherever it waits (never handed to
    /// a handler late), and on a reliable channel its sender hears
    /// `DeliveryFailed(Expired)`. Default: the channel's (`ttlMs`), if any.
    pub ttl: Option<Duration>,
    /// Wait until the receiving agent has taken it (reliable channels only). Default no.
    pub confirm: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            channel: ChannelName::from("coordination"),
            ttl: None,
            confirm: false,
        }
    }
}

impl SendOptions {
    /// Send on `channel`.
    pub fn on(channel: impl Into<ChannelName>) -> Self {
        Self {
            channel: channel.into(),
            ..Self::default()
        }
    }

    /// With a time-to-live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Waiting until the receiving agent has taken it.
    pub fn confirmed(mut self) -> Self {
        self.confirm = true;
        self
    }
}

/// Who a fleet broadcast reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastOptions {
    /// The channel; only peers listening on it are reached. Default `coordination`.
    pub channel: ChannelName,
    /// If set, only these peers (that also listen on the channel).
    pub include: Option<Vec<AgentId>>,
    /// Peers left out.
    pub exclude: Vec<AgentId>,
    /// Resolve once every target has taken the message or it failed for them (reliable
    /// channels only): the report then says, target by target, taken or why not. Default
    /// no (the report says which targets accepted it for delivery).
    pub confirm: bool,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        Self {
            channel: ChannelName::from("coordination"),
            include: None,
            exclude: Vec::new(),
            confirm: false,
        }
    }
}

impl BroadcastOptions {
    /// Broadcast on `channel` to every listener.
    pub fn on(channel: impl Into<ChannelName>) -> Self {
        Self {
            channel: channel.into(),
            ..Self::default()
        }
    }

    /// Restricts the broadcast to these peers.
    pub fn including(mut self, peers: impl IntoIterator<Item = AgentId>) -> Self {
        self.include = Some(peers.into_iter().collect());
        self
    }

    /// Waits for every target's outcome (taken, or failed with the reason).
    pub fn confirmed(mut self) -> Self {
        self.confirm = true;
        self
    }

    /// Leaves these peers out.
    pub fn excluding(mut self, peers: impl IntoIterator<Item = AgentId>) -> Self {
        self.exclude.extend(peers);
        self
    }

    /// Whether `peer` is among the targets the options allow.
    pub fn admits(&self, peer: &AgentId) -> bool {
        self.include.as_ref().is_none_or(|inc| inc.contains(peer)) && !self.exclude.contains(peer)
    }
}

/// A predicate over peers, for discovery.
#[derive(Clone)]
pub struct PeerFilter(Arc<dyn Fn(&PeerInfo) -> bool + Send + Sync>);

impl PeerFilter {
    /// Wraps a closure.
    pub fn new(f: impl Fn(&PeerInfo) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Applies the predicate.
    pub fn matches(&self, peer: &PeerInfo) -> bool {
        (self.0)(peer)
    }
}

impl fmt::Debug for PeerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerFilter(..)")
    }
}

/// Which peers discovery returns.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryOptions {
    /// Keeps only peers the predicate accepts.
    pub filter: Option<PeerFilter>,
    /// Returns at most this many peers (after filtering, in id order).
    pub max_peers: Option<usize>,
    /// Keeps only peers that listen on every one of these channels.
    pub channels: Vec<ChannelName>,
}

impl DiscoveryOptions {
    /// Keeps only peers the closure accepts.
    pub fn with_filter(mut self, f: impl Fn(&PeerInfo) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(PeerFilter::new(f));
        self
    }

    /// Returns at most `max` peers.
    pub fn with_max_peers(mut self, max: usize) -> Self {
        self.max_peers = Some(max);
        self
    }

    /// Keeps only peers on this channel.
    pub fn with_channel(mut self, channel: impl Into<ChannelName>) -> Self {
        self.channels.push(channel.into());
        self
    }

    /// Applies the options to a list of peers: filter, channels, id order, limit.
    pub fn select(&self, mut peers: Vec<PeerInfo>) -> Vec<PeerInfo> {
        peers.retain(|p| {
            self.filter.as_ref().is_none_or(|f| f.matches(p))
                && self.channels.iter().all(|c| p.channels.contains(c))
        });
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(max) = self.max_peers {
            peers.truncate(max);
        }
        peers
    }
}

/// How a stream's data travels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamOptions {
    /// The channel the stream belongs to (the receiver must listen on it). Default `coordination`.
    pub channel: ChannelName,
    /// Priority of its data. Default 5.
    pub priority: Priority,
    /// Whether chunks arrive in write order. Default true.
    pub ordered: bool,
    /// Whether every chunk arrives; an unreliable stream drops chunks the receiver cannot take
    /// in time, and counts them. Default true.
    pub reliable: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            channel: ChannelName::from("coordination"),
            priority: Priority::DEFAULT,
            ordered: true,
            reliable: true,
        }
    }
}

impl StreamOptions {
    /// Sets the channel.
    pub fn with_channel(mut self, channel: impl Into<ChannelName>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets ordering.
    pub fn with_ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Sets reliability.
    pub fn with_reliable(mut self, reliable: bool) -> Self {
        self.reliable = reliable;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PeerState, Registration};

    fn peer(id: &str, ty: &str, channel: &str) -> PeerInfo {
        Registration::new(id, ty)
            .with_channel(crate::Channel::new(channel, crate::ChannelKind::Broadcast))
            .peer_info(None, PeerState::Connected)
    }

    #[test]
    fn discovery_filters_sorts_and_limits() {
        let peers = vec![
            peer("w3", "worker", "c"),
            peer("m1", "monitor", "c"),
            peer("w1", "worker", "c"),
            peer("w2", "worker", "x"),
        ];
        let opts = DiscoveryOptions::default()
            .with_filter(|p| p.agent_type.as_str() == "worker")
            .with_max_peers(5);
        let ids: Vec<_> = opts
            .select(peers.clone())
            .into_iter()
            .map(|p| p.id.to_string())
            .collect();
        assert_eq!(ids, ["w1", "w2", "w3"]);
        let opts = opts.with_channel("c").with_max_peers(1);
        let ids: Vec<_> = opts
            .select(peers)
            .into_iter()
            .map(|p| p.id.to_string())
            .collect();
        assert_eq!(ids, ["w1"]);
    }

    #[test]
    fn broadcast_include_and_exclude() {
        let o = BroadcastOptions::on("c")
            .including(["a".into(), "b".into()])
            .excluding(["b".into()]);
        assert!(o.admits(&"a".into()));
        assert!(!o.admits(&"b".into()));
        assert!(!o.admits(&"c".into()));
        assert!(BroadcastOptions::default().admits(&"z".into()));
    }
}
