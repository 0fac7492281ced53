//! The node task: the one owner of the endpoint's [`Node`], performing its actions in the
//! order it gives them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use aqe_core::plumbing::{FastMap, LocalAgent};
use aqe_core::{AgentId, ChannelName, Redeliver, Registration};
use aqe_session::{
    Action, AttachError, Budgets, Config, EndpointId, Hello, Node, Opened, Orphan, Rank, Route,
    Session, SessionId, SessionInput, Trust,
};

use crate::cell::{Cell, Shared, drive, lock};
use crate::ctx::MsgCtx;
use crate::{Link, Wire};

/// Peer endpoints lost without a goodbye count as unreachable for this long, unless they
/// come back first.
const UNREACHABLE_MEMORY: Duration = Duration::from_secs(60);

/// How a remote agent is reached, as senders read it.
#[derive(Clone)]
pub(crate) enum Way {
    /// Over this session.
    Session(Arc<Cell>, Arc<Registration>),
    /// By making a link to `addr`, where `endpoint` is said to be.
    Dial(SocketAddr, EndpointId, Arc<Registration>),
}

impl Way {
    pub(crate) fn registration(&self) -> &Registration {
        match self {
            Way::Session(_, r) | Way::Dial(_, _, r) => r,
        }
    }
}

/// A link that passed its hello, for the node to make (or find) its session.
pub(crate) struct Open {
    pub(crate) hello: Hello,
    pub(crate) rank: Rank,
    pub(crate) trust: Trust,
    pub(crate) link: Arc<dyn Link>,
}

/// What the rest of the host asks of the node task.
pub(crate) enum Command {
    Attach(
        Registration,
        Arc<LocalAgent>,
        oneshot::Sender<Result<(), AttachError>>,
    ),
    Detach(AgentId, oneshot::Sender<bool>),
    Open(Box<Open>, oneshot::Sender<Option<Arc<Cell>>>),
    /// The next message for the redelivery handler, and what failed on the way.
    TakeOrphan(AgentId, oneshot::Sender<Option<Orphan<MsgCtx>>>),
    GiveBack(Orphan<MsgCtx>),
    HandOffEnded(AgentId),
    HasFlow(AgentId, AgentId, ChannelName, oneshot::Sender<bool>),
    Redelivery(Arc<dyn Redeliver>),
    Shutdown(oneshot::Sender<()>),
}

/// What the node task shares with senders and wires: routes and sessions, read often,
/// written by it alone.
#[derive(Default)]
pub(crate) struct Tables {
    pub(crate) routes: RwLock<FastMap<AgentId, Way>>,
    pub(crate) sessions: RwLock<FastMap<SessionId, Arc<Cell>>>,
    pub(crate) by_endpoint: RwLock<FastMap<EndpointId, Arc<Cell>>>,
    /// Agents whose messages the redelivery handler takes now.
    pub(crate) handing_off: RwLock<FastMap<AgentId, ()>>,
    /// Signalled when a route or a handoff changes.
    pub(crate) changed: Notify,
    pub(crate) unreachable: AtomicUsize,
    /// The generation of this endpoint's membership (for wires with a shared heartbeat).
    pub(crate) generation: AtomicU64,
}

impl Tables {
    pub(crate) fn way(&self, to: &AgentId) -> Option<Way> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .cloned()
    }

    pub(crate) fn cells(&self) -> Vec<Arc<Cell>> {
        let mut v: Vec<Arc<Cell>> = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub(crate) fn cell_of(&self, endpoint: &EndpointId) -> Option<Arc<Cell>> {
        self.by_endpoint
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint)
            .cloned()
    }

    pub(crate) fn handing_off(&self, to: &AgentId) -> bool {
        self.handing_off
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(to)
    }
}

pub(crate) struct NodeTask {
    pub(crate) node: Node<MsgCtx>,
    pub(crate) config: Arc<Config>,
    pub(crate) budget: Arc<Budgets>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tables: Arc<Tables>,
    pub(crate) wire: Arc<dyn Wire>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) tasks: TaskTracker,
    pub(crate) stop: CancellationToken,
    pub(crate) handler: Option<Arc<dyn Redeliver>>,
}

