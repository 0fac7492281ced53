//! Channels: named lanes with a delivery contract (kind, priority, order, reliability, size).

use serde::{Deserialize, Serialize};

use crate::{ChannelId, ChannelName, Error, Result};

/// The largest message a channel may allow: 16 MiB less room for an envelope's other
/// fields, so that any message fits the frames of every wire.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024 - 64 * 1024;

/// Whether a channel carries fleet-wide broadcasts or only agent-to-agent messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// Fleet broadcasts and direct messages are both allowed.
    Broadcast,
    /// Only direct messages, requests and streams; a fleet broadcast is refused.
    Unicast,
}

/// A message priority from 0 (lowest) to 9 (highest); higher priorities are delivered first
/// when several messages wait in an agent's inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The highest priority, 9.
    pub const MAX: Priority = Priority(9);
    /// The lowest priority, 0.
    pub const MIN: Priority = Priority(0);
    /// The default priority, 5.
    pub const DEFAULT: Priority = Priority(5);

    /// Makes a priority.
    ///
    /// # Errors
    /// [`Error::Configuration`] if `value` is above 9.
    pub fn new(value: u8) -> Result<Self> {
        if value <= Self::MAX.0 {
            Ok(Self(value))
        } else {
            Err(Error::config(
                "priority",
                format!("{value} is outside 0..=9"),
            ))
        }
    }

    /// The priority as a number.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Priority {
    type Error = String;
    fn try_from(value: u8) -> std::result::Result<Self, String> {
        Priority::new(value).map_err(|_| format!("priority {value} is outside 0..=9"))
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

/// A named channel and its delivery contract.
///
/// Both ends of a message must know the channel by name. A reliable channel delivers each
/// message exactly once (a full receiver makes the sender wait, up to its send timeout); an
/// unreliable one may drop messages under load and counts each drop. An ordered channel
/// delivers in send order; an unordered one lets a message overtake a slower one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Channel {
    /// The name messages refer to.
    pub name: ChannelName,
    /// The configured identifier (informational).
    #[serde(default)]
    pub id: Option<ChannelId>,
    /// Broadcast or unicast.
    #[serde(rename = "type")]
    pub kind: ChannelKind,
    /// Priority of the channel's messages.
    #[serde(default)]
    pub priority: Priority,
    /// Whether messages arrive in send order.
    #[serde(default = "yes")]
    pub ordered: bool,
    /// Whether every message arrives (exactly once).
    #[serde(default = "yes")]
    pub reliable: bool,
    /// Largest payload accepted, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// The time-to-live of its messages unless a send says otherwise, in milliseconds:
    /// what is not taken by then is dropped and reported `Expired` (none: no limit).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// What the receiving agent's inbox does with a reliable message that arrives when it
    /// is full (and what a sender whose window to it is full does). Default `block`.
    #[serde(default)]
    pub slow_consumer: SlowConsumer,
}

/// What happens when a receiver does not keep up: its inbox is full (it holds `capacity`
/// items) or the sender's window to it is (its unsettled messages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SlowConsumer {
    /// The message waits: a sender waits for room up to its send timeout, then fails with
    /// a typed error; a network receiver's inbox takes what the sender's window lets
    /// through, above its capacity.
    #[default]
    Block,
    /// The inbox drops the oldest message of the channel waiting in it to make room; that
    /// message's sender hears `DeliveryFailed(Dropped)`. A sender does not wait for room
    /// in its window: the send fails at once.
    DropOldest,
    /// The inbox drops the message that arrives; its sender hears
    /// `DeliveryFailed(Dropped)`. A sender does not wait for room in its window.
    DropNewest,
    /// As `dropNewest`, and said of the sender's side: nothing ever waits, a full window
    /// fails the send at once.
    Fail,
}

fn yes() -> bool {
    true
}

/// Default largest payload on a channel: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

fn default_max_message_size() -> usize {
    DEFAULT_MAX_MESSAGE_SIZE
}

/// The three presets: `coordination`, `results`, `metrics`, the channels an agent has when
/// its definition names none.
pub fn default_channels() -> Vec<Channel> {
    vec![
        Channel::coordination(),
        Channel::results(),
        Channel::metrics(),
    ]
}

