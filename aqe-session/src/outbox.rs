//! The sending side of a session: every reliable message accepted for delivery, numbered,
//! kept until the receiver settles it (taken or refused) or its deadline passes, within the
//! window the receiver announced (messages per receiving agent, bytes per session).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use aqe_core::plumbing::FastMap;
use aqe_core::{AgentId, ChannelName, DeliveryFailure, Encoded, Envelope, MessageId, Priority};

use crate::frame::{Lane, MessageHeader, Refusal, Transmit};
use crate::ranges;
use crate::seqmap::SeqMap;

/// What a reliable message is, besides its bytes: for reports and windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// Its id.
    pub id: MessageId,
    /// The sending agent.
    pub from: AgentId,
    /// The receiving agent.
    pub to: AgentId,
    /// Its channel.
    pub channel: ChannelName,
    /// Whether the channel is ordered.
    pub ordered: bool,
    /// Its priority: the wire writes higher ones first.
    pub priority: Priority,
    /// Payload bytes.
    pub len: usize,
    /// Whether its sender waits for its confirmation.
    pub confirm: bool,
    /// What was left of its time-to-live when it was accepted ([`outgoing`](crate::outgoing)
    /// counts it from the envelope's timestamp): what has not left by then is never sent,
    /// and fails `Expired`.
    pub ttl: Option<Duration>,
    /// Its encoding is one envelope's shared by copies to several agents (a broadcast's),
    /// addressed `to: Fleet`: it travels in a [`Frame::Fanout`](crate::Frame::Fanout), which
    /// names `to`.
    pub fanout: bool,
}

/// A reliable message not yet settled, with what the transport keeps with it (`M`).
#[derive(Debug)]
pub struct Orphan<M> {
    pub(crate) meta: MessageMeta,
    /// The envelope's postcard encoding.
    pub(crate) body: Encoded,
    /// When it was accepted: its deadline is this plus the delivery deadline.
    pub(crate) accepted: Instant,
    /// It was transmitted at least once (here or over an earlier session): it may have been
    /// taken.
    pub(crate) in_doubt: bool,
    /// `body` says `redelivered: true`.
    pub(crate) flagged: bool,
    /// Who the session it was accepted for reached: what may have been taken goes to the
    /// same principal only. Set when its session gives it up.
    pub(crate) origin: Option<(crate::EndpointId, crate::Trust)>,
    /// An endpoint refused it because its agent was not there (left, or stopped before
    /// taking it): it was not processed, and if it finds no other way by its deadline it
    /// fails as `ReceiverStopped`.
    pub(crate) displaced: bool,
    pub(crate) ctx: M,
}

impl<M> Orphan<M> {
    /// A message accepted now.
    pub(crate) fn new(meta: MessageMeta, body: Encoded, now: Instant, ctx: M) -> Self {
        Self {
            meta,
            body,
            accepted: now,
            in_doubt: false,
            flagged: false,
            origin: None,
            displaced: false,
            ctx,
        }
    }

    /// What it is.
    pub fn meta(&self) -> &MessageMeta {
        &self.meta
    }

    /// Whether it may have been taken already (it was transmitted before).
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// Whether it may go to the session of `endpoint` with `trust`: anything never
    /// transmitted may; what may have been taken goes only to the principal it was first
    /// sent to (the same endpoint again, or the same proven key).
    pub fn may_go_to(&self, endpoint: crate::EndpointId, trust: &crate::Trust) -> bool {
        !self.in_doubt
            || self
                .origin
                .is_some_and(|(e, o)| e == endpoint || o.same_principal(trust))
    }

    /// Its flow (sender, receiver, channel).
    pub(crate) fn flow(&self) -> Flow {
        flow_of(&self.meta)
    }

    /// When it was accepted.
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// When it fails if not settled before: its deadline, or earlier the end of its
    /// time-to-live while it has never left; once it may be held by the
    /// receiver, only the receiver applies the TTL (it may have been taken).
    pub(crate) fn due(&self, deadline: Duration) -> Instant {
        let by = self.accepted + deadline;
        match self.meta.ttl {
            Some(ttl) if !self.in_doubt => by.min(self.accepted + ttl),
            _ => by,
        }
    }

    /// The envelope, marked `redelivered` when it may have been taken already: what a
    /// fallback transport sends.
    ///
    /// # Errors
    /// When the stored encoding does not decode (it always does: it was encoded here).
    pub fn envelope(&self) -> aqe_core::Result<Envelope> {
        // The payload stays shared with the stored encoding, not copied.
        let mut e = self.body.decode()?;
        e.redelivered |= self.in_doubt;
        if self.meta.fanout {
            e.to = aqe_core::Recipient::Agent(self.meta.to.clone());
        }
        Ok(e)
    }

    /// Settles it as taken (delivered another way).
    pub fn taken(self) -> Settled<M> {
        Settled {
            meta: self.meta,
            outcome: Outcome::Taken,
            ctx: self.ctx,
            body: self.body,
        }
    }

    /// Settles it as failed for `reason`.
    pub fn failed(self, reason: DeliveryFailure) -> Settled<M> {
        Settled {
            meta: self.meta,
            outcome: Outcome::Failed(reason),
            ctx: self.ctx,
            body: self.body,
        }
    }

    /// Settles it as failed when it fell [`due`](Orphan::due) at `now`: `Expired` if its
    /// time-to-live ran out before it left, else as [`Orphan::expired`].
    pub(crate) fn timed_out(self, now: Instant) -> Settled<M> {
        if !self.in_doubt && self.meta.ttl.is_some_and(|ttl| self.accepted + ttl <= now) {
            self.failed(DeliveryFailure::Expired)
        } else {
            self.expired()
        }
    }