impl NodeTask {
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let next = self
                .node
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + UNREACHABLE_MEMORY);
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(c) => {
                        if self.command(c) {
                            break;
                        }
                    }
                    None => break,
                },
                () = self.shared.attention_wake.notified() => {}
                () = sleep => {
                    let actions = self.node.handle_timeout(Instant::now());
                    self.apply(actions);
                }
            }
            self.attend();
            self.tables.unreachable.store(
                self.node.unreachable(Instant::now(), UNREACHABLE_MEMORY),
                Ordering::Relaxed,
            );
            self.tables
                .generation
                .store(self.node.generation(), Ordering::Release);
        }
    }

    /// Takes what sessions told the node, until none has anything more.
    fn attend(&mut self) {
        loop {
            let next = lock(&self.shared.attention).pop_front();
            let Some(cell) = next else { return };
            for input in cell.take_node_inputs() {
                let actions = self.node.on(cell.id, input, Instant::now());
                self.apply(actions);
            }
        }
    }

    /// Performs one command; `true` when the task is to end.
    fn command(&mut self, c: Command) -> bool {
        match c {
            Command::Attach(reg, local, reply) => {
                let outcome = self.node.attach(reg).map(|actions| {
                    self.shared.locals.insert(local);
                    self.apply(actions);
                });
                let _ = reply.send(outcome);
            }
            Command::Detach(id, reply) => {
                let found = match self.node.detach(&id) {
                    Some(actions) => {
                        self.shared.locals.remove(&id);
                        self.apply(actions);
                        true
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
            Command::Open(open, reply) => {
                let _ = reply.send(self.open(*open));
            }
            Command::TakeOrphan(to, reply) => {
                let mut late = Vec::new();
                let _ = reply.send(self.node.take_orphan(&to, &mut late));
                if !late.is_empty() {
                    crate::ctx::settle(&self.shared.events, late);
                }
            }
            Command::GiveBack(orphan) => self.node.give_back(orphan),
            Command::HandOffEnded(to) => {
                // The route comes back (or not) before senders waiting for the hand-off look.
                let actions = self.node.hand_off_ended(&to);
                self.apply(actions);
                self.tables
                    .handing_off
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&to);
                self.tables.changed.notify_waiters();
            }
            Command::HasFlow(from, to, channel, reply) => {
                // What sessions handed over and the node has not taken yet counts too.
                self.attend();
                let _ = reply.send(self.node.has_flow(&from, &to, &channel));
            }
            Command::Redelivery(handler) => {
                self.handler = Some(handler);
                self.node.set_redelivery(true);
            }
            Command::Shutdown(reply) => {
                let actions = self.node.shutdown();
                self.apply(actions);
                self.attend();
                let _ = reply.send(());
                return true;
            }
        }
        false
    }

    fn open(&mut self, open: Open) -> Option<Arc<Cell>> {
        let Open {
            hello,
            rank,
            trust,
            link,
        } = open;
        let address = link.address();
        match self
            .node
            .open(hello.endpoint, rank, trust, hello.listen, address)
        {
            Opened::Fresh { id, actions } => {
                self.apply(actions);
                let session = Session::new(
                    id,
                    rank,
                    &hello,
                    trust,
                    self.config.clone(),
                    self.budget.clone(),
                    Instant::now(),
                );
                let cell = Cell::new(session, trust, link, &self.shared);
                self.tables
                    .sessions
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, cell.clone());
                self.tables
                    .by_endpoint
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cell.peer, cell.clone());
                self.tasks
                    .spawn(drive(cell.clone(), self.shared.clone(), self.stop.clone()));
                // The session's first event (it started) reaches the node through attention.
                cell.pump(&self.shared, |_, _| ());
                Some(cell)
            }
            Opened::Existing(id) => self.cell(id),
            Opened::Refused(current) => {
                if let Some(c) = self.cell(current) {
                    let _ = c.pump(&self.shared, |s, _| {
                        s.handle(SessionInput::Probe, Instant::now())
                    });
                }
                None
            }
        }
    }

    fn cell(&self, id: SessionId) -> Option<Arc<Cell>> {
        self.tables
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Performs a node step's actions, in order.
    fn apply(&mut self, actions: Vec<Action<MsgCtx>>) {
        for a in actions {
            match a {
                Action::Session(id, input) => {
                    let Some(cell) = self.cell(id) else { continue };
                    let back = cell.pump(&self.shared, |s, _| s.handle(input, Instant::now()));
                    if let Err(back) = back {
                        self.node.requeue(back);
                    }
                }
                Action::Route { agent, to } => {
                    let way = to.and_then(|r| self.way(r));
                    let mut routes = self
                        .tables
                        .routes
                        .write()
                        .unwrap_or_else(|p| p.into_inner());
                    match way {
                        Some(w) => {
                            routes.insert(agent, w);
                        }
                        None => {
                            routes.remove(&agent);
                        }
                    }
                    drop(routes);
                    self.tables.changed.notify_waiters();
                }
                Action::Publish(event) => self.shared.publish(event),
                Action::Dial { addr, endpoint } => self.wire.dial(addr, endpoint),
                Action::HandOff(to) => self.hand_off(to),
                Action::Settled(list) => {
                    crate::ctx::settle(&self.shared.events, list);
                    self.shared.progress.notify_waiters();
                }
                Action::Forget(id) => {
                    let removed = self
                        .tables
                        .sessions
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(cell) = removed {
                        let mut by = self
                            .tables
                            .by_endpoint
                            .write()
                            .unwrap_or_else(|p| p.into_inner());
                        if by.get(&cell.peer).is_some_and(|c| c.id == id) {
                            by.remove(&cell.peer);
                        }
                        cell.wake.notify_one();
                        cell.room.notify_waiters();
                    }
                }
            }
        }
    }

    fn way(&self, r: Route) -> Option<Way> {
        match r {
            Route::Session { session, reg, .. } => Some(Way::Session(self.cell(session)?, reg)),
            Route::Dial {
                addr,
                endpoint,
                reg,
            } => Some(Way::Dial(addr, endpoint, reg)),
        }
    }

    /// Gives what waits for `to` to the redelivery handler, oldest first, until it is all
    /// delivered, the handler cannot, or a session reaches `to` again.
    fn hand_off(&mut self, to: AgentId) {
        let Some(handler) = self.handler.clone() else {
            let actions = self.node.hand_off_ended(&to);
            self.apply(actions);
            return;
        };
        self.tables
            .handing_off
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(to.clone(), ());
        let commands = self.commands.clone();
        let shared = self.shared.clone();
        let stop = self.stop.clone();
        let deadline = self.node.config().delivery_deadline;
        self.tasks.spawn(async move {
            loop {
                let (tx, rx) = oneshot::channel();
                if commands
                    .send(Command::TakeOrphan(to.clone(), tx))
                    .await
                    .is_err()
                {
                    return;
                }
                let Ok(Some(orphan)) = rx.await else { break };
                let envelope = match orphan.envelope() {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "a message waiting for redelivery does not decode");
                        crate::ctx::settle(
                            &shared.events,
                            vec![orphan.failed(aqe_core::DeliveryFailure::Unreachable)],
                        );
                        continue;
                    }
                };
                // The handler may not take longer than the message's own deadline: past it
                // the message fails as unconfirmed (the handler's transport may have it).
                let due = tokio::time::Instant::from_std(orphan.accepted() + deadline);
                let attempt = tokio::select! {
                    () = stop.cancelled() => Err(aqe_core::Error::Shutdown),
                    () = tokio::time::sleep_until(due) => {
                        crate::ctx::settle(
                            &shared.events,
                            vec![orphan.failed(aqe_core::DeliveryFailure::Unconfirmed)],
                        );
                        continue;
                    }
                    r = handler.redeliver(envelope) => r,
                };
                match attempt {
                    Ok(()) => {
                        crate::ctx::settle(&shared.events, vec![orphan.taken()]);
                        shared.progress.notify_waiters();
                    }
                    Err(e) => {
                        tracing::debug!(agent = %to, error = %e, "the redelivery handler cannot deliver; waiting for a session");
                        let _ = commands.send(Command::GiveBack(orphan)).await;
                        break;
                    }
                }
            }
            let _ = commands.send(Command::HandOffEnded(to)).await;
        });
    }
}
