//! What an agent knows about another agent.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{Address, AgentId, AgentType, Capability, Channel, ChannelName, Error, Result};

/// The connection state of a peer as seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeerState {
    /// A connection is being set up.
    Connecting,
    /// The peer is reachable.
    Connected,
    /// The peer is known through another endpoint (peer exchange); a direct connection is
    /// made on first traffic.
    Known,
    /// The peer left or its connection ended.
    Disconnected,
    /// The last attempt to reach the peer failed.
    Error,
}

/// A peer agent: who it is, where, and how it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its id.
    pub id: AgentId,
    /// Its type.
    pub agent_type: AgentType,
    /// The network address of the endpoint hosting it, if it is remote.
    pub address: Option<Address>,
    /// Connection state.
    pub state: PeerState,
    /// Latest round-trip time to its endpoint, where the transport measures one.
    pub rtt: Option<Duration>,
    /// What it can do.
    pub capabilities: Vec<Capability>,
    /// The channels it listens on.
    pub channels: Vec<ChannelName>,
    /// When it was last heard from.
    pub last_activity: SystemTime,
    /// Free-form labels from its definition.
    pub metadata: BTreeMap<String, String>,
}

/// What an agent declares about itself when it attaches to a transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Its id.
    pub id: AgentId,
    /// Its type.
    pub agent_type: AgentType,
    /// What it can do.
    pub capabilities: Vec<Capability>,
    /// The channels it sends and listens on, with their contracts.
    pub channels: Vec<Channel>,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
}

impl Registration {
    /// A registration with no capabilities, channels or labels.
    pub fn new(id: impl Into<AgentId>, agent_type: impl Into<AgentType>) -> Self {
        Self {
            id: id.into(),
            agent_type: agent_type.into(),
            capabilities: Vec::new(),
            channels: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds a channel.
    pub fn with_channel(mut self, channel: Channel) -> Self {
        self.channels.push(channel);
        self
    }

    /// Adds a capability.
    pub fn with_capability(mut self, capability: impl Into<Capability>) -> Self {
        self.capabilities.push(capability.into());
        self
    }

    /// The channel of that name.
    ///
    /// # Errors
    /// [`Error::ChannelNotFound`] naming this agent when it has no such channel.
    pub fn channel(&self, name: &ChannelName) -> Result<&Channel> {
        self.channels
            .iter()
            .find(|c| &c.name == name)
            .ok_or_else(|| Error::ChannelNotFound {
                channel: name.clone(),
                agent: self.id.clone(),
            })
    }

    /// Checks something this agent sends: it has the channel, and the payload fits it.
    ///
    /// # Errors
    /// [`Error::ChannelNotFound`] naming this agent, or [`Error::MessageTooLarge`].
    pub fn check_outgoing(&self, channel: &ChannelName, payload_len: usize) -> Result<&Channel> {
        let c = self.channel(channel)?;
        c.check_size(payload_len)?;
        Ok(c)
    }

    /// Checks a fleet broadcast this agent sends: as [`Registration::check_outgoing`], and the
    /// channel must be a broadcast channel.
    ///
    /// # Errors
    /// As [`Registration::check_outgoing`], and [`Error::WrongChannelKind`].
    pub fn check_broadcast(&self, channel: &ChannelName, payload_len: usize) -> Result<&Channel> {
        let c = self.check_outgoing(channel, payload_len)?;
        if c.kind != crate::ChannelKind::Broadcast {
            return Err(Error::WrongChannelKind {
                channel: c.name.clone(),
                expected: crate::ChannelKind::Broadcast,
            });
        }
        Ok(c)
    }

    /// Whether the agent listens on that channel.
    pub fn has_channel(&self, name: &ChannelName) -> bool {
        self.channels.iter().any(|c| &c.name == name)
    }

    /// Checks every channel and that no two share a name.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the offending channel.
    pub fn validate(&self) -> Result<()> {
        for (i, c) in self.channels.iter().enumerate() {
            c.validate()
                .map_err(|e| e.in_config(None, &format!("channels[{i}].")))?;
            if self.channels[..i].iter().any(|d| d.name == c.name) {
                return Err(Error::config(
                    format!("channels[{i}].name"),
                    format!("channel {:?} is declared twice", c.name),
                ));
            }
        }
        Ok(())
    }

    /// How this agent appears to others.
    pub fn peer_info(&self, address: Option<Address>, state: PeerState) -> PeerInfo {
        PeerInfo {
            id: self.id.clone(),
            agent_type: self.agent_type.clone(),
            address,
            state,
            rtt: None,
            capabilities: self.capabilities.clone(),
            channels: self.channels.iter().map(|c| c.name.clone()).collect(),
            last_activity: SystemTime::now(),
            metadata: self.metadata.clone(),
        }
    }
}

/// The capability an agent's runtime announces when the agent takes streams (it has a stream
/// handler): an opener refuses at once to open a stream to an agent without it, rather than
/// sending data nobody reads.
pub const STREAM_CAPABILITY: &str = "aqe.streams";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_channels_are_refused() {
        let r = Registration::new("a", "worker")
            .with_channel(Channel::coordination())
            .with_channel(Channel::coordination());
        let err = r.validate().expect_err("duplicate");
        assert!(
            matches!(err, Error::Configuration { ref field, .. } if field == "channels[1].name"),
            "{err}"
        );
    }

    #[test]
    fn unknown_channel_names_the_agent() {
        let r = Registration::new("a", "worker").with_channel(Channel::metrics());
        assert!(r.channel(&"metrics".into()).is_ok());
        let err = r.channel(&"nope".into()).expect_err("unknown");
        assert!(matches!(err, Error::ChannelNotFound { ref agent, .. } if agent.as_str() == "a"));
    }
}
