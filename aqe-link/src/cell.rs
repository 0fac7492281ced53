//! One session as the host runs it: its state behind its own lock, its link, the task that
//! drives its timers, and the way anything that touches it performs what comes out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use aqe_core::plumbing::{AckSink, FastMap, Fate, Respond, StatsRecorder};
use aqe_core::{
    AgentId, ChannelName, Envelope, Error, Event, Inbound, MessageId, Receipt, Responder, Result,
    SendFailure,
};
use aqe_session::{
    Answer, Ended, EndpointId, NodeInput, Rank, Refusal, Session, SessionEvent, SessionId, Settled,
    Trust,
};

use crate::Link;
use crate::ctx::{HostCtx, MsgCtx, ReqCtx};
use crate::locals::Locals;

/// Locks a mutex, taking it over from a panicked holder (state stays consistent: every
/// step of the session is a whole method call).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Node inputs a session may have waiting for the node task; beyond, the peer floods the
/// session with membership and is cut off.
const MAX_NODE_INPUTS: usize = 4096;

/// What every session of a host shares.
pub(crate) struct Shared {
    pub(crate) locals: Locals,
    pub(crate) events: broadcast::Sender<Event>,
    /// Sessions with node inputs waiting, for the node task.
    pub(crate) attention: Mutex<VecDeque<Arc<Cell>>>,
    pub(crate) attention_wake: Notify,
    /// Signalled whenever reliable messages settle.
    pub(crate) progress: Notify,
    /// Requests to this endpoint's introspection id, for the task that answers them.
    pub(crate) introspect: mpsc::Sender<(Arc<Cell>, Envelope)>,
}

impl Shared {
    /// Publishes an event (nobody listening is fine).
    pub(crate) fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

/// One session (see the module docs).
pub(crate) struct Cell {
    pub(crate) id: SessionId,
    pub(crate) peer: EndpointId,
    pub(crate) rank: Rank,
    pub(crate) trust: Trust,
    pub(crate) link: Arc<dyn Link>,
    pub(crate) session: Mutex<Session<HostCtx>>,
    /// Receipts settled by agents, told to the session at its next step.
    acks: Mutex<Vec<(u64, Fate)>>,
    /// Room for a step's lists, kept from one step to the next.
    spare: Mutex<Spare>,
    sink: Arc<dyn AckSink>,
    /// What the session told the node, in order, until the node task takes it.
    pub(crate) node_inputs: Mutex<VecDeque<NodeInput<MsgCtx>>>,
    dirty: AtomicBool,
    /// When the driver's sleep ends, in nanoseconds after `born` (`u64::MAX`: not asleep):
    /// a step that makes a timer due earlier wakes it.
    armed: AtomicU64,
    born: Instant,
    /// Wakes the driver: receipts to tell, timers changed.
    pub(crate) wake: Notify,
    /// Senders waiting for room in the windows.
    pub(crate) room: Notify,
    /// Waiters for the peer's membership to change.
    pub(crate) members: Notify,
    /// Requests this endpoint's agents hold, cancelled when the requester gives up.
    serving: Mutex<FastMap<MessageId, CancellationToken>>,
    shared: Weak<Shared>,
}

/// Receipts of messages delivered from one session: noted and told at its next step (never
/// under its lock, whoever drops them).
struct Receipts(Weak<Cell>);

impl AckSink for Receipts {
    fn acknowledged(&self, token: u64) {
        self.tell(token, Fate::Taken);
    }

    fn abandoned(&self, token: u64) {
        self.tell(token, Fate::Abandoned);
    }

    fn expired(&self, token: u64) {
        self.tell(token, Fate::Expired);
    }

