//! An agent's inbox: bounded, highest priority first, FIFO within a priority.
//!
//! Every transport delivers into the same inbox type, so priority, backpressure, drop
//! accounting and duplicate suppression behave the same whatever carried the message.
//! Capacity is shared by all priorities; what happens when it is full is the sender's choice
//! ([`Delivery`]). Network transports, whose senders keep a bounded window of unacknowledged
//! messages per agent, use [`InboxSender::deliver_now`] instead: the window is the bound, and
//! one agent's full inbox never stalls a connection shared with other agents.
//!
//! Reliable messages (those whose [`Receipt`] is tracked) are remembered by sender and id in
//! a bounded window ([`DEDUP_WINDOW`] per sender, [`DEDUP_SENDERS`] senders): a copy that
//! arrives again, say redelivered after a connection failure or through a fallback
//! transport, is not delivered twice. Its receipt is settled with the first copy's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, TryAcquireError};

use crate::plumbing::{FastMap, FastSet};
use crate::transport::Inbound;
use crate::{
    AgentId, Channel, ChannelName, Error, MessageId, Priority, Result, SendFailure, SlowConsumer,
    Timestamp,
};

/// What a sender does when the inbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Wait for room up to this long, then fail with [`SendFailure::QueueFull`].
    Reliable(Duration),
    /// Drop the item at once (the caller counts the drop).
    Unreliable,
}

/// What became of a delivered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Delivered {
    /// It is in the inbox.
    Queued,
    /// The inbox was full and the item was unreliable: it was dropped.
    Dropped,
    /// The same message (sender and id) was delivered before: this copy was not queued, and
    /// its receipt is settled with the first copy's.
    Duplicate,
}

/// Default inbox capacity, in items.
pub const DEFAULT_INBOX_CAPACITY: usize = 1024;
/// Reliable message ids remembered per sender for duplicate suppression. Senders keep at
/// most 1024 unacknowledged messages per receiving agent and connection, and redeliver them
/// before anything newer, so a redelivered copy is always within this window.
pub const DEDUP_WINDOW: usize = 2048;
/// Senders whose ids are remembered at once; the least recently heard is forgotten first.
pub const DEDUP_SENDERS: usize = 256;

const LANES: usize = 10;
/// Room freed by taken items is given back to senders this many at a time.
const ROOM_BATCH: usize = 16;

/// Recent reliable message ids, by sender.
#[derive(Default)]
struct Dedup {
    senders: FastMap<AgentId, SenderIds>,
    /// The sender heard from last, kept out of the table: consecutive messages of one sender
    /// (a batch) hash nothing.
    hot: Option<(AgentId, SenderIds)>,
    clock: u64,
}

/// The last [`DEDUP_WINDOW`] ids of one sender, oldest first. A sender's ids grow (one
/// process-wide counter), so while they arrive in order the ring is sorted: a new id is one
/// above the last, a copy is found by binary search, and nothing is hashed. An id out of
/// order (a copy of an old one is not: it is found; a restarted sender counting from lower)
/// adds a set until the ring is sorted again.
#[derive(Default)]
struct SenderIds {
    ring: VecDeque<u64>,
    /// The ring's ids, while it is not sorted.
    set: Option<FastSet<u64>>,
    /// Ids added in order since the last one out of order.
    in_order: usize,
    last_heard: u64,
}

impl SenderIds {
    /// Records `id`; `false` if it is among the last [`DEDUP_WINDOW`] recorded.
    fn insert(&mut self, id: u64) -> bool {
        let ascending = self.ring.back().is_none_or(|&last| id > last);
        match &mut self.set {
            None if ascending => {}
            None => {
                if self.ring.binary_search(&id).is_ok() {
                    return false;
                }
                self.set = Some(self.ring.iter().copied().collect());
            }
            Some(set) => {
                if set.contains(&id) {
                    return false;
                }
            }
        }
        self.ring.push_back(id);
        let old = (self.ring.len() > DEDUP_WINDOW)
            .then(|| self.ring.pop_front())
            .flatten();
        if let Some(set) = &mut self.set {
            set.insert(id);
            if let Some(old) = old {
                set.remove(&old);
            }
            self.in_order = if ascending { self.in_order + 1 } else { 0 };
            // Every id in the ring came in order: sorted again.
            if self.in_order >= self.ring.len() {
                self.set = None;
            }
        }
        true
    }
}

impl Dedup {
    /// Records `id` from `from`; `false` if it was already there.
    fn insert(&mut self, from: &AgentId, id: MessageId) -> bool {
        self.clock += 1;
        let ids = if let Some((_, ids)) = self.hot.as_mut().filter(|(k, _)| k == from) {
            ids
        } else {
            // Another sender: the hot one goes back to the table, this one comes out of it.
            let ids = match self.senders.remove(from) {
                Some(ids) => ids,
                None => {
                    if self.len() >= DEDUP_SENDERS {
                        // Forget the sender heard from least recently (rare: a new sender,
                        // the table full). The hot one was heard from last.
                        let oldest = self
                            .senders
                            .iter()
                            .min_by_key(|(_, s)| s.last_heard)
                            .map(|(k, _)| k.clone());
                        if let Some(oldest) = oldest {
                            self.senders.remove(&oldest);
                        }
                    }
                    SenderIds::default()
                }
            };
            if let Some((k, v)) = self.hot.take() {
                self.senders.insert(k, v);
            }
            &mut self.hot.insert((from.clone(), ids)).1
        };
        ids.last_heard = self.clock;
        ids.insert(id.0)
    }

    /// Senders remembered.
    fn len(&self) -> usize {
        self.senders.len() + usize::from(self.hot.is_some())
    }
}

struct State {
    lanes: [VecDeque<Inbound>; LANES],
    /// Items queued above capacity by [`InboxSender::deliver_now`]: popping them frees no room.
    excess: usize,
    /// Room taken items freed, not yet given back to senders (fewer than [`ROOM_BATCH`]).
    freed: usize,
    dedup: Dedup,
    /// The agent's channels whose slow-consumer policy is not `block`.
    policies: FastMap<ChannelName, SlowConsumer>,
    /// Messages dropped unread by a policy, the last [`DEDUP_WINDOW`]: a copy that comes
    /// later is answered as the first was (dropped), never taken for one the agent took.
    unread: Unread,
}

