//! What a peer says it hosts: its membership, numbered by generations.
//!
//! Each endpoint numbers the states of its set of agents (its *generation*: 0 at start, one
//! more per attach or detach). A `Joined` or `Left` is applied only on top of the generation
//! before it; a snapshot (in parts) replaces what is known when it is not older. Anything
//! else (a gap, a heartbeat announcing a newer generation) makes this side ask for a
//! snapshot, again after two heartbeats unanswered. Bounded by the number of agents and
//! the encoded bytes of their registrations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_core::{AgentId, Registration};

use crate::config::MAX_SNAPSHOT_PARTS;
use crate::inflow::Budgets;

/// Agents that came and went at a peer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AgentsChange {
    /// Newly announced (or announced again with another registration).
    pub added: Vec<Arc<Registration>>,
    /// Gone.
    pub removed: Vec<AgentId>,
}

impl AgentsChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What an input did.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Applied, with what changed.
    Applied(AgentsChange),
    /// Something was missed: ask for a snapshot.
    Fetch,
    /// Nothing to do.
    Nothing,
}

struct Assembly {
    generation: u64,
    parts: Vec<Option<Vec<Registration>>>,
}

/// A peer's membership as this side knows it.
pub(crate) struct PeerMembership {
    generation: u64,
    agents: BTreeMap<AgentId, (Arc<Registration>, usize)>,
    bytes: usize,
    assembly: Option<Assembly>,
    /// When a snapshot was last asked for, while none came.
    fetching: Option<Instant>,
    max_agents: usize,
    max_bytes: usize,
    /// A snapshot asked for and not received is asked for again after this long.
    retry: Duration,
    /// The endpoint-wide budget of registration bytes every peer's agents draw from.
    budget: Arc<Budgets>,
}

fn size(reg: &Registration) -> usize {
    postcard::experimental::serialized_size(reg).unwrap_or(usize::MAX)
}

impl PeerMembership {
    pub(crate) fn new(
        max_agents: usize,
        max_bytes: usize,
        retry: Duration,
        budget: Arc<Budgets>,
    ) -> Self {
        Self {
            generation: 0,
            agents: BTreeMap::new(),
            bytes: 0,
            assembly: None,
            fetching: None,
            max_agents,
            max_bytes,
            retry,
            budget,
        }
    }

    /// Forgets every agent and gives their bytes back (the session ended).
    pub(crate) fn release(&mut self) {
        self.agents.clear();
        self.budget.membership.give(self.bytes as u64);
        self.bytes = 0;
        self.assembly = None;
    }

    /// Encoded registration bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    /// The generation applied.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the peer announced `agent`.
    pub(crate) fn registered(&self, agent: &AgentId) -> bool {
        self.agents.contains_key(agent)
    }

    /// The agents, as announced.
    pub(crate) fn agents(&self) -> impl Iterator<Item = &Arc<Registration>> {
        self.agents.values().map(|(r, _)| r)
    }

    fn fits(&self, reg: &Registration, len: usize) -> bool {
        let replacing = self.agents.get(&reg.id).map_or(0, |(_, l)| *l);
        (self.agents.len() < self.max_agents || self.agents.contains_key(&reg.id))
            && self.bytes - replacing + len <= self.max_bytes
    }

    fn insert(&mut self, reg: Registration, change: &mut AgentsChange) {
        let len = size(&reg);
        if let Some((old, _)) = self.agents.get(&reg.id)
            && **old == reg
        {
            return;
        }
        let replacing = self.agents.get(&reg.id).map_or(0, |(_, l)| *l);
        if !self.fits(&reg, len)
            || (len > replacing && !self.budget.membership.take((len - replacing) as u64))
        {
            tracing::warn!(agent = %reg.id, "a peer announces more agents (or registration bytes) than allowed, or the endpoint holds all the registrations it may; ignored");
            return;
        }
        if replacing > len {
            self.budget.membership.give((replacing - len) as u64);
        }
        let reg = Arc::new(reg);
        if let Some((_, old_len)) = self.agents.insert(reg.id.clone(), (reg.clone(), len)) {
            self.bytes -= old_len;
        }
        self.bytes += len;
        change.added.push(reg);
    }

    fn remove(&mut self, id: &AgentId, change: &mut AgentsChange) {
        if let Some((_, len)) = self.agents.remove(id) {
            self.bytes -= len;
            self.budget.membership.give(len as u64);
            change.removed.push(id.clone());
        }
    }

    /// A snapshot request is due: none asked, or the last one unanswered for long enough.
    fn fetch(&mut self, now: Instant) -> Step {
        match self.fetching {
            Some(at) if now < at + self.retry => Step::Nothing,
            _ => {
                self.fetching = Some(now);
                Step::Fetch
            }
        }
    }