    fn dropped(&self, token: u64) {
        self.tell(token, Fate::Dropped);
    }
}

impl Receipts {
    fn tell(&self, token: u64, fate: Fate) {
        if let Some(c) = self.0.upgrade() {
            lock(&c.acks).push((token, fate));
            c.wake.notify_one();
        }
    }
}

/// Reliable messages for one agent, gathered from a step's events to go into its inbox at
/// once.
#[derive(Default)]
struct Inflow {
    agent: Option<Arc<aqe_core::plumbing::LocalAgent>>,
    items: Vec<Inbound>,
}

/// How many entries of room a session keeps in each of its step's lists.
const SPARE_ROOM: usize = 256;

/// The lists a step fills, kept empty with their room between steps so that a step does
/// not grow new ones (a step that finds them taken by another makes its own).
#[derive(Default)]
struct Spare {
    transmits: Vec<aqe_session::Transmit>,
    settled: Vec<Settled<MsgCtx>>,
}

/// What a step produced that is done after the session's lock is released.
#[derive(Default)]
struct After {
    settled: Vec<Settled<MsgCtx>>,
    answers: Vec<(ReqCtx, Answer)>,
    /// Inbox items that could not be delivered (their agent stopped): dropped after the
    /// lock, since dropping one tells the session.
    dropped: Vec<Inbound>,
    introspect: Vec<Envelope>,
    room: bool,
    attention: bool,
    members: bool,
    /// A timer is due before the driver wakes.
    rearm: bool,
    close: Option<Ended>,
}

impl Cell {
    pub(crate) fn new(
        session: Session<HostCtx>,
        trust: Trust,
        link: Arc<dyn Link>,
        shared: &Arc<Shared>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Cell>| Cell {
            id: session.id(),
            peer: session.peer(),
            rank: session.rank(),
            trust,
            link,
            session: Mutex::new(session),
            acks: Mutex::new(Vec::new()),
            spare: Mutex::default(),
            sink: Arc::new(Receipts(me.clone())),
            node_inputs: Mutex::new(VecDeque::new()),
            dirty: AtomicBool::new(false),
            armed: AtomicU64::new(u64::MAX),
            born: Instant::now(),
            wake: Notify::new(),
            room: Notify::new(),
            members: Notify::new(),
            serving: Mutex::new(FastMap::default()),
            shared: Arc::downgrade(shared),
        })
    }

    /// Whether the session lives.
    pub(crate) fn is_live(&self) -> bool {
        lock(&self.session).is_linked()
    }

    /// Whether a message of the flow `from`, `to`, `channel` is unsettled in the session, or
    /// on its way from it to the node.
    pub(crate) fn has_flow(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        let session = lock(&self.session);
        session.has_flow(from, to, channel)
            || lock(&self.node_inputs).iter().any(|input| match input {
                NodeInput::Ended { orphans, .. } | NodeInput::Displaced { orphans } => {
                    orphans.iter().any(|o| {
                        let m = o.meta();
                        &m.from == from && &m.to == to && &m.channel == channel
                    })
                }
                _ => false,
            })
    }

    /// Takes what the session told the node (for the node task); clears the flag that made
    /// it ask.
    pub(crate) fn take_node_inputs(&self) -> Vec<NodeInput<MsgCtx>> {
        self.dirty.store(false, Ordering::Release);
        lock(&self.node_inputs).drain(..).collect()
    }

    /// Runs `f` on the session, then performs what came out: frames go to the link and
    /// messages into inboxes under the lock (so each keeps its order), the rest after it.
    pub(crate) fn pump<R>(
        self: &Arc<Self>,
        shared: &Shared,
        f: impl FnOnce(&mut Session<HostCtx>, &Locals) -> R,
    ) -> R {
        self.pump_counted(shared, f).0
    }

    /// As [`Cell::pump`], and how many unreliable frames of this step the link refused (its
    /// datagram queue was full): a step carries only the datagrams `f` produced.
    pub(crate) fn pump_counted<R>(
        self: &Arc<Self>,
        shared: &Shared,
        f: impl FnOnce(&mut Session<HostCtx>, &Locals) -> R,
    ) -> (R, usize) {
        let mut refused = 0;
        let mut spare = std::mem::take(&mut *lock(&self.spare));
        let mut after = After {
            settled: std::mem::take(&mut spare.settled),
            ..After::default()
        };
        let r = {
            let mut s = lock(&self.session);
            let mut acks = std::mem::take(&mut *lock(&self.acks));
            if !acks.is_empty() {
                let now = Instant::now();
                for (seq, fate) in acks.drain(..) {
                    match fate {
                        Fate::Taken => s.taken(seq, now),
                        Fate::Abandoned => s.abandoned(seq, now),
                        Fate::Expired => s.expired(seq, now),
                        Fate::Dropped => s.dropped(seq, now),
                    }
                }
            }
            acks.shrink_to(4 * SPARE_ROOM);
            if acks.capacity() > 0 {
                // The buffer goes back with its room (what was told meanwhile moves into
                // it): receipts do not grow a new one at every step.
                let mut told = lock(&self.acks);
                acks.append(&mut told);
                std::mem::swap(&mut *told, &mut acks);
            }
            let r = f(&mut s, &shared.locals);
            let mut batch = std::mem::take(&mut spare.transmits);
            while let Some(t) = s.poll_transmit() {
                batch.push(t);
            }
            if !batch.is_empty() {
                refused = self.link.transmit(&mut batch);
                batch.clear();
            }
            spare.transmits = batch;
            let mut inflow = Inflow::default();
            while let Some(ev) = s.poll_event() {
                self.event(ev, shared, &mut after, &mut inflow);
            }
            self.deliver(&mut inflow, &mut after);
            after.rearm = s
                .poll_timeout()
                .is_some_and(|t| self.since_born(t) < self.armed.load(Ordering::Acquire));
            r
        };
        self.finish(shared, after, &mut spare);
        // Kept only up to a bound: a burst does not leave an idle session holding its room.
        spare.transmits.shrink_to(SPARE_ROOM);
        spare.settled.shrink_to(SPARE_ROOM);
        *lock(&self.spare) = spare;
        (r, refused)
    }