/// Senders and ids of messages dropped unread: a set, and the order to forget them in.
type Unread = (FastSet<(AgentId, u64)>, VecDeque<(AgentId, u64)>);

/// What a full inbox does with a reliable message that comes above its capacity.
enum Full {
    /// Queue it above capacity (`block`: the sender's window bounds it).
    Queue,
    /// Queue it in the place of this older one of its channel, dropped unread.
    Replace(Box<Inbound>),
    /// Drop it unread.
    Drop,
}

impl State {
    fn when_full(&mut self, item: &Inbound) -> Full {
        let Inbound::Message { envelope, receipt } = item else {
            return Full::Queue;
        };
        if self.policies.is_empty() || !receipt.is_tracked() {
            return Full::Queue;
        }
        let full = match self.policies.get(&envelope.channel) {
            None | Some(SlowConsumer::Block) => return Full::Queue,
            Some(SlowConsumer::DropNewest | SlowConsumer::Fail) => Full::Drop,
            Some(SlowConsumer::DropOldest) => {
                let lane = &mut self.lanes[item.priority().get() as usize];
                let oldest = lane.iter().position(|q| {
                    matches!(q, Inbound::Message { envelope: e, receipt: r }
                        if e.channel == envelope.channel && r.is_tracked())
                });
                match oldest.and_then(|i| lane.remove(i)) {
                    Some(old) => Full::Replace(Box::new(old)),
                    None => Full::Drop,
                }
            }
        };
        // Remembered under the lock that drops it: a copy that comes next finds it.
        let gone: &Inbound = match &full {
            Full::Replace(old) => old,
            _ => item,
        };
        if let Inbound::Message { envelope, .. } = gone {
            let key = (envelope.from.clone(), envelope.id.0);
            let (set, ring) = &mut self.unread;
            if set.insert(key.clone()) {
                ring.push_back(key);
            }
            if ring.len() > DEDUP_WINDOW
                && let Some(old) = ring.pop_front()
            {
                set.remove(&old);
            }
        }
        full
    }
}

struct Shared {
    owner: AgentId,
    state: Mutex<State>,
    room: Semaphore,
    notify: Notify,
    closed: AtomicBool,
    expired: AtomicU64,
    /// Messages dropped by a slow-consumer policy.
    dropped: AtomicU64,
    /// Some channel's policy is not `block` (read without the lock on every send).
    policied: AtomicBool,
    /// Where drops are told (the transport's events), once a transport said.
    drops_to: std::sync::OnceLock<tokio::sync::broadcast::Sender<crate::Event>>,
}

/// The receiving half, owned by the agent.
pub struct Inbox {
    shared: Arc<Shared>,
}

/// The sending half, held by transports; cheap to clone.
#[derive(Clone)]
pub struct InboxSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InboxSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxSender")
            .field("owner", &self.shared.owner)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("owner", &self.shared.owner)
            .finish_non_exhaustive()
    }
}

