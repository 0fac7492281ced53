//! A transport made of two: try the primary, and where it cannot reach a peer, the secondary.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use aqe_core::{
    AgentId, BroadcastReport, Envelope, Error, Event, InboxSender, PeerInfo, Redeliver,
    Registration, Result, Stats, StreamHeader, StreamSink, Transport, TransportKind,
};

/// When an operation moves from the primary transport to the secondary.
///
/// The default falls back when the peer is unreachable over the primary (connection failed,
/// timed out or lost; peer unknown there; its receiver gone) and when a request times out.
/// It never falls back for a problem with the message itself (too large, unknown channel,
/// a handler's error response): the secondary would refuse it too, or run it twice.
///
/// A request that times out is sent again over the secondary *with the same id*, while the
/// first attempt is kept open: the responding agent recognises the id and answers from the
/// execution already running (or from the answer it just gave), so its handler runs at most
/// once. Such a request may therefore take up to twice its timeout. Reliable messages the
/// primary accepted but could not deliver (its connection to the receiver ended before they
/// were acknowledged) are handed to the secondary before the primary reports them failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackPolicy {
    /// Fall back when the peer cannot be reached over the primary.
    pub on_unreachable: bool,
    /// Fall back when a request times out over the primary.
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
    /// Whether `error`, from the primary, sends the operation to the secondary.
    pub fn applies(&self, error: &Error) -> bool {
        match error {
            Error::Timeout { .. } => self.on_timeout,
            e => e.is_unreachable() && self.on_unreachable,
        }
    }
}