    /// Settles it as failed at its deadline (or when it can no longer arrive in order):
    /// `Unconfirmed` if it may have been taken, `ReceiverStopped` if its agent was found
    /// gone, `Unreachable` if it never left.
    pub fn expired(self) -> Settled<M> {
        let reason = if self.in_doubt {
            DeliveryFailure::Unconfirmed
        } else if self.displaced {
            DeliveryFailure::ReceiverStopped
        } else {
            DeliveryFailure::Unreachable
        };
        self.failed(reason)
    }

    /// Marks the envelope `redelivered` if it is in doubt, for sending it again as a new
    /// message.
    pub(crate) fn flag(&mut self) {
        if self.in_doubt
            && !self.flagged
            && let Ok(e) = self.envelope()
            && let Ok(body) = aqe_core::encode_envelope(&e)
        {
            // Its own encoding now, addressed to its agent.
            self.body = body;
            self.meta.fanout = false;
            self.flagged = true;
        }
    }
}

/// The transmission of `msg`, numbered `seq` after `after`: a [`Transmit::Message`], or a
/// fanout of one copy when its encoding is shared (the session joins adjacent copies).
fn transmit<M>(seq: u64, after: u64, low: u64, generation: u64, msg: &Orphan<M>) -> Transmit {
    let meta = &msg.meta;
    let lane = if meta.ordered {
        Lane::Ordered(meta.channel.clone())
    } else {
        Lane::Unordered
    };
    let header = MessageHeader {
        seq,
        after,
        low,
        generation,
        confirm: meta.confirm,
    };
    if meta.fanout {
        return Transmit::fanout(
            lane,
            header,
            meta.to.clone(),
            meta.priority,
            msg.body.clone(),
        );
    }
    Transmit::Message {
        lane,
        header,
        priority: meta.priority,
        body: msg.body.clone(),
    }
}

/// How a reliable message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its receiving agent took it.
    Taken,
    /// It will not be taken (or may have been, for `Unconfirmed`).
    Failed(DeliveryFailure),
}

/// A reliable message settled: what it was, how it ended, what the transport kept with it.
#[derive(Debug)]
pub struct Settled<M> {
    /// What it was.
    pub meta: MessageMeta,
    /// How it ended.
    pub outcome: Outcome,
    /// What the transport kept with it.
    pub ctx: M,
    /// Its encoding, handed back rather than dropped within the session's step: freeing a
    /// large payload takes milliseconds (unmapping 16 MiB), which the transport spends
    /// outside its hold on the session.
    pub body: Encoded,
}

/// How the sender takes a refusal: `None` when the message looks for its agent elsewhere
/// (the agent is not there: it left or stopped; nothing was processed), else the failure.
pub(crate) fn refusal_failure(r: Refusal) -> Option<DeliveryFailure> {
    match r {
        Refusal::NotHere | Refusal::Stopped => None,
        Refusal::NotRegistered | Refusal::Overflow => Some(DeliveryFailure::Refused),
        Refusal::Expired => Some(DeliveryFailure::Expired),
        Refusal::Dropped => Some(DeliveryFailure::Dropped),
    }
}

struct Sent<M> {
    msg: Orphan<M>,
    after: u64,
    sent_at: Instant,
    received: bool,
}

#[derive(Default, Clone, Copy)]
struct Flight {
    count: u32,
    bytes: u64,
}

/// An ordered flow: sender, receiver, channel.
pub type Flow = (AgentId, AgentId, ChannelName);

fn flow_of(m: &MessageMeta) -> Flow {
    (m.from.clone(), m.to.clone(), m.channel.clone())
}

/// The last number of each ordered flow, and when that message was accepted. The flow
/// numbered last is kept apart, so that a run of one flow's messages (a batch) is neither
/// hashed nor cloned per message.
#[derive(Default)]
struct Lasts {
    hot: Option<(Flow, u64, Instant)>,
    rest: FastMap<Flow, (u64, Instant)>,
}

impl Lasts {
    /// `seq`, accepted at `accepted`, is the last of `m`'s flow now; the one before it (0
    /// when none).
    fn replace(&mut self, m: &MessageMeta, seq: u64, accepted: Instant) -> u64 {
        if let Some((flow, last, at)) = &mut self.hot
            && of_flow(flow, m)
        {
            let before = *last;
            (*last, *at) = (seq, accepted);
            return before;
        }
        let flow = flow_of(m);
        let before = self.rest.remove(&flow).map_or(0, |(s, _)| s);
        if let Some((f, s, a)) = self.hot.replace((flow, seq, accepted)) {
            self.rest.insert(f, (s, a));
        }
        before
    }