/// Makes an inbox for `owner` holding at most `capacity` items.
pub fn inbox(owner: AgentId, capacity: usize) -> (InboxSender, Inbox) {
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
    let shared = Arc::new(Shared {
        owner,
        state: Mutex::new(State {
            lanes: Default::default(),
            excess: 0,
            freed: 0,
            dedup: Dedup::default(),
            policies: FastMap::default(),
            unread: Default::default(),
        }),
        room: Semaphore::new(capacity),
        notify: Notify::new(),
        closed: AtomicBool::new(false),
        expired: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        policied: AtomicBool::new(false),
        drops_to: std::sync::OnceLock::new(),
    });
    (
        InboxSender {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> usize {
        self.lock().lanes.iter().map(VecDeque::len).sum()
    }

    /// Settles what a full inbox dropped, counts it, and tells it (one event per channel).
    fn dropped_unread(&self, unread: Vec<Inbound>) {
        if unread.is_empty() {
            return;
        }
        let total = self
            .dropped
            .fetch_add(unread.len() as u64, Ordering::Relaxed)
            + unread.len() as u64;
        let mut by_channel: Vec<(ChannelName, u64)> = Vec::new();
        for item in unread {
            if let Inbound::Message { envelope, receipt } = item {
                match by_channel.iter_mut().find(|(c, _)| *c == envelope.channel) {
                    Some((_, n)) => *n += 1,
                    None => by_channel.push((envelope.channel, 1)),
                }
                receipt.drop_unread();
            }
        }
        if let Some(events) = self.drops_to.get() {
            let waiting = self.waiting();
            for (channel, dropped) in by_channel {
                tracing::debug!(agent = %self.owner, %channel, dropped, total, "slow consumer: messages dropped");
                let _ = events.send(crate::Event::SlowConsumer {
                    agent: self.owner.clone(),
                    channel,
                    dropped,
                    total,
                    waiting,
                });
            }
        }
    }

    /// Queues `item` unless it duplicates a message already delivered; runs `on_queued`
    /// under the lock first, so that nobody sees the item before it is counted.
    fn push(&self, item: Inbound, excess: bool, on_queued: impl FnOnce()) -> Delivered {
        let mut state = self.lock();
        if let Inbound::Message { envelope, receipt } = &item
            && receipt.is_tracked()
            && !state.dedup.insert(&envelope.from, envelope.id)
        {
            drop(state);
            self.duplicate(item);
            return Delivered::Duplicate;
        }
        let mut replaced = None;
        let excess = excess
            && match state.when_full(&item) {
                Full::Queue => true,
                Full::Replace(old) => {
                    replaced = Some(*old);
                    false
                }
                Full::Drop => {
                    drop(state);
                    self.dropped_unread(vec![item]);
                    return Delivered::Dropped;
                }
            };
        on_queued();
        let lane = item.priority().get() as usize;
        state.lanes[lane].push_back(item);
        if excess {
            state.excess += 1;
        }
        drop(state);
        self.notify.notify_one();
        if let Some(old) = replaced {
            self.dropped_unread(vec![old]);
        }
        Delivered::Queued
    }

    /// Queues `items` in order under one lock and wakes the agent once; duplicates are
    /// settled as [`Shared::push`] does. The last `extra` of them have no room: they go
    /// above capacity or as their channel's slow-consumer policy says (the room a
    /// duplicate leaves goes to them first). `on_queued(count, bytes)` runs under the lock
    /// for what was queued. Returns how many were not queued (duplicates, and dropped), and
    /// how much room is left unused (to give back).
    fn push_many<I>(
        &self,
        items: I,
        extra: usize,
        on_queued: impl FnOnce(u64, u64),
    ) -> (usize, usize)
    where
        I: IntoIterator<Item = Inbound>,
        I::IntoIter: ExactSizeIterator,
    {
        let items = items.into_iter();
        let mut duplicates = Vec::new();
        let mut unread = Vec::new();
        let (mut count, mut bytes) = (0u64, 0u64);
        let roomy = items.len() - extra.min(items.len());
        // Room a duplicate left, for an item that has none.
        let mut spare = 0;
        let mut dropped_new = 0;
        {
            let mut state = self.lock();
            for (i, item) in items.into_iter().enumerate() {
                if let Inbound::Message { envelope, receipt } = &item
                    && receipt.is_tracked()
                    && !state.dedup.insert(&envelope.from, envelope.id)
                {
                    duplicates.push(item);
                    spare += usize::from(i < roomy);
                    continue;
                }
                if i >= roomy {
                    if spare > 0 {
                        spare -= 1;
                    } else {
                        match state.when_full(&item) {
                            Full::Queue => state.excess += 1,
                            Full::Replace(old) => unread.push(*old),
                            Full::Drop => {
                                unread.push(item);
                                dropped_new += 1;
                                continue;
                            }
                        }
                    }
                }
                count += 1;
                bytes += item.payload_len() as u64;
                let lane = item.priority().get() as usize;
                state.lanes[lane].push_back(item);
            }
            on_queued(count, bytes);
        }
        if count > 0 {
            self.notify.notify_one();
        }
        self.dropped_unread(unread);
        let not_queued = duplicates.len() + dropped_new;
        for item in duplicates {
            self.duplicate(item);
        }
        (not_queued, spare)
    }

    /// A copy of a message delivered before: if the first copy is still queued, settle this
    /// one's receipt with it; otherwise the agent has taken it, and this copy is acknowledged.
    fn duplicate(&self, item: Inbound) {
        let Inbound::Message { envelope, receipt } = item else {
            return;
        };
        let mut state = self.lock();
        let original = state
            .lanes
            .iter_mut()
            .flatten()
            .find_map(|queued| match queued {
                Inbound::Message {
                    envelope: e,
                    receipt: r,
                } if e.id == envelope.id && e.from == envelope.from => Some(r),
                _ => None,
            });
        match original {
            Some(first) => first.join(receipt),
            None => {
                let dropped = state.unread.0.contains(&(envelope.from, envelope.id.0));
                drop(state);
                if dropped {
                    receipt.drop_unread();
                } else {
                    drop(receipt);
                }
            }
        }
    }

    fn pop(&self) -> Option<Inbound> {
        let mut state = self.lock();
        let item = state.lanes.iter_mut().rev().find_map(VecDeque::pop_front);
        if item.is_some() {
            if state.excess > 0 {
                state.excess -= 1;
            } else {
                state.freed += 1;
            }
        }
        // Room goes back to senders a few items at a time (each give-back takes the
        // semaphore's lock) while they have plenty, and at once when room runs low (so that
        // a full inbox frees room item by item, as its capacity promises).
        let give_back = if state.freed >= ROOM_BATCH
            || item.is_none()
            || self.room.available_permits() < ROOM_BATCH
        {
            std::mem::take(&mut state.freed)
        } else {
            0
        };
        drop(state);
        if give_back > 0 {
            self.room.add_permits(give_back);
        }
        item
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.close();
        self.notify.notify_one();
    }
}

impl InboxSender {
    /// The agent this inbox belongs to.
    pub fn owner(&self) -> &AgentId {
        &self.shared.owner
    }

    /// Closes the inbox as [`Inbox::close`] does, and wakes its receiver: what its owner does
    /// when it stops, so that a receiver waiting in [`Inbox::recv`] needs no other watch.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Puts `item` in the inbox.
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::ReceiverClosed`] once the inbox is closed, or
    /// [`SendFailure::QueueFull`] when a reliable delivery found no room in time; the item is
    /// then dropped, and the error tells the sender so ([`InboxSender::reserve`] keeps it).
    pub async fn deliver(&self, item: Inbound, delivery: Delivery) -> Result<Delivered> {
        Ok(match self.room(delivery).await? {
            Some(permit) => permit.send(item),
            None => Delivered::Dropped,
        })
    }

    /// Puts `item` in the inbox at once, above capacity if need be, running `on_queued` just
    /// before it becomes visible (to count it). For network transports whose senders bound
    /// what they have in flight per agent: waiting here would stall a connection that other
    /// agents share.
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::ReceiverClosed`] once the inbox is closed;
    /// the item is handed back so that its receipt can be abandoned.
    #[allow(clippy::result_large_err)]
    pub fn deliver_now(
        &self,
        item: Inbound,
        on_queued: impl FnOnce(),
    ) -> std::result::Result<Delivered, (Error, Inbound)> {
        if self.is_closed() {
            return Err((self.fail(SendFailure::ReceiverClosed), item));
        }
        let excess = match self.shared.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                false
            }
            Err(_) => true,
        };
        let outcome = self.shared.push(item, excess, on_queued);
        if outcome == Delivered::Duplicate && !excess {
            self.shared.room.add_permits(1);
        }
        Ok(outcome)
    }

    /// Puts `items` in the inbox at once and in order, as that many
    /// [`InboxSender::deliver_now`]s would, under one lock and with one wake-up;
    /// `on_queued(count, bytes)` runs just before they become visible. Returns how many were
    /// queued (the rest were duplicates, or dropped by their channel's slow-consumer policy).
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::ReceiverClosed`] once the inbox is closed;
    /// the items are handed back so that their receipts can be abandoned.
    #[allow(clippy::result_large_err)]
    pub fn deliver_now_many(
        &self,
        items: Vec<Inbound>,
        on_queued: impl FnOnce(u64, u64),
    ) -> std::result::Result<usize, (Error, Vec<Inbound>)> {
        if self.is_closed() {
            return Err((self.fail(SendFailure::ReceiverClosed), items));
        }
        let n = items.len();
        let room = &self.shared.room;
        let mut held = n.min(room.available_permits()).min(u32::MAX as usize);
        match room.try_acquire_many(held as u32) {
            Ok(permit) => permit.forget(),
            Err(_) => held = 0,
        }
        let (duplicates, unused) = self.shared.push_many(items, n - held, on_queued);
        if unused > 0 {
            room.add_permits(unused);
        }
        Ok(n - duplicates)
    }

    /// Waits up to `wait` for room for one item, and holds it: the item is handed over only
    /// once there is room, so a caller that gives up keeps it.
    ///
    /// # Errors
    /// As [`InboxSender::deliver`].
    ///
    /// # Cancel safety
    /// Cancel safe: no room is held unless this returns.
    pub async fn reserve(&self, wait: Duration) -> Result<InboxPermit> {
        // Room now: no timer, no clock read, no await (the common case).
        if let Some(permit) = self.try_reserve()? {
            return Ok(permit);
        }
        // The timed wait lives on the heap: a caller's future stays small (glibc consolidates
        // its free lists on every allocation above 1 KiB, which a boxed send future was).
        Box::pin(self.reserve_waiting(wait)).await
    }

    async fn reserve_waiting(&self, wait: Duration) -> Result<InboxPermit> {
        match tokio::time::timeout(wait, self.shared.room.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(InboxPermit {
                    shared: Some(self.shared.clone()),
                })
            }
            Ok(Err(_closed)) => Err(self.fail(SendFailure::ReceiverClosed)),
            Err(_elapsed) => Err(self.fail(SendFailure::QueueFull(wait))),
        }
    }

    /// Takes room for one item if there is some now; `None` when the inbox is full.
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::ReceiverClosed`] once the inbox is closed.
    pub fn try_reserve(&self) -> Result<Option<InboxPermit>> {
        match self.shared.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                Ok(Some(InboxPermit {
                    shared: Some(self.shared.clone()),
                }))
            }
            Err(TryAcquireError::NoPermits) => Ok(None),
            Err(TryAcquireError::Closed) => Err(self.fail(SendFailure::ReceiverClosed)),
        }
    }

    /// Takes room for as many of `n` items as there is room for now (at least one);
    /// `None` when the inbox is full.
    ///
    /// # Errors
    /// As [`InboxSender::try_reserve`].
    pub fn try_reserve_many(&self, n: usize) -> Result<Option<InboxPermits>> {
        let room = &self.shared.room;
        let want = n.min(room.available_permits()).min(u32::MAX as usize);
        if want > 1
            && let Ok(permit) = room.try_acquire_many(want as u32)
        {
            permit.forget();
            return Ok(Some(InboxPermits {
                shared: self.shared.clone(),
                n: want,
            }));
        }
        // One, or the room went to another sender meanwhile.
        Ok(self.try_reserve()?.map(InboxPermits::from))
    }

    /// Room for one item, as `delivery` says: waits (reliable) or not (unreliable; `None`
    /// when full).
    ///
    /// # Errors
    /// As [`InboxSender::deliver`].
    pub async fn room(&self, delivery: Delivery) -> Result<Option<InboxPermit>> {
        match delivery {
            Delivery::Reliable(wait) => self.reserve(wait).await.map(Some),
            Delivery::Unreliable => self.try_reserve(),
        }
    }

    fn fail(&self, reason: SendFailure) -> Error {
        Error::SendFailed {
            to: self.shared.owner.clone(),
            reason,
        }
    }

    /// Messages dropped because their TTL ran out while queued.
    pub fn expired(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Messages a full inbox dropped by its channel's slow-consumer policy.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Items waiting in the inbox now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting()
    }

    /// Applies the slow-consumer policies of the agent's `channels` from now on.
    pub fn set_slow_consumers(&self, channels: &[Channel]) {
        let mut state = self.shared.lock();
        state.policies = channels
            .iter()
            .filter(|c| c.slow_consumer != SlowConsumer::Block)
            .map(|c| (c.name.clone(), c.slow_consumer))
            .collect();
        self.shared
            .policied
            .store(!state.policies.is_empty(), Ordering::Release);
    }

    /// Tells what the inbox drops by policy on `events` ([`Event::SlowConsumer`](crate::Event)),
    /// from now on; the first transport to say wins (a fallback chain shares one inbox).
    pub fn tell_drops(&self, events: tokio::sync::broadcast::Sender<crate::Event>) {
        let _ = self.shared.drops_to.set(events);
    }

    /// What this inbox does, when full, with reliable messages on `channel`.
    pub fn slow_consumer(&self, channel: &ChannelName) -> SlowConsumer {
        if !self.shared.policied.load(Ordering::Acquire) {
            return SlowConsumer::Block;
        }
        self.shared
            .lock()
            .policies
            .get(channel)
            .copied()
            .unwrap_or(SlowConsumer::Block)
    }

    /// Whether the inbox has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

