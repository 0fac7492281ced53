//! Delivery accounting on the sending side.
//!
//! Every reliable message a sender hands to a connection gets the connection's next sequence
//! number and waits in that connection's [`Outbox`] until the receiver acknowledges it (its
//! agent took it) or reports it unprocessed. The outbox bounds what is unacknowledged per
//! receiving agent (the window): a full window makes the sender wait, which is how a slow
//! receiver pushes back without holding up the other agents on the connection.
//!
//! When a connection ends, what it held unacknowledged is *orphaned* and moves to the
//! endpoint's [`Redelivery`] queue, by receiving agent: it goes out again (marked
//! `redelivered`) as soon as that agent is reachable over another connection, or through the
//! redelivery handler a fallback registered, and is reported failed if neither happens
//! before its delivery deadline. Receivers drop copies they already have, by message id.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, broadcast, oneshot};

use aqe_core::plumbing::StatsRecorder;
use aqe_core::{
    AgentId, ChannelName, DeliveryFailure, Envelope, Error, Event, MessageId, Result, SendFailure,
};

/// Which writer of a connection carries a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// The long-lived stream of an ordered channel.
    Ordered(ChannelName),
    /// One of the pooled unordered streams, or a stream of its own when large.
    Unordered,
}

/// One reliable message accepted for delivery and not yet settled.
pub(crate) struct Pending {
    pub(crate) envelope: Envelope,
    /// The envelope's encoding, sent after each frame header.
    pub(crate) body: Bytes,
    pub(crate) lane: Lane,
    pub(crate) accepted: Instant,
    /// Whether it may have reached the receiver: it was written to a connection that then
    /// went away before confirming it.
    pub(crate) in_doubt: bool,
    /// The highest sequence number its writer had written, when it was orphaned; compared
    /// with its own to tell whether it was written at all.
    pub(crate) seq: u64,
    pub(crate) written: Option<Arc<AtomicU64>>,
    pub(crate) stats: Arc<StatsRecorder>,
    pub(crate) confirm: Option<oneshot::Sender<Result<()>>>,
}

impl Pending {
    pub(crate) fn to(&self) -> AgentId {
        self.envelope
            .target()
            .cloned()
            .unwrap_or_else(|| AgentId::from("?"))
    }

    /// Marks it as sent again, for a redelivery.
    pub(crate) fn redelivered(mut self) -> Result<Self> {
        if self.in_doubt && !self.envelope.redelivered {
            self.envelope.redelivered = true;
            self.body = aqe_core::encode(&self.envelope)?;
        }
        Ok(self)
    }

    /// Whether its writer wrote it before its connection ended.
    fn was_written(&self) -> bool {
        self.written
            .as_ref()
            .is_some_and(|w| w.load(Ordering::Acquire) >= self.seq)
    }
}

/// The receiver took it.
pub(crate) fn delivered(p: Pending) {
    p.stats.confirmed(1);
    if let Some(c) = p.confirm {
        let _ = c.send(Ok(()));
    }
}

/// They will not reach their receiver: counted, announced (one event per sender, receiver,
/// channel and reason, ids in send order), and their confirmed senders told.
pub(crate) fn failed(
    events: &broadcast::Sender<Event>,
    pendings: Vec<Pending>,
    reason: impl Fn(&Pending) -> DeliveryFailure,
) {
    type Group = (AgentId, AgentId, ChannelName, DeliveryFailure);
    let mut order: Vec<Group> = Vec::new();
    let mut groups: HashMap<Group, Vec<MessageId>> = HashMap::new();
    for p in pendings {
        let why = reason(&p);
        let to = p.to();
        tracing::debug!(from = %p.envelope.from, %to, id = %p.envelope.id, %why, "delivery failed");
        let key = (
            p.envelope.from.clone(),
            to.clone(),
            p.envelope.channel.clone(),
            why,
        );
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push(p.envelope.id);
        p.stats.failed(1);
        if let Some(c) = p.confirm {
            let _ = c.send(Err(Error::DeliveryFailed { to, reason: why }));
        }
    }
    for key in order {
        let ids = groups.remove(&key).unwrap_or_default();
        let (from, to, channel, reason) = key;
        let _ = events.send(Event::DeliveryFailed {
            from,
            to,
            channel,
            ids,
            reason,
        });
    }
}

/// What a connection has sent and not yet had acknowledged.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    room: Notify,
    /// Unacknowledged messages allowed per receiving agent.
    limit: usize,
}

