//! Reliable delivery over a server that delivers at most once: numbered flows, cumulative
//! "received" acknowledgements, retransmission, and the receiver's per-flow order.
//!
//! A flow is what one agent sends another on one channel. The sender numbers its messages
//! from 1 within an *epoch* (a number fresh for every new flow state, so that a receiver
//! never confuses two lives of a flow) and keeps each until the receiving agent has taken
//! it. The receiver delivers message `n` only after `n - 1` (go-back-N: a gap is dropped and
//! the sender, missing the acknowledgement, sends everything from the gap again), and
//! acknowledges cumulatively what it has received. NATS delivers a publisher's messages in
//! order, so gaps come only from real loss (a slow consumer, a reconnect).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use aqe_core::{AgentId, ChannelName, Envelope, MessageId, Result};

use crate::Map;
use crate::wire::{Ep, Received, Sequenced};

/// One flow, as its sender names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub(crate) from: AgentId,
    pub(crate) to: AgentId,
    pub(crate) channel: ChannelName,
}

/// A message accepted for delivery and not yet taken by its receiver.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) envelope: Envelope,
    pub(crate) accepted_at: Instant,
    sent_at: Instant,
    retransmitted: bool,
    /// The receiver's endpoint has it (it may or may not have been processed if that
    /// endpoint dies now).
    pub(crate) received: bool,
    /// Resolved when the message is taken or fails (confirmed sends).
    pub(crate) confirm: Option<oneshot::Sender<Result<()>>>,
}

#[derive(Debug)]
struct Flow {
    endpoint: Ep,
    epoch: u64,
    next_seq: u64,
    entries: VecDeque<Entry>,
}

impl Flow {
    fn base(&self) -> u64 {
        self.entries
            .iter()
            .find(|e| !e.received)
            .map_or(self.next_seq, |e| e.seq)
    }

    fn oldest(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |e| e.seq)
    }
}

/// What a sender has in flight, flow by flow.
#[derive(Debug)]
pub(crate) struct Outbox {
    window: usize,
    flows: Map<FlowKey, Flow>,
    /// By receiving agent and message id (the copies of a broadcast share the id).
    by_id: Map<(AgentId, MessageId), FlowKey>,
}

/// Epochs are fresh per process and never reused.
fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A retransmission to make: the flow, where its receiver is, and the messages.
pub(crate) struct Resend {
    pub(crate) key: FlowKey,
    pub(crate) endpoint: Ep,
    /// Each with whether its sender waits for its confirmation.
    pub(crate) messages: Vec<(Sequenced, Envelope, bool)>,
}

