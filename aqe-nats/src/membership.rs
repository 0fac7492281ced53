//! Who is where in a NATS fleet, as one state machine: presence frames, snapshots and the
//! passing of time go in, changes to act on come out. No I/O here, so every interleaving
//! can be tested without a server.
//!
//! Each endpoint numbers the states of its agent set (its *generation*, 0 when empty at
//! start). A heartbeat carries the generation; a join or departure carries the generation
//! it leads to and is applied only on top of the one before it. Anything else (a missed
//! announcement, a new endpoint, a restart) makes this side fetch a full snapshot.

use std::time::{Duration, Instant};

use aqe_core::{AgentId, Registration};

use crate::wire::Ep;
use crate::{Map, Set};

/// A snapshot request unanswered for this long is made again.
const FETCH_RETRY: Duration = Duration::from_secs(1);
/// Most frames one snapshot may be split into.
pub(crate) const MAX_SNAPSHOT_PARTS: u16 = 256;

/// What the transport must do or announce after an input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// An agent of another endpoint became reachable.
    Discovered(Ep, Registration),
    /// An agent of another endpoint is gone.
    Left(Ep, AgentId),
    /// An endpoint announced an agent id that another one (or this one) has: refused.
    Conflict { agent: AgentId, claimed_by: Ep },
    /// Ask this endpoint for its agents.
    Fetch(Ep),
    /// A new endpoint: tell it this one exists.
    Greet(Ep),
    /// The endpoint is gone (it said so, or fell silent): fail what waits on it.
    EndpointGone(Ep),
}

#[derive(Debug)]
struct Remote {
    /// The generation of `agents`.
    generation: u64,
    last_heard: Instant,
    /// Its agents that this side accepted.
    agents: Map<AgentId, Registration>,
    /// Its agents refused because another endpoint had the id first: promoted when that one
    /// leaves.
    refused: Map<AgentId, Registration>,
    /// When a snapshot was last asked for, while unanswered.
    fetching: Option<Instant>,
    /// Parts of a snapshot being assembled: its generation and the parts so far.
    assembly: Option<(u64, Vec<Option<Vec<Registration>>>)>,
}

/// The membership of the fleet as this endpoint sees it.
#[derive(Debug)]
pub(crate) struct Membership {
    me: Ep,
    max_endpoints: usize,
    max_agents: usize,
    remotes: Map<Ep, Remote>,
    /// Which endpoint has each remote agent id.
    owners: Map<AgentId, Ep>,
    locals: Set<AgentId>,
}

impl Membership {
    pub(crate) fn new(me: Ep, max_endpoints: usize, max_agents: usize) -> Self {
        Self {
            me,
            max_endpoints,
            max_agents,
            remotes: Map::default(),
            owners: Map::default(),
            locals: Set::default(),
        }
    }

    /// Where a remote agent is.
    pub(crate) fn lookup(&self, agent: &AgentId) -> Option<(Ep, &Registration)> {
        let ep = *self.owners.get(agent)?;
        self.remotes
            .get(&ep)
            .and_then(|r| r.agents.get(agent))
            .map(|reg| (ep, reg))
    }

    /// Every remote agent, with its endpoint and when that endpoint was last heard.
    pub(crate) fn agents(&self) -> impl Iterator<Item = (Ep, &Registration, Instant)> {
        self.remotes
            .iter()
            .flat_map(|(ep, r)| r.agents.values().map(move |a| (*ep, a, r.last_heard)))
    }

    /// The endpoints known now.
    pub(crate) fn endpoints(&self) -> usize {
        self.remotes.len()
    }

    /// Whether `ep` is a known endpoint.
    pub(crate) fn knows(&self, ep: Ep) -> bool {
        self.remotes.contains_key(&ep)
    }

    /// A local agent attached: a remote claim on its id is refused from now on.
    pub(crate) fn attach_local(&mut self, agent: AgentId) {
        self.locals.insert(agent);
    }