    /// When an unanswered snapshot request is to be made again.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.fetching.map(|at| at + self.retry)
    }

    /// A retry of the snapshot request, if one is due.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Step {
        match self.fetching {
            Some(at) if now >= at + self.retry => self.fetch(now),
            _ => Step::Nothing,
        }
    }

    /// Part of a snapshot.
    pub(crate) fn on_snapshot(
        &mut self,
        generation: u64,
        part: u16,
        parts: u16,
        agents: Vec<Registration>,
    ) -> Step {
        if generation < self.generation || parts == 0 || parts > MAX_SNAPSHOT_PARTS || part >= parts
        {
            return Step::Nothing;
        }
        let fresh = || Assembly {
            generation,
            parts: (0..parts).map(|_| None).collect(),
        };
        let assembly = self.assembly.get_or_insert_with(fresh);
        if assembly.generation != generation || assembly.parts.len() != usize::from(parts) {
            if generation < assembly.generation {
                return Step::Nothing;
            }
            *assembly = fresh();
        }
        assembly.parts[usize::from(part)] = Some(agents);
        if assembly.parts.iter().any(Option::is_none) {
            return Step::Nothing;
        }
        let Some(done) = self.assembly.take() else {
            return Step::Nothing;
        };
        self.fetching = None;
        self.generation = generation;
        let mut change = AgentsChange::default();
        let new: Vec<Registration> = done.parts.into_iter().flatten().flatten().collect();
        let gone: Vec<AgentId> = self
            .agents
            .keys()
            .filter(|id| !new.iter().any(|r| &r.id == *id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id, &mut change);
        }
        for reg in new {
            self.insert(reg, &mut change);
        }
        Step::Applied(change)
    }

    /// An agent joined, making the peer's membership `generation`.
    pub(crate) fn on_joined(&mut self, generation: u64, agent: Registration, now: Instant) -> Step {
        self.on_change(generation, now, |m, c| m.insert(agent, c))
    }

    /// An agent left, making the peer's membership `generation`.
    pub(crate) fn on_left(&mut self, generation: u64, agent: &AgentId, now: Instant) -> Step {
        self.on_change(generation, now, |m, c| m.remove(agent, c))
    }

    fn on_change(
        &mut self,
        generation: u64,
        now: Instant,
        apply: impl FnOnce(&mut Self, &mut AgentsChange),
    ) -> Step {
        if self.assembly.is_none() && Some(generation) == self.generation.checked_add(1) {
            self.generation = generation;
            let mut change = AgentsChange::default();
            apply(self, &mut change);
            Step::Applied(change)
        } else if generation > self.generation {
            self.fetch(now)
        } else {
            Step::Nothing
        }
    }

    /// The peer says its membership is at `generation` (a heartbeat).
    pub(crate) fn on_generation(&mut self, generation: u64, now: Instant) -> Step {
        if generation > self.generation && self.assembly.is_none() {
            self.fetch(now)
        } else {
            Step::Nothing
        }
    }
}

impl Drop for PeerMembership {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(1);

    fn budget() -> Arc<Budgets> {
        Arc::new(Budgets::new(&crate::Config::default()))
    }

    fn reg(id: &str) -> Registration {
        Registration::new(id, "t")
    }

    fn ids(c: &AgentsChange) -> (Vec<&str>, Vec<&str>) {
        (
            c.added.iter().map(|r| r.id.as_str()).collect(),
            c.removed.iter().map(AgentId::as_str).collect(),
        )
    }

    #[test]
    fn joins_and_departures_apply_in_generation_order_and_gaps_fetch_a_snapshot() {
        let now = Instant::now();
        let mut m = PeerMembership::new(16, 1 << 20, RETRY, budget());
        let Step::Applied(c) = m.on_joined(1, reg("a"), now) else {
            panic!("applied")
        };
        assert_eq!(ids(&c), (vec!["a"], vec![]));
        assert_eq!(m.on_joined(1, reg("a"), now), Step::Nothing, "old news");
        assert_eq!(m.on_left(3, &"a".into(), now), Step::Fetch, "a gap");
        assert_eq!(m.on_generation(5, now), Step::Nothing, "asked already");
        assert_eq!(m.on_timeout(now + RETRY), Step::Fetch, "asked again");
        assert_eq!(
            m.on_snapshot(4, 1, 2, vec![reg("c")]),
            Step::Nothing,
            "a part"
        );
        let Step::Applied(c) = m.on_snapshot(4, 0, 2, vec![reg("b")]) else {
            panic!("complete")
        };
        assert_eq!(ids(&c), (vec!["b", "c"], vec!["a"]));
        assert_eq!(m.generation(), 4);
        assert!(m.retry_at().is_none());
        assert_eq!(m.on_snapshot(3, 0, 1, vec![]), Step::Nothing, "older");
        let Step::Applied(c) = m.on_snapshot(4, 0, 1, vec![reg("b"), reg("c")]) else {
            panic!("same generation, applied")
        };
        assert!(c.is_empty(), "nothing changed");
    }

    #[test]
    fn bounds_hold_in_agents_and_bytes() {
        let now = Instant::now();
        let mut m = PeerMembership::new(2, 1 << 20, RETRY, budget());
        let Step::Applied(c) = m.on_snapshot(1, 0, 1, vec![reg("a"), reg("b"), reg("c")]) else {
            panic!("applied")
        };
        assert_eq!(c.added.len(), 2, "two agents at most");
        let mut small = PeerMembership::new(100, 2 * size(&reg("a")), RETRY, budget());
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let _ = small.on_joined(i as u64 + 1, reg(id), now);
        }
        assert_eq!(small.agents().count(), 2, "registration bytes");
        assert!(!small.registered(&"c".into()));
        assert_eq!(
            m.on_snapshot(2, 0, MAX_SNAPSHOT_PARTS + 1, vec![]),
            Step::Nothing
        );
    }
}