impl Outbox {
    pub(crate) fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            flows: Map::default(),
            by_id: Map::default(),
        }
    }

    /// Whether the flow has room for one more message.
    #[cfg(test)]
    pub(crate) fn has_room(&self, key: &FlowKey) -> bool {
        self.flows
            .get(key)
            .is_none_or(|f| f.entries.len() < self.window)
    }

    /// Takes `envelope` into the flow to `endpoint`, with the confirmation its sender waits
    /// for (taken from `confirm` only then); `None` when the window is full, or while
    /// messages to the receiver's previous endpoint are still held. A flow whose receiver
    /// moved to another endpoint starts a new epoch (its entries were taken out when the old
    /// endpoint went away).
    pub(crate) fn admit(
        &mut self,
        key: &FlowKey,
        endpoint: Ep,
        envelope: &Envelope,
        now: Instant,
        confirm: &mut Option<oneshot::Sender<Result<()>>>,
    ) -> Option<Sequenced> {
        if let Some(flow) = self.flows.get(key)
            && (flow.entries.len() >= self.window
                || (flow.endpoint != endpoint && !flow.entries.is_empty()))
        {
            return None;
        }
        let flow = self.flows.entry(key.clone()).or_insert_with(|| Flow {
            endpoint,
            epoch: next_epoch(),
            next_seq: 1,
            entries: VecDeque::new(),
        });
        if flow.endpoint != endpoint && flow.entries.is_empty() {
            flow.endpoint = endpoint;
            flow.epoch = next_epoch();
            flow.next_seq = 1;
        }
        let seq = flow.next_seq;
        flow.next_seq += 1;
        self.by_id
            .insert((key.to.clone(), envelope.id), key.clone());
        flow.entries.push_back(Entry {
            seq,
            envelope: envelope.clone(),
            accepted_at: now,
            sent_at: now,
            retransmitted: false,
            received: false,
            confirm: confirm.take(),
        });
        Some(Sequenced {
            epoch: flow.epoch,
            seq,
            base: flow.base(),
            oldest: flow.oldest(),
        })
    }

    /// The receiver's endpoint has the flow up to `up_to`; returns a round-trip sample when
    /// the newest of them was sent once.
    pub(crate) fn on_received(
        &mut self,
        key: &FlowKey,
        by: Ep,
        epoch: u64,
        up_to: u64,
        now: Instant,
    ) -> Option<Duration> {
        let flow = self.flows.get_mut(key)?;
        if flow.epoch != epoch || flow.endpoint != by {
            return None;
        }
        let mut sample = None;
        for e in flow.entries.iter_mut().take_while(|e| e.seq <= up_to) {
            if !e.received {
                e.received = true;
                if e.seq == up_to && !e.retransmitted {
                    sample = Some(now.saturating_duration_since(e.sent_at));
                }
            }
        }
        sample
    }

    /// Whether the flow has messages its receiver's endpoint has not acknowledged receiving.
    pub(crate) fn unreceived(&self, key: &FlowKey) -> bool {
        self.flows
            .get(key)
            .is_some_and(|f| f.entries.iter().any(|e| !e.received))
    }

    /// Removes the message `id` (taken, or dropped unread by its receiver), when the
    /// endpoint saying so is the one its flow goes to.
    pub(crate) fn remove(
        &mut self,
        to: &AgentId,
        id: MessageId,
        by: Ep,
    ) -> Option<(FlowKey, Entry)> {
        let slot = (to.clone(), id);
        let key = self.by_id.get(&slot)?.clone();
        let flow = self.flows.get_mut(&key)?;
        if flow.endpoint != by {
            return None;
        }
        self.by_id.remove(&slot);
        let pos = flow.entries.iter().position(|e| e.envelope.id == id)?;
        let entry = flow.entries.remove(pos)?;
        // Delivered in order: everything before it was received too.
        for e in flow.entries.iter_mut().take_while(|e| e.seq < entry.seq) {
            e.received = true;
        }
        Some((key, entry))
    }

    /// Messages to send again: in a flow whose oldest unreceived message was sent `after`
    /// ago or more, everything unreceived (go-back-N); and, in any flow, a message received
    /// but not taken for four times `after`, since the acknowledgement that it was taken may
    /// be lost (the receiver's inbox recognises the copy and confirms it again).
    pub(crate) fn due(&mut self, now: Instant, after: Duration) -> Vec<Resend> {
        let mut out = Vec::new();
        for (key, flow) in &mut self.flows {
            let late = flow
                .entries
                .iter()
                .find(|e| !e.received)
                .is_some_and(|e| now.saturating_duration_since(e.sent_at) >= after);
            let (epoch, base, oldest) = (flow.epoch, flow.base(), flow.oldest());
            let messages: Vec<_> = flow
                .entries
                .iter_mut()
                .filter(|e| {
                    if e.received {
                        now.saturating_duration_since(e.sent_at) >= after * 4
                    } else {
                        late
                    }
                })
                .map(|e| {
                    e.sent_at = now;
                    e.retransmitted = true;
                    let s = Sequenced {
                        epoch,
                        seq: e.seq,
                        base,
                        oldest,
                    };
                    (s, e.envelope.clone(), e.confirm.is_some())
                })
                .collect();
            if !messages.is_empty() {
                out.push(Resend {
                    key: key.clone(),
                    endpoint: flow.endpoint,
                    messages,
                });
            }
        }
        out
    }

    /// Messages accepted `deadline` ago or more: they are out of time.
    pub(crate) fn expired(&mut self, now: Instant, deadline: Duration) -> Vec<(FlowKey, Entry)> {
        let mut out = Vec::new();
        for (key, flow) in &mut self.flows {
            while flow
                .entries
                .front()
                .is_some_and(|e| now.saturating_duration_since(e.accepted_at) >= deadline)
            {
                if let Some(e) = flow.entries.pop_front() {
                    self.by_id.remove(&(key.to.clone(), e.envelope.id));
                    out.push((key.clone(), e));
                }
            }
        }
        self.flows
            .retain(|_, f| !f.entries.is_empty() || f.next_seq > 1);
        out
    }

    /// Everything in flight to `endpoint`, which is gone: the flows to it end.
    pub(crate) fn take_endpoint(&mut self, endpoint: Ep) -> Vec<(FlowKey, Entry)> {
        let mut out = Vec::new();
        self.flows.retain(|key, flow| {
            if flow.endpoint != endpoint {
                return true;
            }
            for e in flow.entries.drain(..) {
                out.push((key.clone(), e));
            }
            false
        });
        for (key, e) in &out {
            self.by_id.remove(&(key.to.clone(), e.envelope.id));
        }
        out
    }

    /// Everything in flight from agent `from` (it detached or the endpoint shuts down).
    pub(crate) fn take_sender(&mut self, from: &AgentId) -> Vec<(FlowKey, Entry)> {
        let mut out = Vec::new();
        self.flows.retain(|key, flow| {
            if &key.from != from {
                return true;
            }
            for e in flow.entries.drain(..) {
                out.push((key.clone(), e));
            }
            false
        });
        for (key, e) in &out {
            self.by_id.remove(&(key.to.clone(), e.envelope.id));
        }
        out
    }

    /// Messages in flight, all flows together.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// One flow, as its receiver names it: the sending endpoint too, since two lives of an