    /// A local agent detached.
    pub(crate) fn detach_local(&mut self, agent: &AgentId) -> Vec<Change> {
        self.locals.remove(agent);
        let mut out = Vec::new();
        self.promote(agent, &mut out);
        out
    }

    /// Any frame from `ep` shows it is alive.
    pub(crate) fn heard(&mut self, ep: Ep, now: Instant) {
        if let Some(r) = self.remotes.get_mut(&ep) {
            r.last_heard = now;
        }
    }

    /// A heartbeat.
    pub(crate) fn on_alive(&mut self, ep: Ep, generation: u64, now: Instant) -> Vec<Change> {
        let mut out = Vec::new();
        if let Some(r) = self.remote(ep, now, &mut out)
            && r.generation != generation
        {
            Self::fetch(ep, r, now, &mut out);
        }
        out
    }

    /// An agent joined `ep`, taking it to `generation`.
    pub(crate) fn on_joined(
        &mut self,
        ep: Ep,
        generation: u64,
        agent: Registration,
        now: Instant,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        let Some(r) = self.remote(ep, now, &mut out) else {
            return out;
        };
        if generation == r.generation + 1 && r.assembly.is_none() {
            r.generation = generation;
            self.admit(ep, agent, &mut out);
        } else if generation > r.generation {
            Self::fetch(ep, r, now, &mut out);
        }
        out
    }

    /// An agent left `ep`, taking it to `generation`.
    pub(crate) fn on_left(
        &mut self,
        ep: Ep,
        generation: u64,
        agent: &AgentId,
        now: Instant,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        let Some(r) = self.remote(ep, now, &mut out) else {
            return out;
        };
        if generation == r.generation + 1 && r.assembly.is_none() {
            r.generation = generation;
            self.remove(ep, agent, &mut out);
        } else if generation > r.generation {
            Self::fetch(ep, r, now, &mut out);
        }
        out
    }

    /// One part of the snapshot of `ep`'s agents at `generation`.
    pub(crate) fn on_snapshot(
        &mut self,
        ep: Ep,
        generation: u64,
        part: u16,
        parts: u16,
        agents: Vec<Registration>,
        now: Instant,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        let max_agents = self.max_agents;
        // Only endpoints that announced themselves are asked, so only they are answered.
        let Some(r) = self.remotes.get_mut(&ep) else {
            return out;
        };
        r.last_heard = now;
        if generation < r.generation || parts == 0 || parts > MAX_SNAPSHOT_PARTS || part >= parts {
            return out;
        }
        let assembly = match &mut r.assembly {
            Some((g, p)) if *g == generation && p.len() == usize::from(parts) => p,
            _ => {
                r.assembly = Some((generation, vec![None; usize::from(parts)]));
                match &mut r.assembly {
                    Some((_, p)) => p,
                    None => return out,
                }
            }
        };
        assembly[usize::from(part)] = Some(agents);
        if assembly.iter().any(Option::is_none) {
            return out;
        }
        let Some((_, parts)) = r.assembly.take() else {
            return out;
        };
        r.generation = generation;
        r.fetching = None;
        let mut incoming: Map<AgentId, Registration> = Map::default();
        for reg in parts.into_iter().flatten().flatten() {
            if incoming.len() >= max_agents {
                tracing::warn!(endpoint = %ep, max_agents, "endpoint announces too many agents; the rest are ignored");
                break;
            }
            incoming.insert(reg.id.clone(), reg);
        }
        let gone: Vec<AgentId> = r
            .agents
            .keys()
            .chain(r.refused.keys())
            .filter(|id| !incoming.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(ep, &id, &mut out);
        }
        for (id, reg) in incoming {
            let known = self
                .remotes
                .get(&ep)
                .is_some_and(|r| r.agents.contains_key(&id) || r.refused.contains_key(&id));
            if !known {
                self.admit(ep, reg, &mut out);
            }
        }
        out
    }