/// A [`Transport`] over two transports: agents attach to both; each operation goes to the
/// primary and, when the [`FallbackPolicy`] says so, again to the secondary. Every fallback
/// is counted in the agent's `fallbacks_used` and announced as [`Event::FallbackUsed`].
///
/// Membership is the union of both; an agent reachable over both is announced once.
pub struct Fallback {
    primary: Arc<dyn Transport>,
    secondary: Arc<dyn Transport>,
    policy: FallbackPolicy,
    account: Arc<Account>,
    shutdown: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("primary", &self.primary.kind())
            .field("secondary", &self.secondary.kind())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Fallback {
    /// Combines two transports. Must be called within a tokio runtime: it starts the two
    /// tasks that merge their events, which end at [`Transport::shutdown`].
    pub fn new(
        primary: Arc<dyn Transport>,
        secondary: Arc<dyn Transport>,
        policy: FallbackPolicy,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let account = Arc::new(Account {
            fallbacks: DashMap::new(),
            events: events.clone(),
            primary: primary.kind(),
            secondary: secondary.kind(),
        });
        primary.set_redelivery(Arc::new(ViaSecondary {
            secondary: secondary.clone(),
            account: account.clone(),
        }));
        // Over how many of the two transports each peer is known.
        let membership = Arc::new(Mutex::new(HashMap::new()));
        let shutdown = CancellationToken::new();
        let tasks = [primary.subscribe(), secondary.subscribe()]
            .into_iter()
            .map(|rx| {
                tokio::spawn(merge_events(
                    rx,
                    events.clone(),
                    membership.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        Arc::new(Self {
            primary,
            secondary,
            policy,
            account,
            shutdown,
            tasks: Mutex::new(tasks),
        })
    }

    /// Stops this combination's own tasks (the event merging) and leaves both transports
    /// running: for a `Fallback` over transports it does not own. [`Transport::shutdown`]
    /// stops both transports as well.
    pub async fn close(&self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Runs `second` after `first_err` from the primary, and accounts for it.
    async fn fall_back<T>(
        &self,
        operation: &'static str,
        from: &AgentId,
        peer: Option<AgentId>,
        first_err: Error,
        second: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match second.await {
            Ok(v) => {
                self.account.record(operation, from, peer, &first_err);
                Ok(v)
            }
            // The secondary does not know the peer either: the primary's error says more.
            Err(Error::PeerNotFound { .. }) => Err(first_err),
            Err(e) => Err(e),
        }
    }

    /// A request over the primary; after `timeout`, the same request (same id) over the
    /// secondary too, the primary's attempt staying open: the first answer wins.
    async fn hedged_request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
        let primary = self
            .primary
            .request(envelope.clone(), timeout.saturating_mul(2));
        tokio::pin!(primary);
        tokio::select! {
            r = &mut primary => return match r {
                Err(e) if self.policy.applies(&e) => {
                    self.fall_back("request", &from, peer, e, self.secondary.request(envelope, timeout)).await
                }
                r => r,
            },
            () = tokio::time::sleep(timeout) => {}
        }
        let timed_out = Error::Timeout {
            after: timeout,
            attempts: 1,
        };
        let secondary = self.secondary.request(envelope, timeout);
        tokio::pin!(secondary);
        tokio::select! {
            r = &mut primary => match r {
                Ok(v) => Ok(v),
                // The primary gave up too: what the secondary says decides.
                Err(e) => self.fall_back("request", &from, peer, e, secondary).await,
            },
            r = &mut secondary => match r {
                Ok(v) => {
                    self.account.record("request", &from, peer, &timed_out);
                    Ok(v)
                }
                Err(Error::PeerNotFound { .. } | Error::Timeout { .. }) => Err(timed_out),
                Err(e) => Err(e),
            },
        }
    }
}

/// What a [`Fallback`] counts and announces, shared with the redelivery it registers on its
/// primary.
struct Account {
    fallbacks: DashMap<AgentId, u64>,
    events: broadcast::Sender<Event>,
    primary: TransportKind,
    secondary: TransportKind,
}

impl Account {
    fn record(
        &self,
        operation: &'static str,
        from: &AgentId,
        peer: Option<AgentId>,
        reason: &dyn std::fmt::Display,
    ) {
        *self.fallbacks.entry(from.clone()).or_insert(0) += 1;
        tracing::info!(agent = %from, ?peer, operation, primary = %self.primary,
            secondary = %self.secondary, reason = %reason, "fell back");
        let _ = self.events.send(Event::FallbackUsed {
            operation,
            peer,
            reason: reason.to_string(),
        });
    }
}

/// Delivers the primary's undeliverable reliable messages over the secondary.
struct ViaSecondary {
    secondary: Arc<dyn Transport>,
    account: Arc<Account>,
}

#[async_trait]
impl Redeliver for ViaSecondary {
    async fn redeliver(&self, envelope: Envelope) -> Result<()> {
        let (from, to) = (envelope.from.clone(), envelope.target().cloned());
        self.secondary.send_confirmed(envelope).await?;
        self.account.record(
            "redeliver",
            &from,
            to,
            &"the primary lost its connection before the message was acknowledged",
        );
        Ok(())
    }
}

async fn merge_events(
    mut rx: broadcast::Receiver<Event>,
    out: broadcast::Sender<Event>,
    membership: Arc<Mutex<HashMap<AgentId, u8>>>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = rx.recv() => e,
        };
        let forward = match event {
            Ok(Event::PeerDiscovered(p)) => {
                let mut m = membership.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(p.id.clone()).or_insert(0);
                *n += 1;
                (*n == 1).then_some(Event::PeerDiscovered(p))
            }
            Ok(Event::PeerLeft(id)) => {
                let mut m = membership.lock().unwrap_or_else(|p| p.into_inner());
                match m.get_mut(&id) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        None
                    }
                    _ => {
                        m.remove(&id);
                        Some(Event::PeerLeft(id))
                    }
                }
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
        self.primary.kind()
    }

    async fn attach(&self, agent: Registration, inbox: InboxSender) -> Result<()> {
        self.primary.attach(agent.clone(), inbox.clone()).await?;
        if let Err(e) = self.secondary.attach(agent.clone(), inbox).await {
            let _ = self.primary.detach(&agent.id).await;
            return Err(e);
        }
        Ok(())
    }

    async fn detach(&self, agent: &AgentId) -> Result<()> {
        let a = self.primary.detach(agent).await;
        let b = self.secondary.detach(agent).await;
        a.or(b)
    }

    async fn send(&self, envelope: Envelope) -> Result<()> {
        match self.primary.send(envelope.clone()).await {
            Err(e) if self.policy.applies(&e) => {
                let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
                self.fall_back("send", &from, peer, e, self.secondary.send(envelope))
                    .await
            }
            r => r,
        }
    }

    async fn send_confirmed(&self, envelope: Envelope) -> Result<()> {
        match self.primary.send_confirmed(envelope.clone()).await {
            Err(e) if self.policy.applies(&e) => {
                let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
                self.fall_back(
                    "send",
                    &from,
                    peer,
                    e,
                    self.secondary.send_confirmed(envelope),
                )
                .await
            }
            r => r,
        }
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        if self.policy.on_timeout {
            return self.hedged_request(envelope, timeout).await;
        }
        match self.primary.request(envelope.clone(), timeout).await {
            Err(e) if self.policy.applies(&e) => {
                let (from, peer) = (envelope.from.clone(), envelope.target().cloned());
                self.fall_back(
                    "request",
                    &from,
                    peer,
                    e,
                    self.secondary.request(envelope, timeout),
                )
                .await
            }
            r => r,
        }
    }

    async fn broadcast(&self, envelope: Envelope, targets: &[AgentId]) -> Result<BroadcastReport> {
        let mut report = self.primary.broadcast(envelope.clone(), targets).await?;
        let (retry, keep): (Vec<_>, Vec<_>) = report
            .failed
            .drain(..)
            .partition(|(_, e)| self.policy.applies(e));
        report.failed = keep;
        if retry.is_empty() {
            return Ok(report);
        }
        let ids: Vec<AgentId> = retry.iter().map(|(id, _)| id.clone()).collect();
        let mut first_errors: HashMap<AgentId, Error> = retry.into_iter().collect();
        match self.secondary.broadcast(envelope.clone(), &ids).await {
            Ok(second) => {
                for id in second.delivered {
                    if let Some(e) = first_errors.remove(&id) {
                        self.account
                            .record("broadcast", &envelope.from, Some(id.clone()), &e);
                    }
                    report.delivered.push(id);
                }
                for (id, e) in second.failed {
                    let first = first_errors.remove(&id);
                    let err = match (e, first) {
                        (Error::PeerNotFound { .. }, Some(first)) => first,
                        (e, _) => e,
                    };
                    report.failed.push((id, err));
                }
            }
            Err(_) => report.failed.extend(first_errors),
        }
        Ok(report)
    }

    async fn open_stream(&self, header: StreamHeader) -> Result<Box<dyn StreamSink>> {
        match self.primary.open_stream(header.clone()).await {
            Err(e) if self.policy.applies(&e) => {
                let (from, peer) = (header.from.clone(), Some(header.to.clone()));
                self.fall_back(
                    "open_stream",
                    &from,
                    peer,
                    e,
                    self.secondary.open_stream(header),
                )
                .await
            }
            r => r,
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut peers = self.primary.peers();
        for p in self.secondary.peers() {
            if !peers.iter().any(|q| q.id == p.id) {
                peers.push(p);
            }
        }
        peers
    }

    fn stats(&self, agent: &AgentId) -> Stats {
        let mut s = self.primary.stats(agent).merge(self.secondary.stats(agent));
        s.fallbacks_used += self.account.fallbacks.get(agent).map(|n| *n).unwrap_or(0);
        s
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.account.events.subscribe()
    }

    /// What neither transport can deliver goes to `redeliver`: the secondary is the last
    /// resort, so the handler is registered there.
    fn set_redelivery(&self, redeliver: Arc<dyn Redeliver>) {
        self.secondary.set_redelivery(redeliver);
    }

    async fn shutdown(&self) {
        self.close().await;
        self.primary.shutdown().await;
        self.secondary.shutdown().await;
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
}