/// agent on two endpoints are two flows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct InKey {
    pub(crate) endpoint: Ep,
    pub(crate) from: AgentId,
    pub(crate) to: AgentId,
    pub(crate) channel: ChannelName,
}

/// What became of a message delivered to the receiving agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Still in the agent's inbox.
    Queued,
    /// Taken by the agent.
    Taken,
    /// Dropped unread when the agent stopped.
    Abandoned,
}

#[derive(Debug)]
struct InFlow {
    epoch: u64,
    next: u64,
    last_seen: Instant,
    /// What became of each delivered message the sender may still ask about (from its
    /// `oldest` on), so that a copy sent again because a confirmation was lost is answered
    /// with the confirmation, never delivered twice. By sequence number, increasing (not
    /// always contiguous: a flow may jump ahead to the sender's base).
    fates: VecDeque<(u64, MessageId, Settled)>,
    /// Received since the last "received" acknowledgement (the flow is in `Inflow::dirty`).
    dirty: bool,
}

impl InFlow {
    fn fate(&mut self, seq: u64) -> Option<&mut (u64, MessageId, Settled)> {
        let i = self.fates.binary_search_by_key(&seq, |f| f.0).ok()?;
        self.fates.get_mut(i)
    }
}

/// Most fates one flow remembers; beyond, the oldest are forgotten (their senders' deadlines
/// have passed long before, at any realistic rate).
const MAX_FATES: usize = 16 * 1024;

/// What the receiver does with a numbered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Next in order: deliver it. The flow is now received up to the value.
    Deliver(u64),
    /// Already delivered: acknowledge again (the first acknowledgement may be lost), with
    /// what became of it if that is known.
    Duplicate(u64, Option<Settled>),
    /// Something before it is missing: drop it, the sender will send from the gap.
    Gap,
    /// Too many flows tracked: drop it, the sender will try again.
    Full,
}