    /// `ep` said it shuts down.
    pub(crate) fn on_gone(&mut self, ep: Ep) -> Vec<Change> {
        let mut out = Vec::new();
        self.drop_endpoint(ep, &mut out);
        out
    }

    /// Endpoints silent for `liveness` are gone; unanswered snapshot requests are made
    /// again.
    pub(crate) fn tick(&mut self, now: Instant, liveness: Duration) -> Vec<Change> {
        let mut out = Vec::new();
        let silent: Vec<Ep> = self
            .remotes
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_heard) >= liveness)
            .map(|(ep, _)| *ep)
            .collect();
        for ep in silent {
            tracing::info!(endpoint = %ep, ?liveness, "endpoint silent: its agents are gone");
            self.drop_endpoint(ep, &mut out);
        }
        for (ep, r) in &mut self.remotes {
            if r.fetching
                .is_some_and(|t| now.saturating_duration_since(t) >= FETCH_RETRY)
            {
                r.fetching = Some(now);
                out.push(Change::Fetch(*ep));
            }
        }
        out
    }

    /// The known remote `ep`, made known now if it is new and there is room.
    fn remote(&mut self, ep: Ep, now: Instant, out: &mut Vec<Change>) -> Option<&mut Remote> {
        if ep == self.me {
            return None;
        }
        if !self.remotes.contains_key(&ep) {
            if self.remotes.len() >= self.max_endpoints {
                tracing::warn!(endpoint = %ep, max = self.max_endpoints, "too many endpoints; this one is ignored");
                return None;
            }
            self.remotes.insert(
                ep,
                Remote {
                    generation: 0,
                    last_heard: now,
                    agents: Map::default(),
                    refused: Map::default(),
                    fetching: None,
                    assembly: None,
                },
            );
            out.push(Change::Greet(ep));
        }
        let r = self.remotes.get_mut(&ep)?;
        r.last_heard = now;
        Some(r)
    }

    fn fetch(ep: Ep, r: &mut Remote, now: Instant, out: &mut Vec<Change>) {
        if r.fetching.is_none() {
            r.fetching = Some(now);
            out.push(Change::Fetch(ep));
        }
    }

    /// Accepts `reg` as an agent of `ep`, unless its id is taken.
    fn admit(&mut self, ep: Ep, reg: Registration, out: &mut Vec<Change>) {
        let Some(r) = self.remotes.get_mut(&ep) else {
            return;
        };
        if r.agents.len() + r.refused.len() >= self.max_agents {
            tracing::warn!(endpoint = %ep, max = self.max_agents, "endpoint announces too many agents; ignored");
            return;
        }
        let id = reg.id.clone();
        let taken = self.locals.contains(&id) || self.owners.get(&id).is_some_and(|o| *o != ep);
        if taken {
            r.refused.insert(id.clone(), reg);
            out.push(Change::Conflict {
                agent: id,
                claimed_by: ep,
            });
            return;
        }
        r.agents.insert(id.clone(), reg.clone());
        self.owners.insert(id, ep);
        out.push(Change::Discovered(ep, reg));
    }

    fn remove(&mut self, ep: Ep, id: &AgentId, out: &mut Vec<Change>) {
        let Some(r) = self.remotes.get_mut(&ep) else {
            return;
        };
        r.refused.remove(id);
        if r.agents.remove(id).is_some() {
            self.owners.remove(id);
            out.push(Change::Left(ep, id.clone()));
            self.promote(id, out);
        }
    }

    /// `id` is free again: the first endpoint whose claim was refused gets it.
    fn promote(&mut self, id: &AgentId, out: &mut Vec<Change>) {
        if self.locals.contains(id) || self.owners.contains_key(id) {
            return;
        }
        let claimant = self
            .remotes
            .iter()
            .filter(|(_, r)| r.refused.contains_key(id))
            .map(|(ep, _)| *ep)
            .min();
        if let Some(ep) = claimant
            && let Some(reg) = self.remotes.get_mut(&ep).and_then(|r| r.refused.remove(id))
        {
            self.admit(ep, reg, out);
        }
    }

    fn drop_endpoint(&mut self, ep: Ep, out: &mut Vec<Change>) {
        let Some(r) = self.remotes.remove(&ep) else {
            return;
        };
        out.push(Change::EndpointGone(ep));
        for id in r.agents.into_keys() {
            self.owners.remove(&id);
            out.push(Change::Left(ep, id.clone()));
            self.promote(&id, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Registration {
        Registration::new(id, "t")
    }

    fn ids(m: &Membership) -> Vec<String> {
        let mut v: Vec<String> = m.agents().map(|(_, r, _)| r.id.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn joins_apply_in_order_and_a_gap_fetches_a_snapshot() {
        let now = Instant::now();
        let mut m = Membership::new(Ep(0), 16, 16);
        let c = m.on_alive(Ep(1), 0, now);
        assert_eq!(c, vec![Change::Greet(Ep(1))]);
        let c = m.on_joined(Ep(1), 1, reg("a"), now);
        assert_eq!(c, vec![Change::Discovered(Ep(1), reg("a"))]);
        // Generation 2 was missed: 3 cannot be applied, a snapshot is fetched instead.
        let c = m.on_joined(Ep(1), 3, reg("c"), now);
        assert_eq!(c, vec![Change::Fetch(Ep(1))]);
        assert_eq!(ids(&m), ["a"]);
        let c = m.on_snapshot(Ep(1), 3, 0, 2, vec![reg("b")], now);
        assert!(c.is_empty(), "waits for every part");
        let c = m.on_snapshot(Ep(1), 3, 1, 2, vec![reg("c")], now);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.contains(&Change::Left(Ep(1), "a".into())));
        assert_eq!(ids(&m), ["b", "c"]);
        // A stale departure changes nothing.
        assert!(m.on_left(Ep(1), 2, &"b".into(), now).is_empty());
        assert_eq!(
            m.on_left(Ep(1), 4, &"b".into(), now),
            vec![Change::Left(Ep(1), "b".into())]
        );
    }

    #[test]
    fn every_interleaving_of_joins_and_heartbeats_converges() {
        // The announcements of three joins and a departure, delivered in every order, with
        // some lost; after heartbeats and snapshot answers both sides agree.
        let truth = |g: u64| -> Vec<Registration> {
            let mut v = Vec::new();
            for (i, id) in ["a", "b", "c"].iter().enumerate() {
                if g > i as u64 && !(g >= 4 && *id == "b") {
                    v.push(reg(id));
                }
            }
            v
        };
        let events: Vec<(u64, Option<&str>, bool)> = vec![
            (1, Some("a"), true),
            (2, Some("b"), true),
            (3, Some("c"), true),
            (4, Some("b"), false),
        ];
        for mask in 0u32..(1 << 4) {
            for rot in 0..4 {
                let now = Instant::now();
                let mut m = Membership::new(Ep(0), 16, 16);
                m.on_alive(Ep(7), 0, now);
                for k in 0..4 {
                    let (g, id, join) = events[(k + rot) % 4];
                    if mask & (1 << k) != 0 {
                        continue; // lost
                    }
                    let id = id.expect("id");
                    if join {
                        m.on_joined(Ep(7), g, reg(id), now);
                    } else {
                        m.on_left(Ep(7), g, &id.into(), now);
                    }
                }
                // The heartbeat at generation 4, then the snapshot it asks for.
                let c = m.on_alive(Ep(7), 4, now);
                let asked = c.contains(&Change::Fetch(Ep(7)))
                    || m.remotes.get(&Ep(7)).is_some_and(|r| r.fetching.is_some());
                if asked {
                    m.on_snapshot(Ep(7), 4, 0, 1, truth(4), now);
                }
                assert_eq!(ids(&m), ["a", "c"], "mask {mask:04b} rotation {rot}");
            }
        }
    }

    #[test]
    fn a_second_claim_is_refused_then_promoted_when_the_first_leaves() {
        let now = Instant::now();
        let mut m = Membership::new(Ep(0), 16, 16);
        m.attach_local("mine".into());
        m.on_alive(Ep(1), 0, now);
        m.on_alive(Ep(2), 0, now);
        assert_eq!(
            m.on_joined(Ep(2), 1, reg("mine"), now),
            vec![Change::Conflict {
                agent: "mine".into(),
                claimed_by: Ep(2)
            }]
        );
        m.on_joined(Ep(1), 1, reg("x"), now);
        assert_eq!(
            m.on_joined(Ep(2), 2, reg("x"), now),
            vec![Change::Conflict {
                agent: "x".into(),
                claimed_by: Ep(2)
            }]
        );
        assert_eq!(m.lookup(&"x".into()).map(|(ep, _)| ep), Some(Ep(1)));
        // The first owner falls silent (a crash): the restarted claimant takes over.
        m.heard(Ep(2), now + Duration::from_secs(2));
        let c = m.tick(now + Duration::from_secs(3), Duration::from_secs(3));
        assert!(c.contains(&Change::EndpointGone(Ep(1))));
        assert!(c.contains(&Change::Left(Ep(1), "x".into())));
        assert!(c.contains(&Change::Discovered(Ep(2), reg("x"))));
        assert_eq!(m.lookup(&"x".into()).map(|(ep, _)| ep), Some(Ep(2)));
        // The local agent detaches: the refused remote claim is promoted.
        let c = m.detach_local(&"mine".into());
        assert_eq!(c, vec![Change::Discovered(Ep(2), reg("mine"))]);
    }

    #[test]
    fn limits_bound_endpoints_agents_and_snapshots() {
        let now = Instant::now();
        let mut m = Membership::new(Ep(0), 2, 3);
        m.on_alive(Ep(1), 0, now);
        m.on_alive(Ep(2), 0, now);
        assert!(
            m.on_alive(Ep(3), 0, now).is_empty(),
            "a third endpoint is ignored"
        );
        assert_eq!(m.endpoints(), 2);
        assert!(
            m.on_alive(Ep(0), 5, now).is_empty(),
            "itself is never a remote"
        );
        m.on_alive(Ep(1), 9, now);
        let many: Vec<Registration> = (0..10).map(|i| reg(&format!("a{i}"))).collect();
        m.on_snapshot(Ep(1), 9, 0, 1, many, now);
        assert_eq!(m.agents().count(), 3);
        // Absurd part numbers are ignored.
        assert!(
            m.on_snapshot(Ep(2), 1, 5, 2, vec![reg("z")], now)
                .is_empty()
        );
        assert!(
            m.on_snapshot(Ep(2), 1, 0, MAX_SNAPSHOT_PARTS + 1, vec![reg("z")], now)
                .is_empty()
        );
        // Unknown endpoints' snapshots are ignored.
        assert!(
            m.on_snapshot(Ep(9), 1, 0, 1, vec![reg("z")], now)
                .is_empty()
        );
    }

    #[test]
    fn silence_and_goodbyes_end_an_endpoint() {
        let now = Instant::now();
        let mut m = Membership::new(Ep(0), 16, 16);
        m.on_alive(Ep(1), 0, now);
        m.on_joined(Ep(1), 1, reg("a"), now);
        assert!(
            m.tick(now + Duration::from_secs(1), Duration::from_secs(3))
                .is_empty()
        );
        let c = m.on_gone(Ep(1));
        assert_eq!(
            c,
            vec![Change::EndpointGone(Ep(1)), Change::Left(Ep(1), "a".into())]
        );
        assert!(m.lookup(&"a".into()).is_none());
        assert!(!m.knows(Ep(1)));
    }
}