/// Room for one item in an inbox, reserved by [`InboxSender::reserve`]; dropping it unused
/// gives the room back.
#[must_use]
pub struct InboxPermit {
    shared: Option<Arc<Shared>>,
}

impl InboxPermit {
    /// Puts the item in the reserved room.
    pub fn send(self, item: Inbound) -> Delivered {
        self.send_counted(item, || {})
    }

    /// Puts the item in the reserved room, running `on_queued` just before it becomes
    /// visible (to count it); a duplicate gives the room back and is not counted.
    pub fn send_counted(mut self, item: Inbound, on_queued: impl FnOnce()) -> Delivered {
        let Some(shared) = self.shared.take() else {
            return Delivered::Dropped;
        };
        let outcome = shared.push(item, false, on_queued);
        if outcome == Delivered::Duplicate {
            shared.room.add_permits(1);
        }
        outcome
    }
}

impl Drop for InboxPermit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.room.add_permits(1);
        }
    }
}

/// Room for several items in an inbox, reserved by [`InboxSender::try_reserve_many`] (or
/// made of one [`InboxPermit`]); dropping it gives back what was not used.
#[must_use]
pub struct InboxPermits {
    shared: Arc<Shared>,
    n: usize,
}

impl InboxPermits {
    /// How many items it holds room for.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it holds no room (never, as made here).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Puts `items` (up to [`InboxPermits::len`] of them; more go above capacity) in the
    /// reserved room in order,
    /// under one lock and with one wake-up, running `on_queued(count, bytes)` just before
    /// they become visible; duplicates give their room back and are not counted. Returns
    /// how many were queued.
    pub fn send_many<I>(mut self, items: I, on_queued: impl FnOnce(u64, u64)) -> usize
    where
        I: IntoIterator<Item = Inbound>,
        I::IntoIter: ExactSizeIterator,
    {
        // More items than room (a caller's mistake) go in above capacity, as `deliver_now`
        // does, rather than being lost.
        let items = items.into_iter();
        let items_len = items.len();
        let extra = items_len.saturating_sub(self.n);
        let (duplicates, unused) = self.shared.push_many(items, extra, on_queued);
        // What was not used goes back when `self` drops.
        self.n = self.n - items_len.min(self.n) + unused;
        items_len - duplicates
    }
}