/// The receiving side of every flow to this endpoint's agents.
#[derive(Debug)]
pub(crate) struct Inflow {
    max_flows: usize,
    flows: Map<InKey, InFlow>,
    /// Flows with something received and not yet acknowledged as received.
    dirty: Vec<InKey>,
}

impl Inflow {
    pub(crate) fn new(max_flows: usize) -> Self {
        Self {
            max_flows: max_flows.max(1),
            flows: Map::default(),
            dirty: Vec::new(),
        }
    }

    /// Decides about message `flow.seq` (id `id`) of `key`.
    pub(crate) fn on_message(
        &mut self,
        key: InKey,
        id: MessageId,
        flow: &Sequenced,
        now: Instant,
    ) -> Verdict {
        if !self.flows.contains_key(&key) && self.flows.len() >= self.max_flows {
            return Verdict::Full;
        }
        let fresh = || InFlow {
            epoch: flow.epoch,
            next: flow.base.max(1),
            last_seen: now,
            fates: VecDeque::new(),
            dirty: false,
        };
        let state = match self.flows.get_mut(&key) {
            Some(state) => state,
            None => self.flows.entry(key.clone()).or_insert_with(fresh),
        };
        if state.epoch != flow.epoch {
            // A new life of the flow: what came before `base` was settled in the old one.
            *state = fresh();
        }
        state.last_seen = now;
        if state.next < flow.base {
            // The sender saw everything before `base` received (by an earlier state this
            // side forgot): nothing before it will come again.
            state.next = flow.base;
        }
        // The sender no longer asks about anything before `oldest`.
        while state.fates.front().is_some_and(|f| f.0 < flow.oldest) {
            state.fates.pop_front();
        }
        if flow.seq == state.next {
            state.next += 1;
            state.fates.push_back((flow.seq, id, Settled::Queued));
            while state.fates.len() > MAX_FATES {
                state.fates.pop_front();
            }
            if !state.dirty {
                state.dirty = true;
                self.dirty.push(key);
            }
            Verdict::Deliver(flow.seq)
        } else if flow.seq < state.next {
            let fate = state.fate(flow.seq).filter(|f| f.1 == id).map(|f| f.2);
            Verdict::Duplicate(state.next - 1, fate)
        } else {
            Verdict::Gap
        }
    }

    /// Records what became of message `seq` of `key`.
    pub(crate) fn settle(&mut self, key: &InKey, epoch: u64, seq: u64, fate: Settled) {
        if let Some(state) = self.flows.get_mut(key)
            && state.epoch == epoch
            && let Some(f) = state.fate(seq)
        {
            f.2 = fate;
        }
    }