#[derive(Default)]
struct OutboxState {
    next_seq: u64,
    unacked: BTreeMap<u64, Pending>,
    in_flight: HashMap<AgentId, usize>,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(OutboxState {
                next_seq: 1,
                ..OutboxState::default()
            }),
            room: Notify::new(),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `wait` for room in `to`'s window and takes it.
    ///
    /// # Errors
    /// [`Error::SendFailed`] with [`SendFailure::QueueFull`] when the window stayed full;
    /// `closed()` when the connection ended meanwhile.
    pub(crate) async fn admit(
        &self,
        to: &AgentId,
        wait: Duration,
        closed: impl Fn() -> Error,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if s.closed {
                    return Err(closed());
                }
                let n = s.in_flight.entry(to.clone()).or_insert(0);
                if *n < self.limit {
                    *n += 1;
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::SendFailed {
                    to: to.clone(),
                    reason: SendFailure::QueueFull(wait),
                });
            }
        }
    }

    /// Gives back room taken by [`Outbox::admit`] for a message that was not pushed.
    pub(crate) fn release(&self, to: &AgentId) {
        let mut s = self.lock();
        if let Some(n) = s.in_flight.get_mut(to) {
            *n = n.saturating_sub(1);
        }
        drop(s);
        self.room.notify_waiters();
    }

    /// Records a message admitted before (or forced past the window: a redelivery) and
    /// returns its sequence number; `Err` hands it back when the connection has ended.
    #[allow(clippy::result_large_err)]
    pub(crate) fn push(&self, mut p: Pending, admitted: bool) -> std::result::Result<u64, Pending> {
        let mut s = self.lock();
        if s.closed {
            return Err(p);
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        p.seq = seq;
        if !admitted {
            *s.in_flight.entry(p.to()).or_insert(0) += 1;
        }
        s.unacked.insert(seq, p);
        Ok(seq)
    }

    /// Takes the messages of these ranges out, freeing their room.
    pub(crate) fn settle(&self, ranges: &[(u64, u64)]) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut s = self.lock();
        for &(first, last) in ranges {
            if last < first || last - first > 1 << 20 {
                continue;
            }
            let seqs: Vec<u64> = s.unacked.range(first..=last).map(|(k, _)| *k).collect();
            for seq in seqs {
                if let Some(p) = s.unacked.remove(&seq) {
                    let to = p.to();
                    if let Some(n) = s.in_flight.get_mut(&to) {
                        *n = n.saturating_sub(1);
                    }
                    out.push(p);
                }
            }
        }
        drop(s);
        if !out.is_empty() {
            self.room.notify_waiters();
        }
        out
    }

    /// The connection ended: no more pushes; what was unacknowledged, in send order, marked
    /// in doubt where it had been written.
    pub(crate) fn close(&self) -> Vec<Pending> {
        let mut s = self.lock();
        s.closed = true;
        s.in_flight.clear();
        let out: Vec<Pending> = std::mem::take(&mut s.unacked).into_values().collect();
        drop(s);
        self.room.notify_waiters();
        out.into_iter()
            .map(|mut p| {
                p.in_doubt = p.in_doubt || p.was_written();
                p
            })
            .collect()
    }

    /// The connection is retired while its peer lives on: no more pushes; what was
    /// unacknowledged, in send order, to go out on the connection in use (not in doubt: the
    /// peer's process still holds what arrived, and drops a copy of it).
    pub(crate) fn hand_over(&self) -> Vec<Pending> {
        let mut s = self.lock();
        s.closed = true;
        s.in_flight.clear();
        let out = std::mem::take(&mut s.unacked).into_values().collect();
        drop(s);
        self.room.notify_waiters();
        out
    }

    /// Whether nothing awaits acknowledgement.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().unacked.is_empty()
    }

    /// Whether a message of the flow `from`, `to`, `channel` awaits acknowledgement.
    pub(crate) fn has_flow(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        self.lock()
            .unacked
            .values()
            .any(|p| is_flow(&p.envelope, from, to, channel))
    }
}

fn is_flow(e: &Envelope, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
    &e.from == from && &e.channel == channel && e.target() == Some(to)
}

/// Messages whose connection ended unacknowledged, waiting to go out again, by receiver.
#[derive(Default)]
pub(crate) struct Redelivery {
    waiting: HashMap<AgentId, VecDeque<Pending>>,
    /// Receivers whose messages a fallback's redelivery handler is taking now.
    handing_off: HashSet<AgentId>,
}

impl Redelivery {
    /// Adds orphans (in send order); returns the receivers concerned.
    pub(crate) fn add(&mut self, orphans: Vec<Pending>) -> Vec<AgentId> {
        let mut touched = Vec::new();
        for p in orphans {
            let to = p.to();
            if !touched.contains(&to) {
                touched.push(to.clone());
            }
            self.waiting.entry(to).or_default().push_back(p);
        }
        touched
    }

    /// Everything waiting for `to`, in order.
    pub(crate) fn take(&mut self, to: &AgentId) -> VecDeque<Pending> {
        self.waiting.remove(to).unwrap_or_default()
    }

    /// The oldest message waiting for `to`, for a handoff.
    pub(crate) fn pop(&mut self, to: &AgentId) -> Option<Pending> {
        let q = self.waiting.get_mut(to)?;
        let p = q.pop_front();
        if q.is_empty() {
            self.waiting.remove(to);
        }
        p
    }