    fn since_born(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Puts the reliable messages gathered for one agent in its inbox, at once.
    fn deliver(&self, inflow: &mut Inflow, after: &mut After) {
        let Some(local) = inflow.agent.take() else {
            return;
        };
        let items = std::mem::take(&mut inflow.items);
        if let Err((_, items)) = local
            .inbox
            .deliver_now_many(items, |n, bytes| local.stats.received_many(n, bytes))
        {
            after.dropped.extend(items);
        }
    }

    fn event(
        self: &Arc<Self>,
        ev: SessionEvent<HostCtx>,
        shared: &Shared,
        after: &mut After,
        inflow: &mut Inflow,
    ) {
        // Consecutive reliable messages to one agent go into its inbox together; anything
        // else first delivers what was gathered, so that nothing overtakes it.
        if let SessionEvent::Deliver {
            to, seq: Some(seq), ..
        } = &ev
            && inflow.agent.as_ref().is_some_and(|a| a.reg.id == *to)
        {
            let seq = *seq;
            if let SessionEvent::Deliver { envelope, .. } = ev {
                inflow.items.push(Inbound::Message {
                    envelope,
                    receipt: Receipt::shared(self.sink.clone(), seq),
                });
            }
            return;
        }
        self.deliver(inflow, after);
        match ev {
            SessionEvent::Deliver { to, seq, envelope } => {
                let Some(local) = shared.locals.get(&to) else {
                    // Detached between the session's check and now.
                    if let Some(seq) = seq {
                        lock(&self.acks).push((seq, Fate::Abandoned));
                        self.wake.notify_one();
                    }
                    return;
                };
                let len = envelope.payload.len();
                match seq {
                    Some(seq) => {
                        inflow.items.push(Inbound::Message {
                            envelope,
                            receipt: Receipt::shared(self.sink.clone(), seq),
                        });
                        inflow.agent = Some(local);
                    }
                    None => match local.inbox.try_reserve() {
                        Ok(Some(permit)) => {
                            let _ = permit.send_counted(Inbound::message(envelope), || {
                                local.stats.received(len)
                            });
                        }
                        Ok(None) | Err(_) => local.stats.dropped(),
                    },
                }
            }
            SessionEvent::Request { to, envelope } => {
                if to == shared.locals.introspection {
                    after.introspect.push(envelope);
                    return;
                }
                let id = envelope.id;
                let Some(local) = shared.locals.get(&to) else {
                    after.dropped.push(Inbound::Request {
                        responder: self.responder(id, envelope.from.clone(), None),
                        envelope,
                    });
                    return;
                };
                let len = envelope.payload.len();
                let responder =
                    self.responder(id, envelope.from.clone(), Some(local.stats.clone()));
                let item = Inbound::Request {
                    envelope,
                    responder,
                };
                if let Err((_, item)) = local.inbox.deliver_now(item, || local.stats.received(len))
                {
                    after.dropped.push(item);
                }
            }
            SessionEvent::Cancelled { id } => {
                if let Some(token) = lock(&self.serving).remove(&id) {
                    token.cancel();
                }
            }
            SessionEvent::Settled(s) => after.settled.push(s),
            SessionEvent::Answered { req, answer, .. } => after.answers.push((req, answer)),
            SessionEvent::Room => after.room = true,
            SessionEvent::Node(input) => {
                if matches!(input, NodeInput::Agents(_)) {
                    after.members = true;
                }
                let mut q = lock(&self.node_inputs);
                if q.len() >= MAX_NODE_INPUTS {
                    drop(q);
                    tracing::warn!(peer = ?self.peer, "a peer floods its session with membership; cut off");
                    after.close = Some(Ended::Violation("membership flood"));
                    return;
                }
                q.push_back(input);
                after.attention = true;
            }
            SessionEvent::Close(why) => after.close = Some(why),
        }
    }

    fn responder(
        self: &Arc<Self>,
        id: MessageId,
        requester: AgentId,
        stats: Option<Arc<StatsRecorder>>,
    ) -> Responder {
        let token = CancellationToken::new();
        lock(&self.serving).insert(id, token.clone());
        Responder::new(HostResponder {
            cell: Arc::downgrade(self),
            id,
            requester,
            stats,
            token,
            answered: false,
        })
    }

    fn finish(self: &Arc<Self>, shared: &Shared, mut after: After, spare: &mut Spare) {
        if !after.settled.is_empty() {
            crate::ctx::settle(&shared.events, after.settled.drain(..));
            shared.progress.notify_waiters();
        }
        spare.settled = std::mem::take(&mut after.settled);
        for (req, answer) in after.answers {
            let _ = req.answer.send(answer);
        }
        drop(after.dropped);
        for envelope in after.introspect {
            let id = envelope.id;
            if shared
                .introspect
                .try_send((self.clone(), envelope))
                .is_err()
            {
                let _ = self.pump(shared, |s, _| s.answer(id, Err(Refusal::Overflow)));
            }
        }
        if after.room {
            self.room.notify_waiters();
            shared.progress.notify_waiters();
        }
        if after.members {
            self.members.notify_waiters();
        }
        if after.rearm {
            self.wake.notify_one();
        }
        if let Some(why) = after.close {
            if matches!(why, Ended::Violation("membership flood")) {
                self.pump(shared, |s, _| s.end(why));
            }
            self.link.close(why);
        }
        if after.attention && !self.dirty.swap(true, Ordering::AcqRel) {
            lock(&shared.attention).push_back(self.clone());
            shared.attention_wake.notify_one();
        }
    }
}

/// Drives a session's timers until it ends: heartbeats, acknowledgements due, deadlines,
/// liveness. Woken early when receipts wait to be told.
pub(crate) async fn drive(cell: Arc<Cell>, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        // Armed under the session's lock: a step after it sees when the driver wakes.
        let next = {
            let s = lock(&cell.session);
            let next = s.poll_timeout();
            if let Some(t) = next {
                cell.armed.store(cell.since_born(t), Ordering::Release);
            }
            next
        };
        let Some(next) = next else {
            return;
        };
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = cell.wake.notified() => {}
            () = sleep => {}
        }
        cell.pump(&shared, |s, locals| {
            let now = Instant::now();
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now, locals);
            }
        });
    }
}