impl From<InboxPermit> for InboxPermits {
    fn from(mut one: InboxPermit) -> Self {
        let shared = one.shared.take().expect("an unused permit holds its inbox");
        Self { shared, n: 1 }
    }
}

impl Drop for InboxPermits {
    fn drop(&mut self) {
        if self.n > 0 {
            self.shared.room.add_permits(self.n);
        }
    }
}

impl std::fmt::Debug for InboxPermits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InboxPermits({})", self.n)
    }
}

impl std::fmt::Debug for InboxPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboxPermit")
    }
}

impl Inbox {
    /// The next item: the oldest of the highest priority waiting. Expired messages are
    /// skipped and counted, never handed out late: their receipts say they expired, and their
    /// senders report them failed (`Expired`).
    /// `None` once the inbox is closed and empty.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is only taken when this returns it.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            if let Some(item) = self.shared.pop() {
                if item.is_expired() {
                    self.shared.expired.fetch_add(1, Ordering::Relaxed);
                    item.expire();
                    continue;
                }
                return Some(item);
            }
            if self.shared.closed.load(Ordering::Acquire) {
                return None;
            }
            self.shared.notify.notified().await;
        }
    }

    /// The next item if one is waiting now, as [`Inbox::recv`] would return it; never waits.
    pub fn try_recv(&mut self) -> Option<Inbound> {
        while let Some(item) = self.shared.pop() {
            if item.is_expired() {
                self.shared.expired.fetch_add(1, Ordering::Relaxed);
                item.expire();
                continue;
            }
            return Some(item);
        }
        None
    }

    /// Closes the inbox: senders fail from now on; items already queued can still be taken.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Messages dropped because their TTL ran out while queued.
    pub fn expired(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Messages dropped by their channel's slow-consumer policy while the inbox was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.close();
        // What is still queued will never be taken: its senders must learn that.
        let left: Vec<Inbound> = {
            let mut state = self.shared.lock();
            state.lanes.iter_mut().flat_map(std::mem::take).collect()
        };
        for item in left {
            item.abandon();
        }
    }
}

impl Inbound {
    fn priority(&self) -> Priority {
        match self {
            Inbound::Message { envelope: e, .. } | Inbound::Request { envelope: e, .. } => {
                e.priority
            }
            Inbound::Stream(s) => s.header().options.priority,
        }
    }

    /// Whether its TTL ran out; the clock is read only for an item with a TTL.
    fn is_expired(&self) -> bool {
        match self {
            Inbound::Message { envelope: e, .. } | Inbound::Request { envelope: e, .. } => {
                e.ttl.is_some() && e.is_expired(Timestamp::now())
            }
            Inbound::Stream(_) => false,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Inbound::Message { envelope: e, .. } | Inbound::Request { envelope: e, .. } => {
                e.payload.len()
            }
            Inbound::Stream(_) => 0,
        }
    }

    /// Drops the item unread because its time-to-live ran out: a message's receipt says so
    /// (its sender reports it expired), a request's responder is dropped.
    fn expire(self) {
        if let Inbound::Message { receipt, .. } = self {
            receipt.expire();
        }
    }

