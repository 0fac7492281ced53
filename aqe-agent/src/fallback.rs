//! A transport made of an ordered chain: try the first, and where it cannot reach a peer, the
//! next. FALLBACK.md at the repository root gives the policy link by link.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use aqe_core::plumbing::InboxSender;
use aqe_core::{
    AgentId, BroadcastReport, ChannelName, Envelope, Error, Event, PeerInfo, Redeliver,
    Registration, Result, SendFailure, Stats, StreamHeader, StreamSink, Transport, TransportKind,
};

/// An ordered flow: sender, receiver, channel.
type Flow = (AgentId, AgentId, ChannelName);

/// When an operation moves from one transport of a chain to the next.
///
/// The default falls back when the peer is unreachable over a transport (connection failed,
/// timed out or lost; peer unknown there; its receiver gone) and when a request times out.
/// It never falls back for a problem with the message itself (too large, unknown channel,
/// a handler's error response): the next transport would refuse it too, or run it twice.
///
/// A request that times out is sent again over the next transport *with the same id*, while
/// the first attempt is kept open: the responding agent recognises the id and answers from
/// the execution already running (or from the answer it just gave), so its handler runs at
/// most once. Such a request may therefore take up to its timeout once per transport tried.
/// Reliable messages a transport accepted but could not deliver (its connection to the
/// receiver ended before they were acknowledged) are handed to the next transports before
/// being reported failed; the receiver's inbox drops a copy it already took, by message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackPolicy {
    /// Fall back when the peer cannot be reached over the transport.
    pub on_unreachable: bool,
    /// Fall back when a request times out over the transport.
    pub on_timeout: bool,
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        Self {
            on_unreachable: true,
            on_timeout: true,
        }
    }
}

impl FallbackPolicy {
    /// Whether `error`, from a transport, sends the operation to the next one.
    pub fn applies(&self, error: &Error) -> bool {
        match error {
            Error::Timeout { .. } => self.on_timeout,
            e => e.is_unreachable() && self.on_unreachable,
        }
    }
}

/// One transport of the chain, and when to leave it for the next.
struct Link {
    transport: Arc<dyn Transport>,
    /// When an operation that failed here goes on to the next link (unused on the last).
    policy: FallbackPolicy,
}

/// A [`Transport`] over an ordered chain of transports (QUIC, then NATS, then the local bus,
/// say): agents attach to all of them; each operation goes to the first and, when that
/// link's [`FallbackPolicy`] says so, on to the next. Every fallback is counted in the
/// agent's `fallbacks_used` and announced as [`Event::FallbackUsed`].
///
/// Membership is the union of all; an agent reachable over several is announced once.
///
/// ```no_run
/// # async fn f(quic: std::sync::Arc<dyn aqe_core::Transport>,
/// #            nats: std::sync::Arc<dyn aqe_core::Transport>) {
/// use std::sync::Arc;
/// use aqe_agent::{EventBus, Fallback, FallbackPolicy};
/// let chain = Fallback::chain(quic)
///     .then(nats, FallbackPolicy::default())
///     .then(Arc::new(EventBus::new()), FallbackPolicy::default())
///     .build();
/// # }
/// ```
pub struct Fallback {
    links: Vec<Link>,
    account: Arc<Account>,
    shutdown: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The ordered reliable channels of each attached agent.
    ordered: DashMap<AgentId, Arc<HashSet<ChannelName>>>,
    /// The link that last carried each ordered flow (sender, receiver, channel).
    last_link: DashMap<(AgentId, AgentId, ChannelName), usize>,
}

/// How long a message on an ordered channel waits, when its flow moves to another link, for
/// what the previous link still carries to reach the receiver (redeliveries included).
pub const ORDERED_SWITCH_WAIT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.links.iter().map(|l| l.transport.kind()))
            .finish()
    }
}

/// Builds a [`Fallback`] chain, first transport first.
#[must_use]
pub struct FallbackBuilder {
    links: Vec<Link>,
}