    /// Forgets flows silent for `idle`: by then their senders gave up on anything unsent.
    pub(crate) fn expire(&mut self, now: Instant, idle: Duration) {
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < idle);
    }

    /// Forgets the flows from `endpoint`, which is gone.
    pub(crate) fn forget_endpoint(&mut self, endpoint: Ep) {
        self.flows.retain(|k, _| k.endpoint != endpoint);
    }

    /// What flows received since this was last asked, each up to where it is complete: the
    /// "received" acknowledgements, gathered once per batch rather than noted per message.
    pub(crate) fn take_received(&mut self) -> Vec<(Ep, Received)> {
        let mut out = Vec::with_capacity(self.dirty.len());
        for key in std::mem::take(&mut self.dirty) {
            if let Some(state) = self.flows.get_mut(&key)
                && std::mem::take(&mut state.dirty)
            {
                out.push((
                    key.endpoint,
                    Received {
                        from: key.from,
                        to: key.to,
                        channel: key.channel,
                        epoch: state.epoch,
                        up_to: state.next - 1,
                    },
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};
    use bytes::Bytes;

    fn env(i: u8) -> Envelope {
        Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "c".into(),
            MessageKind::Direct,
            Bytes::from(vec![i]),
        )
    }

    fn key() -> FlowKey {
        FlowKey {
            from: "a".into(),
            to: "b".into(),
            channel: "c".into(),
        }
    }

    fn inkey() -> InKey {
        InKey {
            endpoint: Ep(1),
            from: "a".into(),
            to: "b".into(),
            channel: "c".into(),
        }
    }

    /// A lossy link between an outbox and an inflow: every message and acknowledgement is
    /// lost one time in five. The receiver delivers each message once, in order, and the
    /// sender learns that each was taken.
    #[test]
    fn go_back_n_delivers_everything_once_in_order_under_loss() {
        for seed in 0..300u64 {
            let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut lost = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 5 == 0
            };
            let mut now = Instant::now();
            let mut out = Outbox::new(8);
            let mut inflow = Inflow::new(16);
            let mut delivered: Vec<u8> = Vec::new();
            let mut to_send: VecDeque<Envelope> = (0..40).map(env).collect();
            for _round in 0..5000 {
                now += Duration::from_millis(10);
                let mut wire = Vec::new();
                while out.has_room(&key()) {
                    let Some(e) = to_send.pop_front() else { break };
                    let s = out.admit(&key(), Ep(9), &e, now, &mut None).expect("room");
                    wire.push((s, e));
                }
                for r in out.due(now, Duration::from_millis(50)) {
                    wire.extend(r.messages.into_iter().map(|(s, e, _)| (s, e)));
                }
                for (s, e) in wire {
                    if lost() {
                        continue;
                    }
                    let up_to = match inflow.on_message(inkey(), e.id, &s, now) {
                        Verdict::Deliver(up_to) => {
                            // The agent takes it at once.
                            delivered.push(e.payload[0]);
                            inflow.settle(&inkey(), s.epoch, s.seq, Settled::Taken);
                            up_to
                        }
                        // A copy: the confirmation is sent again, nothing is delivered.
                        Verdict::Duplicate(up_to, fate) => {
                            assert_eq!(fate, Some(Settled::Taken), "seed {seed}");
                            up_to
                        }
                        Verdict::Gap | Verdict::Full => continue,
                    };
                    if !lost() {
                        out.on_received(&key(), Ep(9), s.epoch, up_to, now);
                    }
                    if !lost() {
                        out.remove(&key().to, e.id, Ep(9));
                    }
                }
                if to_send.is_empty() && out.len() == 0 {
                    break;
                }
            }
            assert_eq!(delivered, (0..40).collect::<Vec<u8>>(), "seed {seed}");
            assert_eq!(out.len(), 0, "seed {seed}: every take confirmed");
        }
    }

    #[test]
    fn a_new_epoch_restarts_the_receiver_and_base_skips_what_was_settled() {
        let now = Instant::now();
        let mut inflow = Inflow::new(4);
        let s = |epoch, seq, base| Sequenced {
            epoch,
            seq,
            base,
            oldest: base,
        };
        let id = MessageId;
        assert_eq!(
            inflow.on_message(inkey(), id(1), &s(1, 1, 1), now),
            Verdict::Deliver(1)
        );
        let gap = Sequenced {
            oldest: 1,
            ..s(1, 3, 2)
        };
        assert_eq!(inflow.on_message(inkey(), id(3), &gap, now), Verdict::Gap);
        assert_eq!(
            inflow.on_message(inkey(), id(1), &s(1, 1, 1), now),
            Verdict::Duplicate(1, Some(Settled::Queued))
        );
        inflow.settle(&inkey(), 1, 1, Settled::Abandoned);
        assert_eq!(
            inflow.on_message(inkey(), id(1), &s(1, 1, 1), now),
            Verdict::Duplicate(1, Some(Settled::Abandoned))
        );
        // A new life of the flow: numbering restarts.
        assert_eq!(
            inflow.on_message(inkey(), id(5), &s(2, 1, 1), now),
            Verdict::Deliver(1)
        );
        // A receiver that forgot the flow starts at the sender's base.
        inflow.expire(now + Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(
            inflow.on_message(inkey(), id(7), &s(2, 7, 7), now),
            Verdict::Deliver(7)
        );
        assert_eq!(
            inflow.on_message(inkey(), id(9), &s(2, 9, 8), now),
            Verdict::Gap
        );
        // What the sender no longer asks about is forgotten.
        assert_eq!(
            inflow.on_message(inkey(), id(8), &s(2, 8, 8), now),
            Verdict::Deliver(8)
        );
        assert_eq!(
            inflow.on_message(inkey(), id(7), &s(2, 7, 8), now),
            Verdict::Duplicate(8, None)
        );
    }

    #[test]
    fn received_is_gathered_once_per_batch_up_to_the_last_in_order() {
        let now = Instant::now();
        let mut inflow = Inflow::new(8);
        let s = |seq| Sequenced {
            epoch: 1,
            seq,
            base: 1,
            oldest: 1,
        };
        for seq in 1..=3 {
            let v = inflow.on_message(inkey(), MessageId(seq), &s(seq), now);
            assert_eq!(v, Verdict::Deliver(seq));
        }
        let got = inflow.take_received();
        assert_eq!(got.len(), 1, "one acknowledgement for the flow");
        assert_eq!((got[0].0, got[0].1.epoch, got[0].1.up_to), (Ep(1), 1, 3));
        assert!(inflow.take_received().is_empty(), "nothing new");
        // A gap is not received; the next in order is.
        assert_eq!(
            inflow.on_message(inkey(), MessageId(5), &s(5), now),
            Verdict::Gap
        );
        assert!(inflow.take_received().is_empty());
        inflow.on_message(inkey(), MessageId(4), &s(4), now);
        assert_eq!(inflow.take_received()[0].1.up_to, 4);
    }

    #[test]
    fn windows_deadlines_and_departures_hand_back_every_entry() {
        let now = Instant::now();
        let mut out = Outbox::new(2);
        assert!(out.admit(&key(), Ep(1), &env(0), now, &mut None).is_some());
        assert!(out.admit(&key(), Ep(1), &env(1), now, &mut None).is_some());
        // A refused message keeps the confirmation its sender waits for.
        let (tx, _rx) = oneshot::channel();
        let mut confirm = Some(tx);
        assert!(
            out.admit(&key(), Ep(1), &env(2), now, &mut confirm)
                .is_none(),
            "window full"
        );
        assert!(
            out.admit(&key(), Ep(2), &env(2), now, &mut confirm)
                .is_none(),
            "the receiver moved while messages to its old endpoint are in flight"
        );
        assert!(confirm.is_some(), "a refusal takes nothing");
        let gone = out.take_endpoint(Ep(1));
        assert_eq!(gone.len(), 2);
        assert_eq!(out.len(), 0);
        let s = out
            .admit(&key(), Ep(2), &env(3), now, &mut None)
            .expect("room");
        assert_eq!((s.seq, s.base), (1, 1));
        assert!(
            out.on_received(&key(), Ep(2), s.epoch + 1, 1, now)
                .is_none(),
            "stale epoch"
        );
        assert!(
            out.on_received(&key(), Ep(3), s.epoch, 1, now).is_none(),
            "not its endpoint"
        );
        let expired = out.expired(now + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(expired.len(), 1);
        assert_eq!(out.len(), 0);
        let mut full = Inflow::new(1);
        let first = Sequenced {
            epoch: 1,
            seq: 1,
            base: 1,
            oldest: 1,
        };
        full.on_message(inkey(), MessageId(1), &first, now);
        let other = InKey {
            from: "z".into(),
            ..inkey()
        };
        assert_eq!(
            full.on_message(other, MessageId(2), &first, now),
            Verdict::Full
        );
    }
}