    fn get(&self, flow: &Flow) -> Option<(u64, Instant)> {
        match &self.hot {
            Some((f, s, a)) if f == flow => Some((*s, *a)),
            _ => self.rest.get(flow).copied(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&Flow, (u64, Instant))> {
        self.hot
            .iter()
            .map(|(f, s, a)| (f, (*s, *a)))
            .chain(self.rest.iter().map(|(f, v)| (f, *v)))
    }

    fn clear(&mut self) {
        self.hot = None;
        self.rest.clear();
    }
}

/// Whether `m` is of `flow`.
fn of_flow(flow: &Flow, m: &MessageMeta) -> bool {
    flow.1 == m.to && flow.0 == m.from && flow.2 == m.channel
}

/// The sender's messages in one session.
pub(crate) struct Outbox<M> {
    next_seq: u64,
    sent: SeqMap<Sent<M>>,
    /// Unsettled messages per receiving agent.
    agents: FastMap<AgentId, Flight>,
    bytes: u64,
    /// The last number of each ordered flow, and when that message was accepted.
    last: Lasts,
    /// Messages waiting for room in their receiver's window, in order: redeliveries, which
    /// go before anything newer to the same agent.
    backlog: BTreeMap<AgentId, VecDeque<Orphan<M>>>,
    window: u32,
    session_bytes: u64,
    /// A message is numbered below the oldest unsettled one plus this
    /// ([`MAX_RANGE_SPAN`](crate::config::MAX_RANGE_SPAN)): the receiver refuses the session
    /// otherwise, since it remembers every number above that oldest one.
    span: u64,
    /// How long a transmission waits for its acknowledgement before it goes again, on a
    /// wire that may lose it.
    rto: Option<Duration>,
    /// No timer of this outbox is due before this (deadlines, retransmissions).
    next_check: Option<Instant>,
    /// Messages reported failed at their deadline that the receiver may still hold (it
    /// never said): by number, their receiver and size. They keep their room in the window
    /// until the receiver settles them, so that the window counts what the receiver holds:
    /// a receiver that takes nothing stops new sends (they wait, then fail as queue full)
    /// instead of being sent more than it accepts.
    ghosts: BTreeMap<u64, (AgentId, u64)>,
    /// Ordered messages refused because their agent was not there, by number, held while
    /// messages of their flow are unsettled here: they go on to find their agent only if
    /// none of those is taken (else they would arrive after it), and fail otherwise.
    held: BTreeMap<u64, Orphan<M>>,
    /// The highest number of each ordered flow taken here: a refusal of an older one that
    /// arrives after it (a wire that reorders or loses frames) fails it, since it could no
    /// longer arrive in order.
    taken: FastMap<Flow, u64>,
    /// For each agent whose departure the peer announced, the last number given before it
    /// heard: what was sent to it up to there went to an instance that is gone.
    departed: FastMap<AgentId, u64>,
    /// Room reused by [`Outbox::settled`].
    scratch: Vec<u64>,
}

impl<M> Outbox<M> {
    /// An outbox respecting the receiver's `window` and `session_bytes`, sending again after
    /// `rto` what is not acknowledged (a wire that may lose frames).
    pub(crate) fn new(window: u32, session_bytes: u64, rto: Option<Duration>) -> Self {
        Self {
            next_seq: 1,
            sent: SeqMap::default(),
            agents: FastMap::default(),
            bytes: 0,
            last: Lasts::default(),
            departed: FastMap::default(),
            backlog: BTreeMap::new(),
            window: window.max(1),
            session_bytes: session_bytes.max(1),
            span: crate::config::MAX_RANGE_SPAN,
            rto,
            next_check: None,
            ghosts: BTreeMap::new(),
            held: BTreeMap::new(),
            taken: FastMap::default(),
            scratch: Vec::new(),
        }
    }

    /// The oldest unsettled number (the next one when none).
    pub(crate) fn low(&self) -> u64 {
        self.sent.first_key().unwrap_or(self.next_seq)
    }

    fn has_room(&self, to: &AgentId, len: usize) -> bool {
        let f = self.agents.get(to).copied().unwrap_or_default();
        f.count < self.window
            && (self.bytes == 0 || self.bytes + len as u64 <= self.session_bytes)
            && self.next_seq - self.low() < self.span
    }

    /// Whether a new message to `to` would be admitted now.
    pub(crate) fn can_admit(&self, to: &AgentId, len: usize) -> bool {
        !self.backlog.contains_key(to) && self.has_room(to, len)
    }

    /// Numbers `msg` (room was checked with [`Outbox::can_admit`]) and keeps it; the
    /// transmission to make when `linked`.
    pub(crate) fn number(
        &mut self,
        mut msg: Orphan<M>,
        generation: u64,
        linked: bool,
        now: Instant,
        deadline: Duration,
    ) -> Option<Transmit> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let after = if msg.meta.ordered {
            self.last.replace(&msg.meta, seq, msg.accepted)
        } else {
            0
        };
        // Looked up by reference first: the name is cloned only for a new receiver.
        let f = match self.agents.get_mut(&msg.meta.to) {
            Some(f) => f,
            None => self.agents.entry(msg.meta.to.clone()).or_default(),
        };
        f.count += 1;
        f.bytes += msg.meta.len as u64;
        self.bytes += msg.meta.len as u64;
        self.check_by(msg.due(deadline));
        if linked && let Some(rto) = self.rto {
            self.check_by(now + rto);
        }
        let transmit = linked.then(|| {
            if !msg.in_doubt {
                // It may be taken here now, by this session's peer: that is its origin (set
                // when this session gives it up), whoever it went to before.
                msg.origin = None;
            }
            msg.in_doubt = true;
            self.transmit_of(seq, after, &msg, generation)
        });
        self.sent.insert(
            seq,
            Sent {
                msg,
                after,
                sent_at: now,
                received: false,
            },
        );
        transmit
    }

    fn transmit_of(&self, seq: u64, after: u64, msg: &Orphan<M>, generation: u64) -> Transmit {
        // Not kept yet: the oldest unsettled is it, or an older one.
        transmit(seq, after, self.low().min(seq), generation, msg)
    }

    fn check_by(&mut self, at: Instant) {
        self.next_check = Some(self.next_check.map_or(at, |c| c.min(at)));
    }

    /// Redeliveries from another session: they wait for room ahead of anything newer to
    /// their agents. A message of an ordered flow that a newer message of the flow went
    /// ahead of here cannot arrive in order any more: it fails instead (into `failed`).
    pub(crate) fn push_back(
        &mut self,
        msgs: Vec<Orphan<M>>,
        deadline: Duration,
        failed: &mut Vec<Settled<M>>,
    ) {
        for mut m in msgs {
            if m.meta.ordered
                && self
                    .last
                    .get(&flow_of(&m.meta))
                    .is_some_and(|(_, accepted)| accepted > m.accepted)
            {
                failed.push(m.expired());
                continue;
            }
            m.flag();
            self.check_by(m.due(deadline));
            self.backlog
                .entry(m.meta.to.clone())
                .or_default()
                .push_back(m);
        }
    }

    /// Moves what waits in the backlog into the window, as room allows.
    pub(crate) fn drain_backlog(
        &mut self,
        generation: u64,
        linked: bool,
        now: Instant,
        deadline: Duration,
        out: &mut VecDeque<Transmit>,
    ) {
        let agents: Vec<AgentId> = self.backlog.keys().cloned().collect();
        for to in agents {
            while let Some(len) = self
                .backlog
                .get(&to)
                .and_then(|q| q.front())
                .map(|m| m.meta.len)
            {
                if !self.has_room(&to, len) {
                    break;
                }
                let Some(msg) = self.backlog.get_mut(&to).and_then(VecDeque::pop_front) else {
                    break;
                };
                if self.backlog.get(&to).is_some_and(VecDeque::is_empty) {
                    self.backlog.remove(&to);
                }
                out.extend(self.number(msg, generation, linked, now, deadline));
            }
        }
    }

    fn settle(&mut self, seq: u64) -> Option<Orphan<M>> {
        let s = self.sent.remove(&seq)?;
        self.free(&s.msg.meta.to, s.msg.meta.len as u64);
        Some(s.msg)
    }

    fn free(&mut self, to: &AgentId, len: u64) {
        if let Some(f) = self.agents.get_mut(to) {
            f.count = f.count.saturating_sub(1);
            f.bytes = f.bytes.saturating_sub(len);
            if f.count == 0 {
                self.agents.remove(to);
            }
        }
        self.bytes = self.bytes.saturating_sub(len);
    }

    /// The receiver settled these: the room of those reported failed already is free now;
    /// whether any was.
    fn lay_ghosts(&mut self, first: u64, last: u64) -> bool {
        let seqs: Vec<u64> = self.ghosts.range(first..=last).map(|(k, _)| *k).collect();
        for seq in &seqs {
            if let Some((to, len)) = self.ghosts.remove(seq) {
                self.free(&to, len);
            }
        }
        !seqs.is_empty()
    }

    /// The receiver has these.
    pub(crate) fn received(&mut self, ranges: &[(u64, u64)]) {
        for &(first, last) in ranges {
            self.sent
                .for_each_mut(first..=last, |_, s| s.received = true);
        }
    }

    /// These were taken (or refused, with `Some(reason)`): settled into `out`, or, refused
    /// because their agent is not there, into `displaced` (not processed: they may go
    /// anywhere, in order). Whether room was freed.
    pub(crate) fn settled(
        &mut self,
        ranges: &[(u64, u64)],
        refused: Option<Refusal>,
        out: &mut Vec<Settled<M>>,
        displaced: &mut Vec<Orphan<M>>,
    ) -> bool {
        let mut freed = false;
        let mut flows: Vec<Flow> = Vec::new();
        // The flow taken last and its highest number, noted in `taken` when another flow
        // comes (a run of one flow's messages is hashed and cloned once, not per message).
        let mut run: Option<(Flow, u64)> = None;
        // The numbers of a range, in a buffer kept from one acknowledgement to the next.
        let mut seqs = std::mem::take(&mut self.scratch);
        for &(first, last) in ranges {
            freed |= self.lay_ghosts(first, last);
            seqs.clear();
            seqs.extend(self.sent.keys_in(first..=last));
            for &seq in &seqs {
                let Some(mut m) = self.settle(seq) else {
                    continue;
                };
                freed = true;
                // Only refusals look at the flow below; a taken message's is in the run.
                let flow = (refused.is_some() && m.meta.ordered).then(|| flow_of(&m.meta));
                match refused.map(refusal_failure) {
                    // Sent again after an earlier session ended with it in doubt: this
                    // refusal does not say what the earlier copy became.
                    Some(_) if m.flagged => out.push(m.failed(DeliveryFailure::Unconfirmed)),
                    None => {
                        if m.meta.ordered {
                            if !self.held.is_empty() {
                                let flow = flow_of(&m.meta);
                                // What was refused before it cannot follow it any more.
                                self.fail_held(&flow, seq, out);
                                // What it held back (refused after it) may go on now.
                                if !flows.contains(&flow)
                                    && self.held.values().any(|h| flow_of(&h.meta) == flow)
                                {
                                    flows.push(flow);
                                }
                            }
                            match &mut run {
                                Some((f, top)) if of_flow(f, &m.meta) => *top = (*top).max(seq),
                                _ => {
                                    if let Some((f, top)) = run.replace((flow_of(&m.meta), seq)) {
                                        self.note_taken(f, top);
                                    }
                                }
                            }
                        }
                        out.push(m.taken());
                    }
                    Some(Some(reason)) => out.push(m.failed(reason)),
                    // A newer one of its flow was taken here first.
                    Some(None)
                        if flow
                            .as_ref()
                            .and_then(|f| self.taken.get(f))
                            .is_some_and(|t| *t > seq) =>
                    {
                        out.push(m.failed(DeliveryFailure::ReceiverStopped));
                    }
                    Some(None) => {
                        m.in_doubt = false;
                        m.displaced = true;
                        match flow {
                            Some(flow) => {
                                self.held.insert(seq, m);
                                if !flows.contains(&flow) {
                                    flows.push(flow);
                                }
                            }
                            None => displaced.push(m),
                        }
                    }
                }
            }
        }
        seqs.clear();
        self.scratch = seqs;
        if let Some((f, top)) = run {
            self.note_taken(f, top);
        }
        // A flow with nothing unsettled here any more: what it held goes on, in order.
        for flow in flows {
            if self.sent.values().any(|s| flow_of(&s.msg.meta) == flow) {
                continue;
            }
            let seqs: Vec<u64> = self
                .held
                .iter()
                .filter(|(_, m)| flow_of(&m.meta) == flow)
                .map(|(k, _)| *k)
                .collect();
            displaced.extend(seqs.iter().filter_map(|k| self.held.remove(k)));
        }
        freed
    }

    /// Fails the messages of `flow` held from before `seq`, which was taken.
    /// `seq` of `flow` was taken: nothing older of the flow can arrive in order any more.
    fn note_taken(&mut self, flow: Flow, seq: u64) {
        let t = self.taken.entry(flow).or_insert(seq);
        *t = (*t).max(seq);
    }

    fn fail_held(&mut self, flow: &Flow, seq: u64, out: &mut Vec<Settled<M>>) {
        let seqs: Vec<u64> = self
            .held
            .range(..seq)
            .filter(|(_, m)| &flow_of(&m.meta) == flow)
            .map(|(k, _)| *k)
            .collect();
        for k in seqs {
            if let Some(m) = self.held.remove(&k) {
                out.push(m.failed(DeliveryFailure::ReceiverStopped));
            }
        }
    }

    /// Fails what passed its deadline; returns the retransmissions due (a wire that may lose
    /// frames, while linked: `generation` is the membership's) and when to look again.
    pub(crate) fn on_timeout(
        &mut self,
        now: Instant,
        deadline: Duration,
        linked: Option<u64>,
        failed: &mut Vec<Settled<M>>,
        out: &mut VecDeque<Transmit>,
    ) {
        let expired: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, s)| s.msg.due(deadline) <= now)
            .map(|(k, _)| k)
            .collect();
        for seq in expired {
            if let Some(s) = self.sent.remove(&seq) {
                if s.msg.in_doubt {
                    // The receiver may hold it: its room stays taken until it says.
                    self.ghosts
                        .insert(seq, (s.msg.meta.to.clone(), s.msg.meta.len as u64));
                } else {
                    self.free(&s.msg.meta.to, s.msg.meta.len as u64);
                }
                failed.push(s.msg.timed_out(now));
            }
        }
        let expired: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, m)| m.due(deadline) <= now)
            .map(|(k, _)| *k)
            .collect();
        failed.extend(
            expired
                .iter()
                .filter_map(|k| self.held.remove(k))
                .map(|m| m.timed_out(now)),
        );
        // Redeliveries keep their order, but came from sessions of different ages: each is
        // looked at.
        self.backlog.retain(|_, q| {
            let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(q)
                .into_iter()
                .partition(|m| m.due(deadline) <= now);
            failed.extend(gone.into_iter().map(|m| m.timed_out(now)));
            *q = kept;
            !q.is_empty()
        });
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let (Some(rto), Some(generation)) = (self.rto, linked) {
            let low = self.low();
            self.sent.for_each_mut(.., |seq, s| {
                let wait = if s.received { rto * 4 } else { rto };
                if s.sent_at + wait <= now {
                    s.sent_at = now;
                    s.msg.in_doubt = true;
                    out.push_back(transmit(seq, s.after, low, generation, &s.msg));
                }
                at(s.sent_at + wait);
            });
        }
        for s in self.sent.values() {
            at(s.msg.due(deadline));
        }
        for m in self.backlog.values().flatten().chain(self.held.values()) {
            at(m.due(deadline));
        }
        self.next_check = next;
    }

    /// When [`Outbox::on_timeout`] has something to do, at the earliest.
    pub(crate) fn next_check(&self) -> Option<Instant> {
        self.next_check
    }

    /// For each ordered flow, when its newest message numbered here was accepted: an older
    /// message of the flow sent to the same receiver later would arrive out of order.
    pub(crate) fn marks(&self) -> Vec<(Flow, Instant)> {
        self.last
            .iter()
            .map(|(flow, (_, accepted))| (flow.clone(), accepted))
            .collect()
    }

    /// The peer said `agent` left: what was sent to it so far went to that instance. Kept
    /// only for agents with messages unsettled here (a peer's churn grows nothing else).
    pub(crate) fn departed(&mut self, agent: &AgentId) {
        let sent = &self.sent;
        let unsettled = |a: &AgentId| sent.values().any(|s| &s.msg.meta.to == a);
        self.departed.retain(|a, _| unsettled(a));
        if unsettled(agent) {
            self.departed.insert(agent.clone(), self.next_seq - 1);
        }
    }

    /// Everything unsettled, taken out in the order it was accepted (the link ended).
    ///
    /// An ordered message older than one of its flow taken here goes into `late` instead:
    /// the receiver handled it before the newer one (taken, or refused with the answer
    /// lost), so sent again it could only arrive after it, perhaps to a new instance of its
    /// agent that remembers nothing of the first copy. It fails as in doubt.
    pub(crate) fn take_all(&mut self, late: &mut Vec<Settled<M>>) -> Vec<Orphan<M>> {
        let mut all: BTreeMap<u64, Orphan<M>> = std::mem::take(&mut self.held);
        for (seq, s) in self.sent.take_all() {
            let flow = flow_of(&s.msg.meta);
            // Sent to an instance of its agent that left, and a newer one of its flow went
            // to the agent since (a new instance): a copy would arrive after that one.
            let departed = self.departed.get(&s.msg.meta.to).copied();
            let left_behind = departed.is_some_and(|d| d >= seq)
                && self
                    .last
                    .get(&flow)
                    .is_some_and(|(l, _)| Some(l) > departed);
            let overtaken = s.msg.meta.ordered
                && (left_behind || self.taken.get(&flow).is_some_and(|t| *t > seq));
            if overtaken {
                late.push(s.msg.expired());
            } else {
                all.insert(seq, s.msg);
            }
        }
        let mut out: Vec<Orphan<M>> = all.into_values().collect();
        for (_, q) in std::mem::take(&mut self.backlog) {
            out.extend(q);
        }
        self.agents.clear();
        self.bytes = 0;
        self.last.clear();
        self.ghosts.clear();
        self.next_check = None;
        out
    }

    /// Whether a message of the flow `from`, `to`, `channel` is unsettled here.
    /// `received`: the receiver acknowledges what it received, and a message it received
    /// no longer counts (it is in the agent's inbox, in order).
    pub(crate) fn has_flow(
        &self,
        from: &AgentId,
        to: &AgentId,
        channel: &ChannelName,
        received: bool,
    ) -> bool {
        let is = |m: &MessageMeta| &m.from == from && &m.to == to && &m.channel == channel;
        self.sent
            .values()
            .any(|s| is(&s.msg.meta) && !(received && s.received))
            || self
                .backlog
                .get(to)
                .is_some_and(|q| q.iter().any(|m| is(&m.meta)))
            || self.held.values().any(|m| is(&m.meta))
    }

    /// What is kept with every unsettled message (for diagnostics).
    pub(crate) fn contexts(&self) -> impl Iterator<Item = &M> {
        self.sent
            .values()
            .map(|s| &s.msg.ctx)
            .chain(self.backlog.values().flatten().map(|m| &m.ctx))
            .chain(self.held.values().map(|m| &m.ctx))
    }

    /// Unsettled messages.
    pub(crate) fn len(&self) -> usize {
        self.sent.len() + self.backlog.values().map(VecDeque::len).sum::<usize>() + self.held.len()
    }
}

