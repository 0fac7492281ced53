//! An agent's inbox: bounded, highest priority first, FIFO within a priority.
//!
//! Every transport delivers into the same inbox type, so priority, backpressure and drop
//! accounting behave the same whatever carried the message. Capacity is shared by all
//! priorities; what happens when it is full is the sender's choice ([`Delivery`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, TryAcquireError};

use crate::transport::Inbound;
use crate::{AgentId, Error, Priority, Result, SendFailure, Timestamp};

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
}

/// Default inbox capacity, in items.
pub const DEFAULT_INBOX_CAPACITY: usize = 1024;

const LANES: usize = 10;

struct Shared {
    owner: AgentId,
    lanes: Mutex<[VecDeque<Inbound>; LANES]>,
    room: Semaphore,
    notify: Notify,
    closed: AtomicBool,
    expired: AtomicU64,
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
        lanes: Mutex::new(Default::default()),
        room: Semaphore::new(capacity),
        notify: Notify::new(),
        closed: AtomicBool::new(false),
        expired: AtomicU64::new(0),
    });
    (
        InboxSender {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Shared {
    fn push(&self, item: Inbound) {
        let lane = item.priority().get() as usize;
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())[lane].push_back(item);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Inbound> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.iter_mut().rev().find_map(VecDeque::pop_front)
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

    /// Puts `item` in the inbox.
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::ReceiverClosed`] once the inbox is closed, or
    /// [`SendFailure::QueueFull`] when a reliable delivery found no room in time; the item is
    /// then dropped, and the error tells the sender so ([`InboxSender::reserve`] keeps it).
    pub async fn deliver(&self, item: Inbound, delivery: Delivery) -> Result<Delivered> {
        Ok(match self.room(delivery).await? {
            Some(permit) => {
                permit.send(item);
                Delivered::Queued
            }
            None => Delivered::Dropped,
        })
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

    /// Room for one item, as `delivery` says: waits (reliable) or not (unreliable; `None`
    /// when full). Transports count a message, then hand it over with the permit, so that a
    /// reader never sees a message before it is counted.
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
    pub fn send(mut self, item: Inbound) {
        if let Some(shared) = self.shared.take() {
            shared.push(item);
        }
    }
}

impl Drop for InboxPermit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.room.add_permits(1);
        }
    }
}

impl std::fmt::Debug for InboxPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboxPermit")
    }
}

impl Inbox {
    /// The next item: the oldest of the highest priority waiting. Expired messages are
    /// skipped and counted. `None` once the inbox is closed and empty.
    ///
    /// # Cancel safety
    /// Cancel safe: an item is only taken when this returns it.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            if let Some(item) = self.shared.pop() {
                self.shared.room.add_permits(1);
                if item.is_expired(Timestamp::now()) {
                    self.shared.expired.fetch_add(1, Ordering::Relaxed);
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

    /// Closes the inbox: senders fail from now on; items already queued can still be taken.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Messages dropped because their TTL ran out while queued.
    pub fn expired(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Inbound {
    fn priority(&self) -> Priority {
        match self {
            Inbound::Message(e) | Inbound::Request { envelope: e, .. } => e.priority,
            Inbound::Stream(s) => s.header().options.priority,
        }
    }

    fn is_expired(&self, now: Timestamp) -> bool {
        match self {
            Inbound::Message(e) | Inbound::Request { envelope: e, .. } => e.is_expired(now),
            Inbound::Stream(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, MessageKind, Recipient};
    use bytes::Bytes;

    fn msg(prio: u8, tag: u8) -> Inbound {
        Inbound::Message(
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
            Inbound::Message(e) => e.payload[0],
            _ => unreachable!(),
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
        tx.reserve(Duration::from_millis(10))
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
            .deliver(Inbound::Message(old), Delivery::Unreliable)
            .await
            .expect("open");
        let _ = tx
            .deliver(msg(5, 42), Delivery::Unreliable)
            .await
            .expect("open");
        assert_eq!(tag(rx.recv().await.expect("fresh")), 42);
        assert_eq!(rx.expired(), 1);
    }
}