impl FallbackBuilder {
    /// Adds `next` after the transports so far; an operation goes on to it when the one
    /// before fails as `policy` says.
    pub fn then(mut self, next: Arc<dyn Transport>, policy: FallbackPolicy) -> Self {
        if let Some(last) = self.links.last_mut() {
            last.policy = policy;
        }
        self.links.push(Link {
            transport: next,
            policy: FallbackPolicy::default(),
        });
        self
    }

    /// Starts the chain. Must be called within a tokio runtime: it starts the tasks that
    /// merge the transports' events, which end at [`Fallback::close`] or shutdown.
    pub fn build(self) -> Arc<Fallback> {
        Fallback::from_links(self.links)
    }
}

impl Fallback {
    /// What the links list (`list`), each agent once, in link order, and only while some
    /// link reaches it: as the chain's events say, a peer is there while some link reaches
    /// it (a link may still list one it no longer reaches, after `PeerLeft` was told).
    fn union<T>(
        &self,
        list: impl Fn(&dyn Transport) -> Vec<T>,
        id: impl Fn(&T) -> &AgentId,
    ) -> Vec<T> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for link in &self.links {
            for item in list(link.transport.as_ref()) {
                let who = id(&item);
                if !seen.contains(who) && self.links.iter().any(|l| l.transport.can_reach(who)) {
                    seen.insert(who.clone());
                    out.push(item);
                }
            }
        }
        out
    }

    /// A chain starting with `first`; add the next transports with [`FallbackBuilder::then`].
    pub fn chain(first: Arc<dyn Transport>) -> FallbackBuilder {
        FallbackBuilder { links: Vec::new() }.then(first, FallbackPolicy::default())
    }

    /// A chain of two: `primary`, then `secondary` as `policy` says. Must be called within a
    /// tokio runtime.
    pub fn new(
        primary: Arc<dyn Transport>,
        secondary: Arc<dyn Transport>,
        policy: FallbackPolicy,
    ) -> Arc<Self> {
        Self::chain(primary).then(secondary, policy).build()
    }

    fn from_links(links: Vec<Link>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let account = Arc::new(Account {
            fallbacks: DashMap::new(),
            events: events.clone(),
        });
        // Each link but the last hands what it could not deliver to the links after it.
        for (i, link) in links.iter().enumerate().take(links.len().saturating_sub(1)) {
            link.transport.set_redelivery(Arc::new(ViaNext {
                after: link.transport.kind(),
                next: links[i + 1..].iter().map(|l| l.transport.clone()).collect(),
                account: account.clone(),
            }));
        }
        // What was last said of each peer; what each link can reach decides the rest.
        let said = Arc::new(Mutex::new(HashMap::new()));
        let transports: Arc<Vec<Arc<dyn Transport>>> =
            Arc::new(links.iter().map(|l| l.transport.clone()).collect());
        let shutdown = CancellationToken::new();
        let tasks = links
            .iter()
            .map(|l| {
                tokio::spawn(merge_events(
                    l.transport.subscribe(),
                    events.clone(),
                    transports.clone(),
                    said.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        Arc::new(Self {
            links,
            account,
            shutdown,
            tasks: Mutex::new(tasks),
            ordered: DashMap::new(),
            last_link: DashMap::new(),
        })
    }

    /// Takes on `agent`, attached to the chain's transports one by one rather than through
    /// [`Transport::attach`] (an agent whose QUIC is enabled at run time): its ordered
    /// channels then move between links in order.
    pub(crate) fn adopt(&self, agent: &Registration) {
        let ordered: HashSet<ChannelName> = agent
            .channels
            .iter()
            .filter(|c| c.ordered && c.reliable)
            .map(|c| c.name.clone())
            .collect();
        self.ordered.insert(agent.id.clone(), Arc::new(ordered));
    }

    /// The transports of the chain, first first.
    pub fn transports(&self) -> impl Iterator<Item = &Arc<dyn Transport>> {
        self.links.iter().map(|l| &l.transport)
    }

    /// Stops this chain's own tasks (the event merging) and leaves its transports running:
    /// for a `Fallback` over transports it does not own. [`Transport::shutdown`] stops the
    /// transports as well.
    pub async fn close(&self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// The ordered flow an envelope belongs to, if its channel is ordered and reliable.
    fn flow_of(&self, from: &AgentId, to: Option<&AgentId>, channel: &ChannelName) -> Option<Flow> {
        let to = to?;
        self.ordered
            .get(from)
            .filter(|o| o.contains(channel))
            .map(|_| (from.clone(), to.clone(), channel.clone()))
    }

    /// Before an ordered flow goes over link `i`: if another link carried it last, waits for
    /// what that link still carries to reach the receiver, so nothing overtakes it.
    async fn switch_to(&self, flow: &Flow, i: usize) -> Result<()> {
        let previous = self.last_link.get(flow).map(|p| *p);
        let Some(p) = previous.filter(|p| *p != i) else {
            return Ok(());
        };
        let (from, to, channel) = flow;
        let drained = tokio::time::timeout(
            ORDERED_SWITCH_WAIT,
            self.links[p].transport.flush(from, to, channel),
        )
        .await;
        match drained {
            // A link that shut down carries nothing more.
            Ok(Ok(()) | Err(Error::Shutdown)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::SendFailed {
                to: to.clone(),
                reason: SendFailure::QueueFull(ORDERED_SWITCH_WAIT),
            }),
        }
    }

    /// Runs `op` on each link in turn while the link's policy says the error calls for the
    /// next one, and accounts for every fallback that succeeded. A link that cannot reach
    /// `peer` is skipped (as if it answered "peer not found"); an ordered `flow` moving to
    /// another link waits for the previous one first.
    async fn along<'a, T, F, Fut>(
        &'a self,
        operation: &'static str,
        from: &AgentId,
        peer: Option<&AgentId>,
        flow: Option<Flow>,
        op: F,
    ) -> Result<T>
    where
        F: Fn(&'a Arc<dyn Transport>) -> Fut,
        Fut: Future<Output = Result<T>> + 'a,
    {
        let mut failures: Vec<Error> = Vec::new();
        // The links skipped because they cannot reach the peer, last first.
        let mut skipped: Option<Error> = None;
        let n = self.links.len();
        for (i, link) in self.links.iter().enumerate() {
            if let Some(to) = peer
                && i + 1 < n
                && link.policy.on_unreachable
                && !link.transport.can_reach(to)
            {
                skipped = Some(Error::PeerNotFound { peer: to.clone() });
                continue;
            }
            if let Some(flow) = &flow {
                self.switch_to(flow, i).await?;
            }
            match op(&link.transport).await {
                Ok(v) => {
                    if let Some(flow) = flow {
                        self.last_link.insert(flow, i);
                    }
                    if let Some(previous) = failures.last().or(skipped.as_ref()) {
                        self.account.record(
                            operation,
                            from,
                            peer.cloned(),
                            link.transport.kind(),
                            previous,
                        );
                    }
                    return Ok(v);
                }
                Err(e) => {
                    let go_on = i + 1 < n && link.policy.applies(&e);
                    failures.push(e);
                    if !go_on {
                        break;
                    }
                }
            }
        }
        Err(match skipped {
            Some(unreachable) if failures.is_empty() => unreachable,
            _ => most_telling(failures),
        })
    }

    /// A request over link `i`; when that link's policy falls back on timeouts, the same
    /// request (same id) goes on to the next link after `timeout`, this attempt staying
    /// open: the first answer wins.
    fn request_from(
        &self,
        i: usize,
        envelope: Envelope,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Envelope>> + Send + '_>> {
        Box::pin(async move {
            let link = &self.links[i];
            let last = i + 1 == self.links.len();
            let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
            if last {
                return link.transport.request(envelope, timeout).await;
            }
            let next_kind = self.links[i + 1].transport.kind();
            if !link.policy.on_timeout {
                return match link.transport.request(envelope.clone(), timeout).await {
                    Err(e) if link.policy.applies(&e) => {
                        match self.request_from(i + 1, envelope, timeout).await {
                            Ok(v) => {
                                self.account.record("request", &from, peer, next_kind, &e);
                                Ok(v)
                            }
                            Err(later) => Err(most_telling(vec![e, later])),
                        }
                    }
                    r => r,
                };
            }
            // Kept open while the later links try, up to a timeout each.
            let remaining = u32::try_from(self.links.len() - i).unwrap_or(u32::MAX);
            let here = link
                .transport
                .request(envelope.clone(), timeout.saturating_mul(remaining));
            tokio::pin!(here);
            tokio::select! {
                r = &mut here => return match r {
                    Err(e) if link.policy.applies(&e) => {
                        match self.request_from(i + 1, envelope, timeout).await {
                            Ok(v) => {
                                self.account.record("request", &from, peer, next_kind, &e);
                                Ok(v)
                            }
                            Err(later) => Err(most_telling(vec![e, later])),
                        }
                    }
                    r => r,
                },
                () = tokio::time::sleep(timeout) => {}
            }
            let timed_out = Error::Timeout {
                after: timeout,
                attempts: 1,
            };
            let later = self.request_from(i + 1, envelope, timeout);
            tokio::pin!(later);
            tokio::select! {
                r = &mut here => match r {
                    Ok(v) => Ok(v),
                    // This link gave up too: what the later ones say decides.
                    Err(e) => match later.await {
                        Ok(v) => {
                            self.account.record("request", &from, peer, next_kind, &e);
                            Ok(v)
                        }
                        Err(later) => Err(most_telling(vec![e, later])),
                    },
                },
                r = &mut later => match r {
                    Ok(v) => {
                        self.account.record("request", &from, peer, next_kind, &timed_out);
                        Ok(v)
                    }
                    Err(Error::PeerNotFound { .. } | Error::Timeout { .. }) => Err(timed_out),
                    Err(e) => Err(e),
                },
            }
        })
    }
}

/// Of the errors met along the chain, the one to report: that of the farthest transport that
/// knew the peer (a later "peer not found" says less than an earlier lost connection).
fn most_telling(mut failures: Vec<Error>) -> Error {
    let pos = failures
        .iter()
        .rposition(|e| !matches!(e, Error::PeerNotFound { .. }))
        .unwrap_or(0);
    failures.swap_remove(pos)
}

/// What a [`Fallback`] counts and announces, shared with the redelivery it registers on its
/// links.
struct Account {
    fallbacks: DashMap<AgentId, u64>,
    events: broadcast::Sender<Event>,
}

impl Account {
    fn record(
        &self,
        operation: &'static str,
        from: &AgentId,
        peer: Option<AgentId>,
        via: TransportKind,
        reason: &dyn std::fmt::Display,
    ) {
        *self.fallbacks.entry(from.clone()).or_insert(0) += 1;
        tracing::info!(agent = %from, ?peer, operation, via = %via, reason = %reason, "fell back");
        let _ = self.events.send(Event::FallbackUsed {
            operation,
            peer,
            via,
            reason: reason.to_string(),
        });
    }
}

/// Delivers a link's undeliverable reliable messages over the links after it, in order.
struct ViaNext {
    after: TransportKind,
    next: Vec<Arc<dyn Transport>>,
    account: Arc<Account>,
}

#[async_trait]
impl Redeliver for ViaNext {
    async fn redeliver(&self, envelope: Envelope) -> Result<()> {
        let (from, to) = (envelope.from.clone(), envelope.target().cloned());
        let mut failures = Vec::new();
        for t in &self.next {
            match t.send_handed_over(envelope.clone()).await {
                Ok(()) => {
                    let reason = format!(
                        "{} lost its connection before the message was acknowledged",
                        self.after
                    );
                    self.account
                        .record("redeliver", &from, to, t.kind(), &reason);
                    return Ok(());
                }
                Err(e) => failures.push(e),
            }
        }
        Err(if failures.is_empty() {
            Error::PeerNotFound {
                peer: to.unwrap_or_else(|| from.clone()),
            }
        } else {
            most_telling(failures)
        })
    }
}

/// Forwards one link's events, announcing a peer when the chain first reaches it and its
/// departure when no link reaches it any more. Each link's events come through a task of
/// their own, so the decision rests on what the links can reach now, not on the order in
/// which their events arrive; `last` holds what was last said of each peer (`true`:
/// discovered), so that nothing is said twice.
async fn merge_events(
    mut rx: broadcast::Receiver<Event>,
    out: broadcast::Sender<Event>,
    links: Arc<Vec<Arc<dyn Transport>>>,
    last: Arc<Mutex<HashMap<AgentId, bool>>>,
    shutdown: CancellationToken,
) {
    /// Departed peers remembered before the oldest are forgotten.
    const REMEMBERED: usize = 65536;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = rx.recv() => e,
        };
        let forward = match event {
            Ok(Event::PeerDiscovered(p)) => {
                let mut said = last.lock().unwrap_or_else(|p| p.into_inner());
                let reachable = links.iter().any(|l| l.can_reach(&p.id));
                let new = reachable && said.insert(p.id.clone(), true) != Some(true);
                new.then_some(Event::PeerDiscovered(p))
            }
            Ok(Event::PeerLeft(id)) => {
                let mut said = last.lock().unwrap_or_else(|p| p.into_inner());
                let reachable = links.iter().any(|l| l.can_reach(&id));
                let gone = !reachable && said.insert(id.clone(), false) != Some(false);
                if said.len() > REMEMBERED {
                    said.retain(|_, discovered| *discovered);
                }
                gone.then_some(Event::PeerLeft(id))
            }
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let Some(e) = forward {
            let _ = out.send(e);
        }
    }
}

#[async_trait]
impl Transport for Fallback {
    fn kind(&self) -> TransportKind {
        self.links[0].transport.kind()
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.adopt(&agent);
        for (i, link) in self.links.iter().enumerate() {
            if let Err(e) = link.transport.attach(agent.clone(), inbox.clone()).await {
                for earlier in &self.links[..i] {
                    let _ = earlier.transport.detach(&agent.id).await;
                }
                self.ordered.remove(&agent.id);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        self.ordered.remove(agent);
        self.last_link.retain(|(from, _, _), _| from != agent);
        let mut outcome = Err(Error::PeerNotFound {
            peer: agent.clone(),
        });
        for link in &self.links {
            let r = link.transport.detach(agent).await;
            if outcome.is_err() {
                outcome = r;
            }
        }
        outcome
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
        let flow = self.flow_of(&from, peer.as_ref(), &envelope.channel);
        self.along("send", &from, peer.as_ref(), flow, |t| {
            t.send(envelope.clone())
        })
        .await
    }

    /// The batch goes along the chain whole; what a link accepted in part stays there, and
    /// the rest goes on message by message, each as [`Transport::send`] would.
    async fn send_many(&self, envelopes: Vec<Envelope>) -> Result<()> {
        let Some(first) = envelopes.first() else {
            return Ok(());
        };
        let (from, peer) = (first.from.clone(), first.target().cloned());
        let flow = self.flow_of(&from, peer.as_ref(), &first.channel);
        let accepted = match self
            .along("send", &from, peer.as_ref(), flow, |t| {
                t.send_many(envelopes.clone())
            })
            .await
        {
            Ok(()) => return Ok(()),
            Err(Error::PartlyAccepted { accepted, source }) => {
                if !source.is_unreachable() {
                    return Err(Error::PartlyAccepted { accepted, source });
                }
                accepted
            }
            Err(e) => return Err(e),
        };
        for (i, e) in envelopes.into_iter().enumerate().skip(accepted) {
            self.send(e).await.map_err(|e| e.after_accepted(i))?;
        }
        Ok(())
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
        let flow = self.flow_of(&from, peer.as_ref(), &envelope.channel);
        self.along("send", &from, peer.as_ref(), flow, |t| {
            t.send_confirmed(envelope.clone())
        })
        .await
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        self.request_from(0, envelope, timeout).await
    }

    /// Each target gets its copy through the chain on its own, so that an ordered channel
    /// stays ordered per target when some targets are reached over another link.
    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        self.registration(&envelope.from)?
            .check_broadcast(&envelope.channel, envelope.payload.len())?;
        let sends = targets.iter().map(|to| {
            let mut copy = envelope.clone();
            copy.to = aqe_core::Recipient::Agent(to.clone());
            let flow = self.flow_of(&copy.from, Some(to), &copy.channel);
            async move {
                let from = copy.from.clone();
                let r = self
                    .along("broadcast", &from, Some(to), flow, |t| t.send(copy.clone()))
                    .await;
                (to.clone(), r)
            }
        });
        Ok(BroadcastReport::from_outcomes(
            envelope.id,
            futures::future::join_all(sends).await,
        ))
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        let from = header.from.clone();
        let peer = header.to.clone();
        self.along("open_stream", &from, Some(&peer), None, |t| {
            t.open_stream(header.clone())
        })
        .await
    }

    fn registration(&self, agent: &AgentId) -> Result<Registration> {
        self.links[0].transport.registration(agent)
    }

    fn can_reach(&self, agent: &AgentId) -> bool {
        self.links.iter().any(|l| l.transport.can_reach(agent))
    }

    async fn flush(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> Result<()> {
        for link in &self.links {
            link.transport.flush(from, to, channel).await?;
        }
        Ok(())
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.union(|t| t.peers(), |p| &p.id)
    }

    fn agents_on(&self, channel: &ChannelName) -> Vec<AgentId> {
        self.union(|t| t.agents_on(channel), |id| id)
    }

    fn stats(&self, agent: &AgentId) -> Stats {
        let mut s = self
            .links
            .iter()
            .map(|l| l.transport.stats(agent))
            .reduce(Stats::merge)
            .unwrap_or_default();
        s.fallbacks_used += self.account.fallbacks.get(agent).map(|n| *n).unwrap_or(0);
        s
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.account.events.subscribe()
    }

    fn links(&self) -> Vec<aqe_core::LinkReport> {
        self.links
            .iter()
            .flat_map(|l| l.transport.links())
            .collect()
    }

    /// What no transport of the chain can deliver goes to `redeliver`: the last link is the
    /// last resort, so the handler is registered there.
    fn set_redelivery(&self, redeliver: Arc<dyn Redeliver>) {
        if let Some(last) = self.links.last() {
            last.transport.set_redelivery(redeliver);
        }
    }

    async fn shutdown(&self) {
        self.close().await;
        for link in &self.links {
            link.transport.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{SendFailure, StreamFailure};

    #[test]
    fn policy_separates_reachability_from_message_problems() {
        let p = FallbackPolicy::default();
        assert!(p.applies(&Error::PeerNotFound { peer: "x".into() }));
        assert!(p.applies(&Error::Timeout {
            after: Duration::from_secs(1),
            attempts: 1
        }));
        assert!(p.applies(&Error::SendFailed {
            to: "x".into(),
            reason: SendFailure::ReceiverClosed
        }));
        assert!(!p.applies(&Error::MessageTooLarge { size: 2, max: 1 }));
        assert!(!p.applies(&Error::ChannelNotFound {
            channel: "c".into(),
            agent: "x".into()
        }));
        assert!(!p.applies(&Error::Stream {
            stream: aqe_core::StreamId(1),
            reason: StreamFailure::ClosedByPeer
        }));
        let no_timeout = FallbackPolicy {
            on_timeout: false,
            ..p
        };
        assert!(!no_timeout.applies(&Error::Timeout {
            after: Duration::from_secs(1),
            attempts: 1
        }));
    }

    #[test]
    fn the_farthest_transport_that_knew_the_peer_explains_the_failure() {
        let lost = || Error::ConnectionLost {
            addr: aqe_core::Address::named("q"),
            source: "gone".into(),
        };
        let unknown = || Error::PeerNotFound { peer: "x".into() };
        assert!(matches!(
            most_telling(vec![lost(), unknown(), unknown()]),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            most_telling(vec![unknown(), lost(), unknown()]),
            Error::ConnectionLost { .. }
        ));
        assert!(matches!(
            most_telling(vec![unknown(), unknown()]),
            Error::PeerNotFound { .. }
        ));
    }
}