    /// Puts back a message a handoff could not deliver, first in line again.
    pub(crate) fn unpop(&mut self, p: Pending) {
        self.waiting.entry(p.to()).or_default().push_front(p);
    }

    pub(crate) fn has(&self, to: &AgentId) -> bool {
        self.waiting.contains_key(to)
    }

    /// Starts a handoff for `to`; `false` if one runs already.
    pub(crate) fn start_handoff(&mut self, to: &AgentId) -> bool {
        self.handing_off.insert(to.clone())
    }

    pub(crate) fn end_handoff(&mut self, to: &AgentId) {
        self.handing_off.remove(to);
    }

    /// Whether a message of the flow `from`, `to`, `channel` waits here (or may be with the
    /// redelivery handler now).
    pub(crate) fn has_flow(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        self.handing_off.contains(to)
            || self
                .waiting
                .get(to)
                .is_some_and(|q| q.iter().any(|p| is_flow(&p.envelope, from, to, channel)))
    }

    pub(crate) fn handing_off(&self, to: &AgentId) -> bool {
        self.handing_off.contains(to)
    }

    /// Takes out what waited past its deadline.
    pub(crate) fn expired(&mut self, now: Instant, deadline: Duration) -> Vec<Pending> {
        let mut out = Vec::new();
        self.waiting.retain(|_, q| {
            while q
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.accepted) >= deadline)
            {
                if let Some(p) = q.pop_front() {
                    out.push(p);
                }
            }
            !q.is_empty()
        });
        out
    }

    /// Takes out everything (shutdown).
    pub(crate) fn drain(&mut self) -> Vec<Pending> {
        self.waiting.drain().flat_map(|(_, q)| q).collect()
    }
}

/// Why an orphan that never made it again failed.
pub(crate) fn orphan_reason(p: &Pending) -> DeliveryFailure {
    if p.in_doubt {
        DeliveryFailure::Unconfirmed
    } else {
        DeliveryFailure::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};

    fn pending(to: &str, stats: &Arc<StatsRecorder>) -> Pending {
        let envelope = Envelope::new(
            "a".into(),
            Recipient::Agent(to.into()),
            "coordination".into(),
            MessageKind::Direct,
            Bytes::from_static(b"x"),
        );
        stats.accepted();
        Pending {
            body: aqe_core::encode(&envelope).expect("encode"),
            envelope,
            lane: Lane::Ordered("coordination".into()),
            accepted: Instant::now(),
            in_doubt: false,
            seq: 0,
            written: None,
            stats: stats.clone(),
            confirm: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_is_per_receiver_and_acks_free_it() {
        let out = Outbox::new(2);
        let stats = Arc::new(StatsRecorder::default());
        let lost = || Error::Shutdown;
        let wait = Duration::from_millis(100);
        for _ in 0..2 {
            out.admit(&"b".into(), wait, lost).await.expect("room");
            out.push(pending("b", &stats), true)
                .map_err(|_| ())
                .expect("open");
        }
        // b's window is full; c's is not.
        let full = out.admit(&"b".into(), wait, lost).await.expect_err("full");
        assert!(matches!(
            full,
            Error::SendFailed {
                reason: SendFailure::QueueFull(_),
                ..
            }
        ));
        out.admit(&"c".into(), wait, lost)
            .await
            .expect("c has room");
        let acked = out.settle(&[(1, 1)]);
        assert_eq!(acked.len(), 1);
        acked.into_iter().for_each(delivered);
        out.admit(&"b".into(), wait, lost)
            .await
            .expect("room again");
        assert_eq!(stats.snapshot().messages_unconfirmed, 1);
        // Closing hands back what is left, and admits no more.
        let orphans = out.close();
        assert_eq!(orphans.len(), 1);
        assert!(matches!(
            out.admit(&"b".into(), wait, lost).await,
            Err(Error::Shutdown)
        ));
        assert!(out.push(pending("b", &stats), false).is_err());
    }

    #[test]
    fn orphans_wait_per_receiver_in_order_until_their_deadline() {
        let stats = Arc::new(StatsRecorder::default());
        let mut r = Redelivery::default();
        let first = pending("b", &stats);
        let first_id = first.envelope.id;
        let touched = r.add(vec![first, pending("c", &stats), pending("b", &stats)]);
        assert_eq!(touched, [AgentId::from("b"), AgentId::from("c")]);
        assert_eq!(r.pop(&"b".into()).map(|p| p.envelope.id), Some(first_id));
        let later = Instant::now() + Duration::from_secs(11);
        let expired = r.expired(later, Duration::from_secs(10));
        assert_eq!(expired.len(), 2);
        assert!(!r.has(&"b".into()) && !r.has(&"c".into()));
        let (tx, _rx) = broadcast::channel(8);
        failed(&tx, expired, orphan_reason);
        let s = stats.snapshot();
        assert_eq!((s.messages_failed, s.messages_unconfirmed), (2, 1));
    }
}
