//! The receiving side of a session: what became of each reliable message the peer sent
//! (so that a copy is answered, never delivered twice), what is held for order, what the
//! peer may make this side hold (its window, in messages and bytes), and the
//! acknowledgements waiting to go.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aqe_core::plumbing::FastMap;
use aqe_core::{AgentId, Envelope};

use crate::config::WirePolicy;
use crate::frame::{Frame, Lane, Refusal, Transmit};
use crate::ranges;
use crate::seqmap::PeerSeqMap;

/// Bytes one endpoint holds for all its sessions together: a bound no number of peers can
/// exceed. Shared by the sessions of a node.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    pub fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit || u == 0).then_some(u + n)
            })
            .is_ok()
    }

    /// Gives `n` bytes back.
    pub fn give(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// The endpoint-wide budgets every session draws from.
#[derive(Debug)]
pub struct Budgets {
    /// Inbound payload bytes held: unsettled reliable messages, parked frames, requests in
    /// hand ([`Config::endpoint_bytes`](crate::Config::endpoint_bytes)).
    pub held: Budget,
    /// Encoded registration bytes of every peer's agents
    /// ([`Config::membership_bytes`](crate::Config::membership_bytes)).
    pub membership: Budget,
}

impl Budgets {
    /// The budgets `config` sets.
    pub fn new(config: &crate::Config) -> Self {
        Self {
            held: Budget::new(config.endpoint_bytes),
            membership: Budget::new(config.membership_bytes),
        }
    }
}

/// What became of one message.
pub(crate) enum Fate {
    /// Held until its sender's membership announcement arrives.
    Parked,
    /// Held until the message before it in its flow is delivered.
    Waiting {
        to: AgentId,
        len: u64,
        after: u64,
        confirm: bool,
        /// Boxed: a fate is kept per message in an ordered map, which moves its entries,
        /// and few messages wait.
        envelope: Box<Envelope>,
    },
    /// In its agent's inbox; `confirm`: its sender waits for the acknowledgement.
    Queued {
        to: AgentId,
        len: u64,
        confirm: bool,
    },
    /// Taken by its agent.
    Taken,
    /// Refused, for this reason; it came after `after` in its flow (what comes after it
    /// waits for that one instead).
    Refused(Refusal, u64),
}

/// Acknowledgements waiting to go.
#[derive(Default)]
struct Pending {
    taken: Vec<u64>,
    refused: Vec<(u64, Refusal)>,
    /// Something new was received since the last acknowledgement.
    received: bool,
    /// When the first of these was added.
    since: Option<Instant>,
    /// They go with the next transmission.
    due: bool,
}

impl Pending {
    fn count(&self) -> usize {
        self.taken.len() + self.refused.len() + usize::from(self.received)
    }
}

/// The receiving state of one session.
pub(crate) struct Inflow {
    /// Everything below was settled at the sender: copies of it are ignored.
    floor: u64,
    /// Numbers come from the peer, in any order: a ring for those in order, a B-tree beside
    /// it for the rest (a ring alone would shift up to a span of entries for one inserted
    /// in the middle; a B-tree alone allocates a node every few messages).
    fates: PeerSeqMap<Fate>,
    /// Queued or held messages per receiving agent: (count, bytes).
    agents: FastMap<AgentId, (u32, u64)>,
    bytes: u64,
    /// A waiting message, by the number it waits for.
    waiting_on: BTreeMap<u64, u64>,
    pending: Pending,
    /// Numbers `advance` looks at, kept for its capacity.
    below: Vec<u64>,
    budget: Arc<Budgets>,
    window: u32,
    session_bytes: u64,
}

/// A message to hand to its agent.
pub(crate) struct Ready {
    pub(crate) seq: u64,
    pub(crate) to: AgentId,
    pub(crate) confirm: bool,
    pub(crate) envelope: Envelope,
}

impl Inflow {
    pub(crate) fn new(window: u32, session_bytes: u64, budget: Arc<Budgets>) -> Self {
        Self {
            floor: 1,
            fates: PeerSeqMap::default(),
            agents: FastMap::default(),
            bytes: 0,
            waiting_on: BTreeMap::new(),
            pending: Pending::default(),
            below: Vec::new(),
            budget,
            window: window.max(1),
            session_bytes: session_bytes.max(1),
        }
    }

    /// The sender settled everything below `low`: forget it, drop what was held of it, and
    /// release what waited for it. Messages still in an inbox stay counted until taken.
    pub(crate) fn advance(&mut self, low: u64, ready: &mut Vec<Ready>) {
        if low <= self.floor {
            return;
        }
        self.floor = low;
        let mut below = std::mem::take(&mut self.below);
        below.extend(self.fates.keys_below(low));
        for &seq in &below {
            match self.fates.get(&seq) {
                Some(Fate::Queued { .. }) => {}
                Some(Fate::Waiting { .. }) => {
                    if let Some(Fate::Waiting { to, len, after, .. }) = self.fates.remove(&seq) {
                        self.waiting_on.remove(&after);
                        self.release(&to, len);
                    }
                }
                _ => {
                    self.fates.remove(&seq);
                }
            }
        }
        below.clear();
        below.shrink_to(crate::KEPT_ROOM);
        self.below = below;
        // What waited for something the sender settled may go now.
        let freed: Vec<u64> = self
            .waiting_on
            .iter()
            .filter(|(after, _)| **after < low)
            .map(|(_, seq)| *seq)
            .collect();
        for seq in freed {
            self.deliver_waiting(seq, ready);
        }
    }

    /// Whether `seq` is older than what the sender may still send.
    pub(crate) fn stale(&self, seq: u64) -> bool {
        seq < self.floor
    }

    /// What became of `seq`, if it arrived before.
    pub(crate) fn fate(&self, seq: u64) -> Option<&Fate> {
        self.fates.get(&seq)
    }

    /// A copy of `seq` arrived: the acknowledgement it stands for goes again.
    pub(crate) fn duplicate(&mut self, seq: u64, now: Instant, wire: &WirePolicy) {
        match self.fates.get(&seq) {
            Some(Fate::Taken) => self.pending.taken.push(seq),
            Some(Fate::Refused(r, _)) => {
                let r = *r;
                self.pending.refused.push((seq, r));
            }
            _ => self.pending.received = true,
        }
        self.noted(now, false, wire);
    }

    /// What the message after `after` in its flow really waits for: `None` if it may be
    /// delivered now (everything before it was delivered or settled), else the number to
    /// wait for (a refused message is skipped: its successor waits for its predecessor).
    pub(crate) fn blocked_by(&self, mut after: u64) -> Option<u64> {
        loop {
            if after == 0 || after < self.floor {
                return None;
            }
            match self.fates.get(&after) {
                Some(Fate::Queued { .. } | Fate::Taken) => return None,
                Some(Fate::Refused(_, before)) if *before < after => after = *before,
                Some(Fate::Refused(..)) => return None,
                _ => return Some(after),
            }
        }
    }

    /// Takes room for a message of `len` bytes to `to`: its window, the session's bytes,
    /// the endpoint's budget.
    pub(crate) fn room(&mut self, to: &AgentId, len: u64) -> bool {
        let (count, _) = self.agents.get(to).copied().unwrap_or_default();
        let fits = count < self.window
            && (self.bytes == 0 || self.bytes + len <= self.session_bytes)
            && self.budget.held.take(len);
        if fits {
            // Looked up by reference first: the name is cloned only for a new receiver.
            let a = match self.agents.get_mut(to) {
                Some(a) => a,
                None => self.agents.entry(to.clone()).or_default(),
            };
            a.0 += 1;
            a.1 += len;
            self.bytes += len;
        }
        fits
    }

    fn release(&mut self, to: &AgentId, len: u64) {
        if let Some(a) = self.agents.get_mut(to) {
            a.0 = a.0.saturating_sub(1);
            a.1 = a.1.saturating_sub(len);
            if a.0 == 0 {
                self.agents.remove(to);
            }
        }
        self.bytes = self.bytes.saturating_sub(len);
        self.budget.held.give(len);
    }

    /// `seq` waits for the sender's membership.
    pub(crate) fn park(&mut self, seq: u64) {
        self.fates.insert(seq, Fate::Parked);
    }

    /// `seq` is no longer parked (it is looked at again).
    pub(crate) fn unpark(&mut self, seq: u64) {
        if matches!(self.fates.get(&seq), Some(Fate::Parked)) {
            self.fates.remove(&seq);
        }
    }

    /// `seq` waits for `after` (room was taken; `after` from [`Inflow::blocked_by`]).
    pub(crate) fn wait(&mut self, seq: u64, after: u64, r: Ready, len: u64) {
        self.waiting_on.insert(after, seq);
        self.fates.insert(
            seq,
            Fate::Waiting {
                to: r.to,
                len,
                after,
                confirm: r.confirm,
                envelope: Box::new(r.envelope),
            },
        );
        self.pending.received = true;
    }

    /// `seq` goes to its agent (room was taken); so does what waited for it, in order.
    pub(crate) fn deliver(&mut self, r: Ready, len: u64, ready: &mut Vec<Ready>) {
        let seq = r.seq;
        self.fates.insert(
            seq,
            Fate::Queued {
                to: r.to.clone(),
                len,
                confirm: r.confirm,
            },
        );
        self.pending.received = true;
        ready.push(r);
        if let Some(next) = self.waiting_on.remove(&seq) {
            self.deliver_waiting(next, ready);
        }
    }

    fn deliver_waiting(&mut self, seq: u64, ready: &mut Vec<Ready>) {
        let mut next = Some(seq);
        while let Some(seq) = next.take() {
            let Some(Fate::Waiting {
                to,
                len,
                envelope,
                after,
                confirm,
            }) = self.fates.remove(&seq)
            else {
                return;
            };
            self.waiting_on.remove(&after);
            self.fates.insert(
                seq,
                Fate::Queued {
                    to: to.clone(),
                    len,
                    confirm,
                },
            );
            ready.push(Ready {
                seq,
                to,
                confirm,
                envelope: *envelope,
            });
            next = self.waiting_on.remove(&seq);
        }
    }

    /// `seq` (which came after `after` in its flow) is refused; what waited for it waits
    /// for its predecessor instead, or goes now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn refuse(
        &mut self,
        seq: u64,
        after: u64,
        reason: Refusal,
        now: Instant,
        wire: &WirePolicy,
        ready: &mut Vec<Ready>,
    ) {
        if matches!(reason, Refusal::Overflow | Refusal::NotRegistered) {
            tracing::debug!(
                seq,
                ?reason,
                session_bytes = self.bytes,
                endpoint_bytes = self.budget.held.used(),
                "message refused"
            );
        }
        self.fates.insert(seq, Fate::Refused(reason, after));
        self.pending.refused.push((seq, reason));
        self.noted(now, true, wire);
        if let Some(next) = self.waiting_on.remove(&seq) {
            match self.blocked_by(after) {
                None => self.deliver_waiting(next, ready),
                Some(before) => {
                    self.waiting_on.insert(before, next);
                    if let Some(Fate::Waiting { after, .. }) = self.fates.get_mut(&next) {
                        *after = before;
                    }
                }
            }
        }
    }

    /// The agent took `seq` (`Some(reason)`: it will not: it stopped).
    pub(crate) fn settle(
        &mut self,
        seq: u64,
        refused: Option<Refusal>,
        now: Instant,
        wire: &WirePolicy,
    ) {
        let fate = match refused {
            None => Fate::Taken,
            // Delivered in order: its successors wait for nothing more.
            Some(r) => Fate::Refused(r, 0),
        };
        // Its fate is changed in place (a removal and an insertion cost twice the search);
        // below the floor it is forgotten.
        let floor = self.floor;
        let queued = match self.fates.get_mut(&seq) {
            Some(slot @ Fate::Queued { .. }) if seq >= floor => std::mem::replace(slot, fate),
            Some(Fate::Queued { .. }) => match self.fates.remove(&seq) {
                Some(q) => q,
                None => return,
            },
            _ => return,
        };
        let Fate::Queued { to, len, confirm } = queued else {
            return;
        };
        let urgent = confirm;
        self.release(&to, len);
        match refused {
            None => self.pending.taken.push(seq),
            Some(r) => self.pending.refused.push((seq, r)),
        }
        self.noted(now, urgent || refused.is_some(), wire);
    }

    /// Something was received (the wire acknowledges receipts).
    pub(crate) fn received(&mut self, urgent: bool, now: Instant, wire: &WirePolicy) {
        self.pending.received = true;
        self.noted(now, urgent, wire);
    }

    /// Decides whether what is pending goes with the next transmission: at once when urgent
    /// or the wire does not batch; when the batch is large; or when this comes
    /// [`WirePolicy::ack_delay`] after the batch began. Otherwise [`Inflow::ack_at`] says
    /// when the tail goes.
    fn noted(&mut self, now: Instant, urgent: bool, wire: &WirePolicy) {
        let since = *self.pending.since.get_or_insert(now);
        if urgent
            || wire.ack_delay == Duration::ZERO
            || self.pending.count() >= wire.ack_batch
            || now >= since + wire.ack_delay
        {
            self.pending.due = true;
        }
    }

    /// When pending acknowledgements go if nothing else sends them.
    pub(crate) fn ack_at(&self, wire: &WirePolicy) -> Option<Instant> {
        if self.pending.due {
            return None;
        }
        self.pending.since.map(|s| s + wire.ack_linger)
    }

    /// Makes pending acknowledgements due if their time came.
    pub(crate) fn on_timeout(&mut self, now: Instant, wire: &WirePolicy) {
        if let Some(at) = self.ack_at(wire)
            && now >= at
        {
            self.pending.due = true;
        }
    }

    /// The acknowledgement frames, if due.
    pub(crate) fn acks(
        &mut self,
        wire: &WirePolicy,
        out: &mut std::collections::VecDeque<Transmit>,
    ) {
        if !self.pending.due {
            return;
        }
        // Taken apart rather than replaced: the list of taken numbers keeps its room.
        let p = &mut self.pending;
        let (was_received, mut refused) = (p.received, std::mem::take(&mut p.refused));
        (p.received, p.since, p.due) = (false, None, false);
        let received = if wire.ack_received && was_received {
            ranges::of_sorted(self.fates.keys().filter(|s| *s >= self.floor))
        } else {
            Vec::new()
        };
        let taken = ranges::of(&mut self.pending.taken);
        self.pending.taken.clear();
        if !received.is_empty() || !taken.is_empty() {
            out.push_back(Transmit::Frame(
                Lane::Control,
                Frame::Acks { received, taken },
            ));
        }
        refused.sort_by_key(|(seq, r)| (*r as u8, *seq));
        for chunk in refused.chunk_by(|a, b| a.1 == b.1) {
            out.push_back(Transmit::Frame(
                Lane::Control,
                Frame::Refused {
                    seqs: ranges::of(&mut chunk.iter().map(|(s, _)| *s).collect()),
                    reason: chunk[0].1,
                },
            ));
        }
    }

    /// Whether acknowledgements are due.
    pub(crate) fn acks_due(&self) -> bool {
        self.pending.due
    }

    /// Messages held here (in inboxes or waiting): for bounds.
    pub(crate) fn held(&self) -> (usize, u64) {
        (self.agents.values().map(|a| a.0 as usize).sum(), self.bytes)
    }

    /// The endpoint's budgets.
    pub(crate) fn budgets(&self) -> &Budgets {
        &self.budget
    }

    /// Gives back everything still counted (the session ended).
    pub(crate) fn close(&mut self) {
        let held: Vec<(AgentId, u64)> = self
            .fates
            .values()
            .filter_map(|f| match f {
                Fate::Queued { to, len, .. } | Fate::Waiting { to, len, .. } => {
                    Some((to.clone(), *len))
                }
                _ => None,
            })
            .collect();
        for (to, len) in held {
            self.release(&to, len);
        }
        self.fates.clear();
        self.waiting_on.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};

    /// Delivers `seq` to agent "b" and has it taken at `now`.
    fn taken(inflow: &mut Inflow, seq: u64, confirm: bool, now: Instant, wire: &WirePolicy) {
        let envelope = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "coordination".into(),
            MessageKind::Direct,
            bytes::Bytes::from_static(b"x"),
        );
        let r = Ready {
            seq,
            to: "b".into(),
            confirm,
            envelope,
        };
        let mut ready = Vec::new();
        inflow.deliver(r, 1, &mut ready);
        inflow.settle(seq, None, now, wire);
    }

    fn taken_ranges(inflow: &mut Inflow, wire: &WirePolicy) -> Vec<(u64, u64)> {
        let mut out = std::collections::VecDeque::new();
        inflow.acks(wire, &mut out);
        out.into_iter()
            .flat_map(|t| match t {
                Transmit::Frame(_, Frame::Acks { taken, .. }) => taken,
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn acknowledgements_wait_for_the_batch_the_delay_or_the_linger_and_a_confirm_goes_at_once() {
        let budgets = Arc::new(Budgets::new(&crate::Config::default()));
        for wire in [WirePolicy::RELIABLE, WirePolicy::LOSSY] {
            let t0 = Instant::now();
            let mut inflow = Inflow::new(100_000, 1 << 30, budgets.clone());
            // One taken message waits: for more, or for the linger.
            taken(&mut inflow, 1, false, t0, &wire);
            assert!(!inflow.acks_due());
            assert_eq!(inflow.ack_at(&wire), Some(t0 + wire.ack_linger));
            inflow.on_timeout(t0 + wire.ack_linger - Duration::from_micros(1), &wire);
            assert!(!inflow.acks_due(), "not before the linger");
            inflow.on_timeout(t0 + wire.ack_linger, &wire);
            assert!(inflow.acks_due());
            assert_eq!(taken_ranges(&mut inflow, &wire), vec![(1, 1)]);
            assert_eq!(inflow.ack_at(&wire), None, "nothing pending");
            // While traffic flows, the first one taken the delay after the batch began
            // sends the batch.
            let t1 = t0 + Duration::from_secs(1);
            taken(&mut inflow, 2, false, t1, &wire);
            taken(&mut inflow, 3, false, t1 + wire.ack_delay / 2, &wire);
            assert!(!inflow.acks_due());
            taken(&mut inflow, 4, false, t1 + wire.ack_delay, &wire);
            assert!(inflow.acks_due());
            assert_eq!(taken_ranges(&mut inflow, &wire), vec![(2, 4)]);
            // A full batch goes at once (the note that messages were received counts as one
            // pending acknowledgement, beside the numbers taken).
            let t2 = t1 + Duration::from_secs(1);
            let (first, batch) = (5, wire.ack_batch as u64 - 1);
            for seq in first..first + batch {
                assert!(!inflow.acks_due(), "{seq}");
                taken(&mut inflow, seq, false, t2, &wire);
            }
            assert!(inflow.acks_due());
            assert_eq!(
                taken_ranges(&mut inflow, &wire),
                vec![(first, first + batch - 1)]
            );
            // A message whose sender waits for its confirmation goes at once.
            let next = first + batch;
            taken(&mut inflow, next, true, t2 + Duration::from_secs(1), &wire);
            assert!(inflow.acks_due());
            assert_eq!(taken_ranges(&mut inflow, &wire), vec![(next, next)]);
        }
    }
}
