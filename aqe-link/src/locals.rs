//! The agents this endpoint hosts: their registrations, inboxes and counters.

use std::sync::{Arc, RwLock};

use aqe_core::plumbing::{FastMap, LocalAgent};
use aqe_core::{AgentId, ChannelName};

/// The local agents, read on every delivery, written on attach and detach.
#[derive(Debug)]
pub(crate) struct Locals {
    agents: RwLock<FastMap<AgentId, Arc<LocalAgent>>>,
    /// This endpoint's introspection id: requests to it are answered by the host.
    pub(crate) introspection: AgentId,
}

impl Locals {
    pub(crate) fn new(introspection: AgentId) -> Self {
        Self {
            agents: RwLock::new(FastMap::default()),
            introspection,
        }
    }

    pub(crate) fn get(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn contains(&self, id: &AgentId) -> bool {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    pub(crate) fn insert(&self, agent: Arc<LocalAgent>) {
        self.agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.reg.id.clone(), agent);
    }

    pub(crate) fn remove(&self, id: &AgentId) -> Option<Arc<LocalAgent>> {
        self.agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    pub(crate) fn all(&self) -> Vec<Arc<LocalAgent>> {
        let mut v: Vec<Arc<LocalAgent>> = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.reg.id.cmp(&b.reg.id));
        v
    }

    pub(crate) fn clear(&self) {
        self.agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl aqe_session::Locals for Locals {
    fn admits(&self, to: &AgentId, channel: &ChannelName) -> bool {
        *to == self.introspection
            || self
                .agents
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(to)
                .is_some_and(|a| a.reg.has_channel(channel))
    }
}