/// Answers one request a local agent holds, over the session it came by.
struct HostResponder {
    cell: Weak<Cell>,
    id: MessageId,
    requester: AgentId,
    stats: Option<Arc<StatsRecorder>>,
    token: CancellationToken,
    answered: bool,
}

impl HostResponder {
    fn gone(&self) -> Error {
        Error::SendFailed {
            to: self.requester.clone(),
            reason: SendFailure::ReceiverClosed,
        }
    }
}

#[async_trait]
impl Respond for HostResponder {
    async fn respond(mut self: Box<Self>, response: Envelope) -> Result<()> {
        self.answered = true;
        let Some(cell) = self.cell.upgrade() else {
            return Err(self.gone());
        };
        lock(&cell.serving).remove(&self.id);
        if self.token.is_cancelled() {
            return Err(self.gone());
        }
        let Some(shared) = cell.shared.upgrade() else {
            return Err(self.gone());
        };
        let len = response.payload.len();
        let id = self.id;
        cell.pump(&shared, |s, _| s.answer(id, Ok(response)))
            .map_err(|()| self.gone())?;
        if let Some(stats) = &self.stats {
            stats.sent(len);
        }
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.token.cancelled().await;
    }
}

impl Drop for HostResponder {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let Some(cell) = self.cell.upgrade() else {
            return;
        };
        lock(&cell.serving).remove(&self.id);
        if self.token.is_cancelled() {
            return;
        }
        // Dropped unanswered: the requester hears it at once rather than at its timeout.
        if let Some(shared) = cell.shared.upgrade() {
            let id = self.id;
            let _ = cell.pump(&shared, |s, _| s.answer(id, Err(Refusal::Stopped)));
        }
    }
}