    /// Gives up on the item without its agent taking it: a message's receipt is abandoned,
    /// a request's responder dropped (the requester hears it was dropped), a stream refused.
    pub fn abandon(self) {
        if let Inbound::Message { receipt, .. } = self {
            receipt.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, MessageKind, Recipient};
    use bytes::Bytes;

    fn msg(prio: u8, tag: u8) -> Inbound {
        Inbound::message(
            Envelope::new(
                "s".into(),
                Recipient::Agent("r".into()),
                "c".into(),
                MessageKind::Direct,
                Bytes::from(vec![tag]),
            )
            .with_priority(Priority::new(prio).expect("valid")),
        )
    }

    fn tag(i: Inbound) -> u8 {
        match i {
            Inbound::Message { envelope, .. } => envelope.payload[0],
            _ => unreachable!(),
        }
    }

    /// Records what happens to receipts.
    #[derive(Default)]
    struct Log(
        std::sync::Mutex<Vec<(u64, bool)>>,
        std::sync::Mutex<Vec<u64>>,
        std::sync::Mutex<Vec<u64>>,
    );

    impl crate::plumbing::AckSink for Log {
        fn acknowledged(&self, token: u64) {
            self.0.lock().expect("lock").push((token, true));
        }
        fn abandoned(&self, token: u64) {
            self.0.lock().expect("lock").push((token, false));
        }
        fn expired(&self, token: u64) {
            self.1.lock().expect("lock").push(token);
        }
        fn dropped(&self, token: u64) {
            self.2.lock().expect("lock").push(token);
        }
    }

    impl Log {
        fn take(&self) -> Vec<(u64, bool)> {
            std::mem::take(&mut *self.0.lock().expect("lock"))
        }
        fn expired(&self) -> Vec<u64> {
            std::mem::take(&mut *self.1.lock().expect("lock"))
        }
        fn dropped(&self) -> Vec<u64> {
            std::mem::take(&mut *self.2.lock().expect("lock"))
        }
    }

    fn tracked(env: &Envelope, log: &Arc<Log>, token: u64) -> Inbound {
        Inbound::Message {
            envelope: env.clone(),
            receipt: crate::Receipt::shared(log.clone(), token),
        }
    }

    #[tokio::test]
    async fn highest_priority_first_fifo_within() {
        let (tx, mut rx) = inbox("r".into(), 16);
        for (p, t) in [(3, 1), (7, 2), (3, 3), (9, 4), (7, 5)] {
            assert_eq!(
                tx.deliver(msg(p, t), Delivery::Unreliable)
                    .await
                    .expect("open"),
                Delivered::Queued
            );
        }
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(tag(rx.recv().await.expect("item")));
        }
        assert_eq!(order, [4, 2, 5, 1, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_inbox_drops_unreliable_and_times_out_reliable() {
        let (tx, mut rx) = inbox("r".into(), 2);
        for t in 0..2 {
            assert_eq!(
                tx.deliver(msg(5, t), Delivery::Unreliable)
                    .await
                    .expect("open"),
                Delivered::Queued
            );
        }
        assert_eq!(
            tx.deliver(msg(5, 9), Delivery::Unreliable)
                .await
                .expect("open"),
            Delivered::Dropped
        );
        let err = tx
            .deliver(msg(5, 9), Delivery::Reliable(Duration::from_millis(50)))
            .await
            .expect_err("full");
        assert!(matches!(
            err,
            Error::SendFailed {
                reason: SendFailure::QueueFull(_),
                ..
            }
        ));
        // Room frees up as the agent reads; a waiting reliable send then succeeds.
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move {
                tx.deliver(msg(5, 7), Delivery::Reliable(Duration::from_secs(5)))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(tag(rx.recv().await.expect("item")), 0);
        assert_eq!(
            waiting.await.expect("join").expect("delivered"),
            Delivered::Queued
        );
        assert_eq!(tag(rx.recv().await.expect("item")), 1);
        assert_eq!(tag(rx.recv().await.expect("item")), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_keeps_the_item_until_there_is_room() {
        let (tx, mut rx) = inbox("r".into(), 1);
        let _ = tx
            .deliver(msg(5, 1), Delivery::Unreliable)
            .await
            .expect("open");
        assert!(tx.reserve(Duration::from_millis(10)).await.is_err(), "full");
        let unused = tx.reserve(Duration::from_millis(10));
        assert_eq!(tag(rx.recv().await.expect("item")), 1);
        drop(unused.await.expect("room"));
        // The dropped permit gave the room back.
        let _ = tx
            .reserve(Duration::from_millis(10))
            .await
            .expect("room")
            .send(msg(5, 2));
        assert_eq!(tag(rx.recv().await.expect("item")), 2);
    }

    #[tokio::test]
    async fn closed_inbox_refuses_and_drains() {
        let (tx, mut rx) = inbox("r".into(), 4);
        let _ = tx
            .deliver(msg(1, 1), Delivery::Unreliable)
            .await
            .expect("open");
        rx.close();
        let err = tx
            .deliver(msg(1, 2), Delivery::Reliable(Duration::from_secs(1)))
            .await
            .expect_err("closed");
        assert!(matches!(
            err,
            Error::SendFailed {
                reason: SendFailure::ReceiverClosed,
                ..
            }
        ));
        assert!(tx.is_closed());
        assert_eq!(tag(rx.recv().await.expect("queued before close")), 1);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn expired_messages_are_skipped_and_counted() {
        let (tx, mut rx) = inbox("r".into(), 4);
        let mut old = Envelope::new(
            "s".into(),
            Recipient::Fleet,
            "c".into(),
            MessageKind::Broadcast,
            Bytes::new(),
        )
        .with_ttl(Duration::from_millis(10));
        old.timestamp = Timestamp(Timestamp::now().0 - 1_000);
        let _ = tx
            .deliver(Inbound::message(old.clone()), Delivery::Unreliable)
            .await
            .expect("open");
        let _ = tx
            .deliver(msg(5, 42), Delivery::Unreliable)
            .await
            .expect("open");
        let log = Arc::new(Log::default());
        let mut stale = old.clone();
        stale.id = MessageId(7);
        let _ = tx
            .deliver(tracked(&stale, &log, 7), Delivery::Unreliable)
            .await
            .expect("open");
        assert_eq!(tag(rx.recv().await.expect("fresh")), 42);
        assert!(rx.try_recv().is_none(), "the stale one is never handed out");
        assert_eq!(rx.expired(), 2);
        assert!(
            log.take().is_empty(),
            "its receipt is not an acknowledgement"
        );
        assert_eq!(log.expired(), [7]);
    }

    /// A reliable message on channel `c` tagged (and numbered) `t`.
    fn on_c(log: &Arc<Log>, t: u8) -> Inbound {
        let Inbound::Message { mut envelope, .. } = msg(5, t) else {
            unreachable!()
        };
        envelope.id = MessageId(u64::from(t));
        tracked(&envelope, log, u64::from(t))
    }

    fn with_policy(capacity: usize, policy: SlowConsumer) -> (InboxSender, Inbox) {
        let (tx, rx) = inbox("r".into(), capacity);
        tx.set_slow_consumers(&[
            Channel::new("c", crate::ChannelKind::Unicast).with_slow_consumer(policy)
        ]);
        (tx, rx)
    }

    #[tokio::test]
    async fn a_full_inbox_drops_by_its_channels_policy_and_reports_each_drop() {
        for (policy, kept, dropped) in [
            (SlowConsumer::DropNewest, [1, 2], vec![3, 4, 5, 6]),
            (SlowConsumer::Fail, [1, 2], vec![3, 4, 5, 6]),
            (SlowConsumer::DropOldest, [5, 6], vec![1, 2, 3, 4]),
        ] {
            let (tx, mut rx) = with_policy(2, policy);
            let log = Arc::new(Log::default());
            // One at a time, then a batch: both ways in apply the policy.
            for t in 1..=3 {
                let _ = tx.deliver_now(on_c(&log, t), || {}).expect("open");
            }
            let batch = (4..=6).map(|t| on_c(&log, t)).collect();
            let queued = tx.deliver_now_many(batch, |_, _| {}).expect("open");
            assert_eq!(
                queued,
                if policy == SlowConsumer::DropOldest {
                    3
                } else {
                    0
                },
                "{policy:?}"
            );
            let mut got = [0; 2];
            for g in &mut got {
                *g = tag(rx.try_recv().expect("kept"));
            }
            assert!(rx.try_recv().is_none(), "{policy:?}: never above capacity");
            assert_eq!(got, kept, "{policy:?}");
            let mut reported = log.dropped();
            reported.sort_unstable();
            assert_eq!(reported, dropped, "{policy:?}");
            assert_eq!(rx.dropped(), 4);
            assert_eq!(
                log.take(),
                kept.map(|t| (u64::from(t), true)),
                "{policy:?}: the kept ones are taken, nothing dropped is"
            );
        }
    }

    #[tokio::test]
    async fn a_copy_of_a_dropped_message_is_answered_dropped_never_taken() {
        for policy in [SlowConsumer::DropNewest, SlowConsumer::DropOldest] {
            let (tx, mut rx) = with_policy(1, policy);
            let log = Arc::new(Log::default());
            let _ = tx.deliver_now(on_c(&log, 1), || {}).expect("open");
            let _ = tx.deliver_now(on_c(&log, 2), || {}).expect("open");
            let gone = if policy == SlowConsumer::DropNewest {
                2
            } else {
                1
            };
            // A redelivered copy of the dropped one (a sender's retry, another path).
            let _ = tx.deliver_now(on_c(&log, gone), || {}).expect("open");
            assert_eq!(log.dropped(), [u64::from(gone); 2], "{policy:?}");
            drop(rx.try_recv().expect("the one kept"));
            assert!(rx.try_recv().is_none());
            assert_eq!(log.take(), [(u64::from(3 - gone), true)], "{policy:?}");
        }
    }

    #[tokio::test]
    async fn a_blocking_channel_still_goes_above_capacity_and_unreliable_items_are_not_policed() {
        let (tx, mut rx) = with_policy(1, SlowConsumer::Block);
        let log = Arc::new(Log::default());
        for t in 1..=3 {
            let _ = tx.deliver_now(on_c(&log, t), || {}).expect("open");
        }
        let (tx2, mut rx2) = with_policy(1, SlowConsumer::DropNewest);
        for t in 1..=3 {
            let _ = tx2.deliver_now(msg(5, t), || {}).expect("open");
        }
        for rx in [&mut rx, &mut rx2] {
            for t in 1..=3 {
                assert_eq!(tag(rx.try_recv().expect("queued")), t);
            }
        }
        assert!(log.dropped().is_empty());
    }

    #[tokio::test]
    async fn a_redelivered_copy_is_not_queued_twice_and_follows_the_first() {
        let (tx, mut rx) = inbox("r".into(), 8);
        let log = Arc::new(Log::default());
        let Inbound::Message { envelope: env, .. } = msg(5, 1) else {
            unreachable!()
        };
        let ok = |d: std::result::Result<Delivered, (Error, Inbound)>| d.map_err(|(e, _)| e);
        assert_eq!(
            ok(tx.deliver_now(tracked(&env, &log, 1), || {})).expect("open"),
            Delivered::Queued
        );
        // A copy while the first is queued: settled together with it.
        assert_eq!(
            ok(tx.deliver_now(tracked(&env, &log, 2), || {})).expect("open"),
            Delivered::Duplicate
        );
        assert!(
            log.take().is_empty(),
            "nothing settled before the agent takes it"
        );
        let first = rx.recv().await.expect("first copy");
        drop(first);
        assert_eq!(log.take(), [(1, true), (2, true)]);
        // A copy after the agent took it: acknowledged at once, never queued.
        assert_eq!(
            ok(tx.deliver_now(tracked(&env, &log, 3), || {})).expect("open"),
            Delivered::Duplicate
        );
        assert_eq!(log.take(), [(3, true)]);
        let permit = tx.try_reserve().expect("open").expect("room");
        assert_eq!(permit.send(tracked(&env, &log, 4)), Delivered::Duplicate);
        assert_eq!(log.take(), [(4, true)]);
        // Unreliable messages are not remembered: no receipt, nothing to settle.
        assert_eq!(
            tx.deliver(Inbound::message(env.clone()), Delivery::Unreliable)
                .await
                .expect("open"),
            Delivered::Queued
        );
        assert!(matches!(rx.recv().await, Some(Inbound::Message { .. })));
    }

    #[tokio::test]
    async fn deliver_now_goes_above_capacity_without_freeing_room_twice() {
        let (tx, mut rx) = inbox("r".into(), 1);
        for t in 0..3 {
            assert_eq!(
                tx.deliver_now(msg(5, t), || {})
                    .map_err(|(e, _)| e)
                    .expect("open"),
                Delivered::Queued
            );
        }
        assert!(tx.try_reserve().expect("open").is_none(), "full");
        for t in 0..3 {
            assert_eq!(tag(rx.recv().await.expect("item")), t);
        }
        // Only the one slot of capacity is free again.
        let one = tx.try_reserve().expect("open").expect("room");
        assert!(tx.try_reserve().expect("open").is_none());
        drop(one);
    }

    #[tokio::test]
    async fn a_batch_goes_in_whole_in_order_and_frees_no_room_twice() {
        let (tx, mut rx) = inbox("r".into(), 2);
        let log = Arc::new(Log::default());
        let envs: Vec<Envelope> = (0..3)
            .map(|t| match msg(5, t) {
                Inbound::Message { envelope, .. } => envelope,
                _ => unreachable!(),
            })
            .collect();
        let mut counted = (0, 0);
        // Three messages and a copy of the first, into an inbox with room for two.
        let batch = vec![
            tracked(&envs[0], &log, 10),
            tracked(&envs[1], &log, 11),
            tracked(&envs[0], &log, 12),
            tracked(&envs[2], &log, 13),
        ];
        let queued = tx
            .deliver_now_many(batch, |n, bytes| counted = (n, bytes))
            .map_err(|(e, _)| e)
            .expect("open");
        assert_eq!(queued, 3, "the copy is not queued");
        assert_eq!(counted, (3, 3), "three messages of one byte");
        assert!(tx.try_reserve().expect("open").is_none(), "full");
        for t in 0..3 {
            drop(rx.recv().await.expect("item"));
            if t == 0 {
                assert_eq!(
                    log.take(),
                    [(10, true), (12, true)],
                    "the copy settles with it"
                );
            }
        }
        // Only the two slots of capacity are free again.
        let room = tx.try_reserve_many(5).expect("open").expect("room");
        assert_eq!(room.len(), 2);
        assert!(tx.try_reserve().expect("open").is_none());
        drop(room);
        rx.close();
        assert!(tx.deliver_now_many(vec![msg(5, 9)], |_, _| {}).is_err());
    }

    #[tokio::test]
    async fn room_reserved_for_a_batch_gives_back_what_it_did_not_use() {
        let (tx, mut rx) = inbox("r".into(), 3);
        let room = tx.try_reserve_many(5).expect("open").expect("room");
        assert_eq!(room.len(), 3, "as much as there is");
        assert_eq!(room.send_many(vec![msg(5, 0), msg(9, 1)], |_, _| {}), 2);
        let rest = tx.try_reserve_many(5).expect("open").expect("room");
        assert_eq!(rest.len(), 1, "the unused third went back");
        drop(rest);
        // Higher priority first, as ever.
        assert_eq!(tag(rx.recv().await.expect("item")), 1);
        assert_eq!(tag(rx.recv().await.expect("item")), 0);
        assert_eq!(
            tx.try_reserve_many(5).expect("open").expect("room").len(),
            3
        );
        // More items than the room held: the rest go above capacity, none is lost, and the
        // capacity comes back exactly once they are taken.
        let one = tx.try_reserve_many(1).expect("open").expect("room");
        assert_eq!(
            one.send_many(vec![msg(5, 2), msg(5, 3), msg(5, 4)], |_, _| {}),
            3
        );
        for t in 2..5 {
            assert_eq!(tag(rx.recv().await.expect("item")), t);
        }
        assert_eq!(
            tx.try_reserve_many(5).expect("open").expect("room").len(),
            3
        );
    }

    #[tokio::test]
    async fn a_dropped_inbox_abandons_what_it_still_holds() {
        let (tx, mut rx) = inbox("r".into(), 4);
        let log = Arc::new(Log::default());
        for t in 0..3u8 {
            let Inbound::Message { envelope, .. } = msg(5, t) else {
                unreachable!()
            };
            let _ = tx.deliver_now(tracked(&envelope, &log, u64::from(t)), || {});
        }
        drop(rx.recv().await.expect("taken"));
        drop(rx);
        assert_eq!(log.take(), [(0, true), (1, false), (2, false)]);
        assert!(tx.deliver_now(msg(5, 9), || {}).is_err(), "closed");
    }

    proptest::proptest! {
        /// The ring and its set answer as a plain model does (the last DEDUP_WINDOW ids
        /// recorded, in any order): ids that mostly grow, with copies, restarts from lower
        /// and stragglers.
        #[test]
        fn a_senders_ids_are_remembered_as_the_last_window_recorded(
            steps in proptest::collection::vec((0u8..10, 0u64..5000), 1..6000)
        ) {
            let mut ours = SenderIds::default();
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 1_000_000u64;
            for (kind, n) in steps {
                let id = match kind {
                    // A copy of a recent one (or a long-forgotten one).
                    0 => model.get(n as usize % (model.len() + 1)).copied().unwrap_or(n),
                    // A restart: counting from lower.
                    1 if n < 5 => { next = n * 1000; next }
                    // A straggler below the last.
                    2 => next.saturating_sub(n),
                    _ => { next += 1 + n % 3; next }
                };
                let fresh = !model.contains(&id);
                if fresh {
                    model.push_back(id);
                    if model.len() > DEDUP_WINDOW {
                        model.pop_front();
                    }
                }
                proptest::prop_assert_eq!(ours.insert(id), fresh, "id {}", id);
            }
        }
    }

    #[test]
    fn copies_are_found_whichever_sender_was_heard_from_last() {
        let mut d = Dedup::default();
        let (a, b, c) = (AgentId::from("a"), AgentId::from("b"), AgentId::from("c"));
        for i in 0..50 {
            for s in [&a, &b, &a, &c] {
                // Each sender's id i, once per sender; a's twice in a row, apart.
                let fresh = d.insert(s, MessageId(i));
                assert_eq!(fresh, s != &a || d.clock % 4 == 1, "{s} {i}");
            }
        }
        assert_eq!(d.len(), 3);
        assert!(!d.insert(&b, MessageId(7)) && !d.insert(&c, MessageId(49)));
        assert!(d.insert(&b, MessageId(50)));
    }

    #[test]
    fn the_dedup_window_is_bounded_per_sender_and_in_senders() {
        let mut d = Dedup::default();
        let a = AgentId::from("a");
        for i in 0..(DEDUP_WINDOW as u64 + 10) {
            assert!(d.insert(&a, MessageId(i)));
        }
        assert!(
            !d.insert(&a, MessageId(DEDUP_WINDOW as u64)),
            "recent id remembered"
        );
        assert!(d.insert(&a, MessageId(0)), "oldest id forgotten");
        for s in 0..DEDUP_SENDERS + 5 {
            d.insert(&AgentId::from(format!("s{s}")), MessageId(1));
        }
        assert_eq!(d.len(), DEDUP_SENDERS);
        assert!(
            d.insert(&AgentId::from("s0"), MessageId(1)),
            "least recent sender forgotten"
        );
    }
}
