//! The agents this endpoint hosts (aqe-core's table, shared with every transport), and the
//! endpoint's introspection id, which the session layer admits as a recipient too.

use std::ops::Deref;

use aqe_core::plumbing::LocalAgents;
use aqe_core::{AgentId, ChannelName};

/// The local agents, and the id requests for this endpoint's report go to.
#[derive(Debug)]
pub(crate) struct Locals {
    agents: LocalAgents,
    /// This endpoint's introspection id: requests to it are answered by the host.
    pub(crate) introspection: AgentId,
}

impl Locals {
    pub(crate) fn new(introspection: AgentId) -> Self {
        Self {
            agents: LocalAgents::default(),
            introspection,
        }
    }
}

impl Deref for Locals {
    type Target = LocalAgents;

    fn deref(&self) -> &LocalAgents {
        &self.agents
    }
}

impl aqe_session::Locals for Locals {
    fn admits(&self, to: &AgentId, channel: &ChannelName) -> bool {
        *to == self.introspection || self.agents.admits(to, channel)
    }
}