/// Checks that ranges are well formed: ascending, each `first <= last`, none wider than
/// [`MAX_RANGE_SPAN`](crate::config::MAX_RANGE_SPAN).
pub(crate) fn valid_ranges(r: &[(u64, u64)]) -> bool {
    ranges::valid(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aqe_core::{MessageKind, Recipient};
    use bytes::Bytes;

    fn msg(to: &str, len: usize, now: Instant) -> Orphan<u32> {
        let e = Envelope::new(
            "a".into(),
            Recipient::Agent(to.into()),
            "c".into(),
            MessageKind::Direct,
            Bytes::from(vec![0u8; len]),
        );
        let meta = MessageMeta {
            id: e.id,
            from: "a".into(),
            to: to.into(),
            channel: "c".into(),
            ordered: true,
            priority: Priority::DEFAULT,
            len,
            confirm: false,
            ttl: None,
            fanout: false,
        };
        Orphan::new(meta, aqe_core::encode_envelope(&e).expect("encode"), now, 0)
    }

    #[test]
    fn nothing_is_numbered_a_span_above_the_oldest_unsettled_message() {
        let now = Instant::now();
        let mut o = Outbox::new(1024, 1 << 20, None);
        o.span = 4;
        for seq in 1..=4 {
            let to = if seq == 1 { "b" } else { "c" };
            assert!(
                o.push(msg(to, 1, now), 1, true, now, D).is_ok(),
                "{seq} fits"
            );
        }
        assert!(
            o.push(msg("c", 1, now), 1, true, now, D).is_err(),
            "5 is a span above 1"
        );
        // Settling newer ones frees no room: the oldest holds the span.
        let (mut done, mut displaced) = (Vec::new(), Vec::new());
        assert!(o.settled(&[(2, 4)], None, &mut done, &mut displaced));
        assert!(!o.can_admit(&"c".into(), 1));
        assert!(o.settled(&[(1, 1)], None, &mut done, &mut displaced));
        assert_eq!(done.len(), 4);
        let t = o
            .push(msg("c", 1, now), 1, true, now, D)
            .expect("room again");
        match t {
            Some(Transmit::Message { header, .. }) => {
                assert_eq!((header.seq, header.low), (5, 5));
            }
            other => panic!("a message transmission, not {other:?}"),
        }
    }

    #[test]
    fn the_last_number_of_each_flow_is_kept_whichever_flow_came_last() {
        let now = Instant::now();
        let (b, c) = (msg("b", 1, now), msg("c", 1, now));
        let mut lasts = Lasts::default();
        assert_eq!(lasts.replace(&b.meta, 1, now), 0);
        assert_eq!(lasts.replace(&b.meta, 2, now), 1);
        assert_eq!(lasts.replace(&c.meta, 3, now), 0);
        assert_eq!(
            lasts.replace(&b.meta, 4, now),
            2,
            "b's, kept while c's was hot"
        );
        assert_eq!(lasts.replace(&c.meta, 5, now), 3);
        assert_eq!(lasts.get(&flow_of(&b.meta)).map(|(s, _)| s), Some(4));
        assert_eq!(lasts.get(&flow_of(&c.meta)).map(|(s, _)| s), Some(5));
        let mut all: Vec<(Flow, u64)> = lasts.iter().map(|(f, (s, _))| (f.clone(), s)).collect();
        all.sort_by_key(|(_, s)| *s);
        assert_eq!(all, vec![(flow_of(&b.meta), 4), (flow_of(&c.meta), 5)]);
        lasts.clear();
        assert_eq!(lasts.iter().count(), 0);
        assert_eq!(lasts.replace(&b.meta, 6, now), 0);
    }

    const D: Duration = Duration::from_secs(10);

    impl Outbox<u32> {
        fn push(
            &mut self,
            m: Orphan<u32>,
            generation: u64,
            linked: bool,
            now: Instant,
            deadline: Duration,
        ) -> Result<Option<Transmit>, ()> {
            if self.can_admit(&m.meta.to, m.meta.len) {
                Ok(self.number(m, generation, linked, now, deadline))
            } else {
                Err(())
            }
        }
    }

    #[test]
    fn windows_count_messages_per_agent_and_bytes_per_session() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(2, 100, None);
        assert!(o.push(msg("b", 10, now), 0, true, now, D).is_ok());
        assert!(o.push(msg("b", 10, now), 0, true, now, D).is_ok());
        assert!(
            o.push(msg("b", 10, now), 0, true, now, D).is_err(),
            "b's window"
        );
        assert!(o.push(msg("c", 80, now), 0, true, now, D).is_ok());
        assert!(
            o.push(msg("d", 1, now), 0, true, now, D).is_err(),
            "session bytes"
        );
        let mut settled = Vec::new();
        o.settled(&[(1, 1)], None, &mut settled, &mut Vec::new());
        assert_eq!(settled.len(), 1);
        assert!(o.push(msg("b", 10, now), 0, true, now, D).is_ok());
        // A message larger than the session's bytes goes when nothing else is unsettled.
        let mut all = Vec::new();
        o.settled(&[(1, 100)], None, &mut all, &mut Vec::new());
        assert!(o.push(msg("e", 1000, now), 0, true, now, D).is_ok());
        assert_eq!(o.low(), 5, "the oldest unsettled");
    }

    #[test]
    fn a_refusal_arriving_after_a_newer_one_of_its_flow_was_taken_fails_it() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(8, 1000, None);
        for _ in 0..3 {
            assert!(o.push(msg("b", 1, now), 0, true, now, D).is_ok());
        }
        let (mut settled, mut displaced) = (Vec::new(), Vec::new());
        // 3 is taken; the refusals of 1 and 2 (their agent had stopped) come after it.
        o.settled(&[(3, 3)], None, &mut settled, &mut displaced);
        o.settled(
            &[(1, 2)],
            Some(Refusal::Stopped),
            &mut settled,
            &mut displaced,
        );
        let outcomes: Vec<Outcome> = settled.iter().map(|s| s.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Taken,
                Outcome::Failed(DeliveryFailure::ReceiverStopped),
                Outcome::Failed(DeliveryFailure::ReceiverStopped)
            ],
            "they could only arrive after 3 now"
        );
        assert!(displaced.is_empty() && o.held.is_empty());
    }

    #[test]
    fn departures_are_remembered_only_for_agents_with_unsettled_messages() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(8, 1000, None);
        assert!(o.push(msg("b", 1, now), 0, true, now, D).is_ok());
        for i in 0..1000 {
            o.departed(&format!("churn-{i}").as_str().into());
        }
        o.departed(&"b".into());
        assert_eq!(o.departed.len(), 1, "only b has messages here");
        o.settled(&[(1, 1)], None, &mut Vec::new(), &mut Vec::new());
        o.departed(&"c".into());
        assert!(
            o.departed.is_empty(),
            "b's messages settled: nothing to remember"
        );
    }

    #[test]
    fn in_doubt_messages_older_than_a_taken_one_of_their_flow_fail_when_the_link_ends() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(8, 1000, None);
        for _ in 0..4 {
            assert!(o.push(msg("b", 1, now), 0, true, now, D).is_ok());
        }
        let mut unordered = msg("b", 1, now);
        unordered.meta.ordered = false;
        assert!(o.push(unordered, 0, true, now, D).is_ok());
        let (mut settled, mut displaced) = (Vec::new(), Vec::new());
        // 3 is taken; the answers for 1 and 2 were lost; 4 and 5 are still unanswered.
        o.settled(&[(3, 3)], None, &mut settled, &mut displaced);
        let mut late = Vec::new();
        let orphans = o.take_all(&mut late);
        let outcomes: Vec<Outcome> = late.iter().map(|s| s.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Failed(DeliveryFailure::Unconfirmed),
                Outcome::Failed(DeliveryFailure::Unconfirmed)
            ],
            "1 and 2 were handled before 3: sent again they would come after it"
        );
        assert_eq!(orphans.len(), 2, "4 (after 3) and the unordered 5 go on");
    }

    #[test]
    fn a_ttl_counts_from_the_envelopes_timestamp() {
        let mut e = Envelope::new(
            "a".into(),
            Recipient::Agent("b".into()),
            "c".into(),
            MessageKind::Direct,
            Bytes::new(),
        )
        .with_ttl(Duration::from_millis(1000));
        e.timestamp = aqe_core::Timestamp(10_000);
        let at = |now| {
            crate::session::outgoing(&e, true, false, || aqe_core::Timestamp(now))
                .expect("outgoing")
                .0
                .ttl
        };
        assert_eq!(at(10_400), Some(Duration::from_millis(600)), "400 ms old");
        assert_eq!(at(12_000), Some(Duration::ZERO), "outlived");
        assert_eq!(
            at(9_000),
            Some(Duration::from_millis(1000)),
            "a clock behind"
        );
    }

    #[test]
    fn a_ttl_fails_what_never_left_and_leaves_what_went_to_the_receiver() {
        let now = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut o: Outbox<u32> = Outbox::new(8, 1000, None);
        let with_ttl = |o: &mut Outbox<u32>, linked| {
            let mut m = msg("b", 1, now);
            m.meta.ttl = Some(ttl);
            assert!(o.push(m, 0, linked, now, D).is_ok());
        };
        with_ttl(&mut o, false); // 1: never transmitted
        with_ttl(&mut o, true); // 2: transmitted: the receiver decides
        assert_eq!(o.next_check(), Some(now + ttl));
        let (mut failed, mut out) = (Vec::new(), VecDeque::new());
        o.on_timeout(now + ttl, D, None, &mut failed, &mut out);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].outcome, Outcome::Failed(DeliveryFailure::Expired));
        assert_eq!(
            o.next_check(),
            Some(now + D),
            "the other waits for its deadline"
        );
        o.on_timeout(now + D, D, None, &mut failed, &mut out);
        assert_eq!(
            failed[1].outcome,
            Outcome::Failed(DeliveryFailure::Unconfirmed)
        );
    }

    #[test]
    fn ordered_flows_name_their_predecessor_and_deadlines_fail_by_doubt() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(8, 1 << 20, None);
        let afters: Vec<u64> = (0..3)
            .map(|_| match o.push(msg("b", 1, now), 0, true, now, D) {
                Ok(Some(Transmit::Message { header, .. })) => header.after,
                _ => panic!("admitted"),
            })
            .collect();
        assert_eq!(afters, [0, 1, 2]);
        // Not linked: kept, not transmitted, and not in doubt.
        assert!(matches!(
            o.push(msg("c", 1, now), 0, false, now, D),
            Ok(None)
        ));
        let mut failed = Vec::new();
        let mut out = VecDeque::new();
        o.on_timeout(now + D, D, None, &mut failed, &mut out);
        let reasons: Vec<Outcome> = failed.iter().map(|s| s.outcome).collect();
        assert_eq!(
            reasons,
            [
                Outcome::Failed(DeliveryFailure::Unconfirmed),
                Outcome::Failed(DeliveryFailure::Unconfirmed),
                Outcome::Failed(DeliveryFailure::Unconfirmed),
                Outcome::Failed(DeliveryFailure::Unreachable),
            ]
        );
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_settled_message_hands_its_encoding_back_rather_than_freeing_it() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(8, 1 << 20, None);
        let m = msg("b", 5000, now);
        let payload = m.body.tail().as_ptr();
        assert!(o.push(m, 0, true, now, D).is_ok());
        let mut settled = Vec::new();
        o.settled(&[(1, 1)], None, &mut settled, &mut Vec::new());
        let [s] = settled.as_slice() else {
            panic!("one settled: {settled:?}");
        };
        assert_eq!(s.outcome, Outcome::Taken);
        assert_eq!(
            s.body.tail().as_ptr(),
            payload,
            "the transport frees it, not the step"
        );
    }

    #[test]
    fn redeliveries_wait_for_room_ahead_of_newer_sends() {
        let now = Instant::now();
        let mut o: Outbox<u32> = Outbox::new(1, 1 << 20, None);
        assert!(o.push(msg("b", 1, now), 0, true, now, D).is_ok());
        // Large enough to travel apart from its envelope's fields (aqe_core::Encoded).
        let mut old = msg("b", 5000, now);
        old.in_doubt = true;
        let payload = old.body.tail().as_ptr();
        o.push_back(vec![old], D, &mut Vec::new());
        assert!(!o.can_admit(&"b".into(), 1), "redeliveries first");
        let mut out = VecDeque::new();
        o.drain_backlog(0, true, now, D, &mut out);
        assert!(out.is_empty(), "no room yet");
        o.settled(&[(1, 1)], None, &mut Vec::new(), &mut Vec::new());
        o.drain_backlog(0, true, now, D, &mut out);
        assert_eq!(out.len(), 1);
        let Some(Transmit::Message { body, .. }) = out.pop_front() else {
            panic!("a message");
        };
        let e = body.decode().expect("decode");
        assert!(e.redelivered, "in doubt: flagged");
        assert_eq!(e.payload.len(), 5000);
        assert_eq!(
            e.payload.as_ptr(),
            payload,
            "flagged without copying the payload"
        );
    }

    #[test]
    fn a_lossy_wire_sends_again_what_was_not_received() {
        let now = Instant::now();
        let rto = Duration::from_millis(500);
        let mut o: Outbox<u32> = Outbox::new(8, 1 << 20, Some(rto));
        for _ in 0..3 {
            let _ = o.push(msg("b", 1, now), 0, true, now, D);
        }
        assert_eq!(
            o.next_check(),
            Some(now + rto),
            "the first retransmission is timed"
        );
        o.received(&[(1, 2)]);
        let mut out = VecDeque::new();
        o.on_timeout(now + rto, D, Some(0), &mut Vec::new(), &mut out);
        let seqs: Vec<u64> = out
            .iter()
            .map(|t| match t {
                Transmit::Message { header, .. } => header.seq,
                Transmit::Fanout { .. } | Transmit::Frame(..) => 0,
            })
            .collect();
        assert_eq!(seqs, [3], "only what was not received");
        out.clear();
        o.on_timeout(now + rto * 4, D, Some(0), &mut Vec::new(), &mut out);
        assert_eq!(
            out.len(),
            3,
            "received but not taken for four times as long"
        );
    }
}