impl Channel {
    /// A reliable, ordered channel of the given kind at the default priority.
    pub fn new(name: impl Into<ChannelName>, kind: ChannelKind) -> Self {
        Self {
            name: name.into(),
            id: None,
            kind,
            priority: Priority::DEFAULT,
            ordered: true,
            reliable: true,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            ttl_ms: None,
            slow_consumer: SlowConsumer::Block,
        }
    }

    /// The `coordination` preset: broadcast, priority 5, ordered, reliable.
    pub fn coordination() -> Self {
        Self::new("coordination", ChannelKind::Broadcast).with_priority(Priority(5))
    }

    /// The `results` preset: unicast, priority 7, unordered, reliable.
    pub fn results() -> Self {
        Self::new("results", ChannelKind::Unicast)
            .with_priority(Priority(7))
            .with_ordered(false)
    }

    /// The `metrics` preset: broadcast, priority 3, unordered, unreliable.
    pub fn metrics() -> Self {
        Self::new("metrics", ChannelKind::Broadcast)
            .with_priority(Priority(3))
            .with_ordered(false)
            .with_reliable(false)
    }

    /// The preset of that name (`coordination`, `results`, `metrics`), if there is one.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "coordination" => Some(Self::coordination()),
            "results" => Some(Self::results()),
            "metrics" => Some(Self::metrics()),
            _ => None,
        }
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Gives its messages a time-to-live unless a send says otherwise.
    pub fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets what a full receiver does with its messages.
    pub fn with_slow_consumer(mut self, policy: SlowConsumer) -> Self {
        self.slow_consumer = policy;
        self
    }

    /// Sets whether delivery is ordered.
    pub fn with_ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Sets whether delivery is reliable.
    pub fn with_reliable(mut self, reliable: bool) -> Self {
        self.reliable = reliable;
        self
    }

    /// Sets the largest payload accepted.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Checks the channel's own consistency.
    ///
    /// # Errors
    /// [`Error::Configuration`] for an empty name or a size limit of zero or above the wire's.
    pub fn validate(&self) -> Result<()> {
        if self.name.as_str().is_empty() {
            return Err(Error::config("name", "a channel name cannot be empty"));
        }
        if self.max_message_size == 0 || self.max_message_size > MAX_PAYLOAD_LEN {
            return Err(Error::config(
                "maxMessageSize",
                format!("{} is outside 1..={MAX_PAYLOAD_LEN}", self.max_message_size),
            ));
        }
        Ok(())
    }

    /// Checks a payload length against the channel's limit.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] when `len` is above `max_message_size`.
    pub fn check_size(&self, len: usize) -> Result<()> {
        if len > self.max_message_size {
            Err(Error::MessageTooLarge {
                size: len,
                max: self.max_message_size,
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_documented_contracts() {
        let c = Channel::coordination();
        assert_eq!(
            (c.kind, c.priority.get(), c.ordered, c.reliable),
            (ChannelKind::Broadcast, 5, true, true)
        );
        let r = Channel::results();
        assert_eq!(
            (r.kind, r.priority.get(), r.ordered, r.reliable),
            (ChannelKind::Unicast, 7, false, true)
        );
        let m = Channel::metrics();
        assert_eq!(
            (m.kind, m.priority.get(), m.ordered, m.reliable),
            (ChannelKind::Broadcast, 3, false, false)
        );
        assert!(Channel::preset("nope").is_none());
        for c in [c, r, m] {
            c.validate().expect("presets are valid");
        }
    }

    #[test]
    fn priority_is_bounded() {
        assert!(Priority::new(9).is_ok());
        assert!(matches!(
            Priority::new(10),
            Err(Error::Configuration { .. })
        ));
        assert!(Priority::MAX > Priority::MIN);
    }

    #[test]
    fn size_limit_is_enforced() {
        let c = Channel::metrics().with_max_message_size(10);
        assert!(c.check_size(10).is_ok());
        assert!(matches!(
            c.check_size(11),
            Err(Error::MessageTooLarge { size: 11, max: 10 })
        ));
        assert!(
            Channel::metrics()
                .with_max_message_size(0)
                .validate()
                .is_err()
        );
        assert!(
            Channel::metrics()
                .with_max_message_size(usize::MAX)
                .validate()
                .is_err()
        );
    }
}
