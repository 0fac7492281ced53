//! A session: everything between this endpoint and one incarnation of another, over
//! whatever link carries it (a QUIC connection, NATS subjects), sans-IO.
//!
//! Inputs are method calls (a frame arrived, a message to send, a receipt settled, the link
//! came up or went down, time passed); outputs are pulled: frames to send from
//! [`Session::poll_transmit`], what happened from [`Session::poll_event`], the next timer
//! from [`Session::poll_timeout`]. Time is passed in; nothing here reads a clock, opens a
//! socket or waits.

use std::collections::{BTreeMap, VecDeque};
use std::iter::Peekable;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_core::plumbing::FastSet;
use aqe_core::{AgentId, ChannelName, Encoded, Envelope, MessageId};

use crate::config::{Config, PROBE_MIN};
use crate::frame::{Frame, Hello, Lane, Refusal, Transmit};
use crate::inflow::{Budgets, Fate, Inflow, Ready};
use crate::node::NodeInput;
use crate::outbox::{MessageMeta, Orphan, Outbox, Settled, valid_ranges};
use crate::peer::{PeerMembership, Step};
use crate::{EndpointId, KEPT_ROOM, SessionId, Trust};

/// How a session is known to both sides: who initiated its handshake, and the nonce the
/// initiator chose. Of two sessions between one pair of endpoints, the smaller rank is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rank {
    /// The endpoint that started the handshake.
    pub initiator: EndpointId,
    /// Its nonce.
    pub nonce: u64,
}

/// What a transport keeps with what it hands to a session: with each reliable message (its
/// sender's counters, a waiter for its confirmation) and each request awaiting an answer.
pub trait Ctx: 'static {
    /// Kept with each reliable message until it is settled.
    type Msg: Send + 'static;
    /// Kept with each request until it is answered.
    type Req: Send + 'static;
}

/// What this endpoint hosts, as the session needs to know it when something arrives.
pub trait Locals {
    /// Whether agent `to` is hosted here and listens on `channel`.
    fn admits(&self, to: &AgentId, channel: &ChannelName) -> bool;
}

/// Why a session (or its link) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The peer said goodbye (it shut down).
    Goodbye,
    /// Nothing was heard from the peer for the liveness timeout.
    Unresponsive,
    /// A newer incarnation of the peer's key appeared and this one did not answer a probe.
    Replaced,
    /// The peer broke the protocol.
    Violation(&'static str),
    /// This endpoint shuts down.
    Shutdown,
    /// The link carrying it went away.
    LinkLost,
    /// A newer session with the same peer replaced it.
    Superseded,
    /// The peer no longer knows it (it ended its side).
    Reset,
}

/// The answer to a request, as the requester gets it.
#[derive(Debug)]
pub enum Answer {
    /// The response envelope.
    Response(Envelope),
    /// It was not run, or not answered.
    Refused(Refusal),
    /// The link went away before an answer.
    Lost,
}

/// What happened in a session, for the transport to act on.
#[derive(Debug)]
pub enum SessionEvent<C: Ctx> {
    /// Put `envelope` in agent `to`'s inbox: a reliable message with a receipt that reports
    /// to [`Session::taken`] / [`Session::abandoned`] under `seq`, or (`seq` none) an
    /// unreliable one (dropped when the inbox is full).
    Deliver {
        /// The receiving agent.
        to: AgentId,
        /// The message's number, for its receipt.
        seq: Option<u64>,
        /// The message.
        envelope: Envelope,
    },
    /// Put this request in agent `to`'s inbox, answered through [`Session::answer`].
    Request {
        /// The receiving agent.
        to: AgentId,
        /// The request.
        envelope: Envelope,
    },
    /// The requester gave up on this request (or its link went away): cancel the work.
    Cancelled {
        /// The request's id.
        id: MessageId,
    },
    /// A reliable message this side sent is settled.
    Settled(Settled<C::Msg>),
    /// A request this side sent is answered.
    Answered {
        /// The request's id.
        id: MessageId,
        /// What the transport kept with it.
        req: C::Req,
        /// The answer.
        answer: Answer,
    },
    /// Room was freed in the windows: senders waiting may try again.
    Room,
    /// For the node.
    Node(NodeInput<C::Msg>),
    /// Close the link: the session is over for this reason.
    Close(Ended),
}

/// What the node asks of a session.
#[derive(Debug)]
pub enum SessionInput<M> {
    /// Send this frame (membership, peer exchange) on the control lane.
    Send(Frame),
    /// Deliver these messages, accepted for another session (redeliveries), before anything
    /// newer to their agents.
    Redeliver(Vec<Orphan<M>>),
    /// A newer incarnation of the peer's key appeared: make sure this one still answers.
    Probe,
    /// End the session.
    End(Ended),
}

/// Why [`Session::send`] did not take a message; it is handed back.
#[derive(Debug)]
pub enum NotSent<M> {
    /// The receiver's window is full (or redeliveries to it wait): wait for
    /// [`SessionEvent::Room`].
    Full(M),
    /// The session has no link now (or ended): route again.
    Unlinked(M),
}

/// One session (see the module docs).
pub struct Session<C: Ctx> {
    id: SessionId,
    rank: Rank,
    peer: EndpointId,
    trust: Trust,
    listen: Option<std::net::SocketAddr>,
    config: Arc<Config>,
    /// How often this side must be heard from: its own heartbeat, or a third of the peer's
    /// liveness timeout if that is shorter.
    heartbeat: Duration,
    ended: Option<Ended>,
    /// This endpoint's membership generation, as the frames it sent here say.
    generation: u64,
    outbox: Outbox<C::Msg>,
    inflow: Inflow,
    members: PeerMembership,
    /// Frames whose sender is not (yet) in the peer's membership, in arrival order.
    parked: VecDeque<(Frame, Instant)>,
    parked_bytes: u64,
    /// Messages a received frame made ready, between the frame and their hand-over (kept
    /// for its capacity).
    ready: Vec<Ready>,
    /// Messages an acknowledgement settled, between the outbox and their events (kept for
    /// its capacity).
    done: Vec<Settled<C::Msg>>,
    asked: BTreeMap<MessageId, C::Req>,
    /// Requests of the peer in hand here, with their payload bytes.
    serving: BTreeMap<MessageId, u64>,
    serving_bytes: u64,
    /// Requests taken lately (a copy of one is ignored), oldest first.
    seen: VecDeque<MessageId>,
    seen_set: FastSet<MessageId>,
    last_heard: Instant,
    next_ping: Instant,
    nonce: u64,
    pings: VecDeque<(u64, Instant)>,
    srtt: Option<Duration>,
    probe: Option<(u64, Instant)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SessionEvent<C>>,
}

impl<C: Ctx> std::fmt::Debug for Session<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// The parts of a reliable message a session needs: what it is, and its envelope encoded
/// once (outside any lock, by whoever sends it). `now` reads the wall clock (only for a
/// message with a time-to-live): a TTL counts from the envelope's `timestamp`, so what is
/// left of it is what the session keeps (a message handed from one transport to another
/// does not start its TTL again).
///
/// # Errors
/// When the envelope has no single recipient, or does not encode.
pub fn outgoing(
    envelope: &Envelope,
    ordered: bool,
    confirm: bool,
    now: impl FnOnce() -> aqe_core::Timestamp,
) -> aqe_core::Result<(MessageMeta, Encoded)> {
    let meta = message_meta(envelope, ordered, confirm, now)?;
    Ok((meta, aqe_core::encode_envelope(envelope)?))
}

/// What a session keeps of a reliable message beside its encoding (see [`outgoing`]); for
/// a batch whose envelopes are encoded together ([`aqe_core::encode_envelopes`]).
///
/// # Errors
/// When the envelope has no single recipient.
pub fn message_meta(
    envelope: &Envelope,
    ordered: bool,
    confirm: bool,
    now: impl FnOnce() -> aqe_core::Timestamp,
) -> aqe_core::Result<MessageMeta> {
    let to = envelope
        .target()
        .cloned()
        .ok_or(aqe_core::Error::Protocol {
            detail: "a unicast operation needs exactly one recipient",
        })?;
    Ok(meta_of(envelope, to, ordered, confirm, false, now))
}

/// What a session keeps of the copy for `to` of a broadcast whose envelope (`to: Fleet`)
/// is encoded once for all its copies: they travel as fanouts (PROTOCOL.md 4.4). Their
/// sender does not wait for confirmation.
pub fn fanout_meta(
    envelope: &Envelope,
    to: AgentId,
    ordered: bool,
    now: impl FnOnce() -> aqe_core::Timestamp,
) -> MessageMeta {
    meta_of(envelope, to, ordered, false, true, now)
}

fn meta_of(
    envelope: &Envelope,
    to: AgentId,
    ordered: bool,
    confirm: bool,
    fanout: bool,
    now: impl FnOnce() -> aqe_core::Timestamp,
) -> MessageMeta {
    MessageMeta {
        id: envelope.id,
        from: envelope.from.clone(),
        to,
        channel: envelope.channel.clone(),
        ordered,
        priority: envelope.priority,
        len: envelope.payload.len(),
        confirm,
        ttl: envelope.ttl.map(|ttl| {
            ttl.saturating_sub(std::time::Duration::from_millis(
                now().0.saturating_sub(envelope.timestamp.0),
            ))
        }),
        fanout,
    }
}

impl<C: Ctx> Session<C> {
    /// A session with the peer whose hello is `hello` (its `listen` with the IP its link
    /// comes from), trusted as `trust`, its link up now (the node hears of it from the first
    /// event). `budgets` bound what all sessions of this endpoint hold together.
    pub fn new(
        id: SessionId,
        rank: Rank,
        hello: &Hello,
        trust: Trust,
        config: Arc<Config>,
        budgets: Arc<Budgets>,
        now: Instant,
    ) -> Self {
        let peer_liveness = Duration::from_millis(u64::from(hello.liveness_ms.max(3)));
        let heartbeat = config.heartbeat.min(peer_liveness / 3);
        Self {
            id,
            rank,
            peer: hello.endpoint,
            trust,
            listen: hello.listen,
            heartbeat,
            ended: None,
            generation: 0,
            outbox: Outbox::new(
                hello.window.min(config.window),
                hello.session_bytes,
                config.wire.retransmit_after,
            ),
            inflow: Inflow::new(config.window, config.session_bytes, budgets.clone()),
            members: PeerMembership::new(
                config.agents_per_peer as usize,
                usize::try_from(config.registration_bytes).unwrap_or(usize::MAX),
                config.heartbeat * 2,
                budgets,
            ),
            parked: VecDeque::new(),
            ready: Vec::new(),
            done: Vec::new(),
            parked_bytes: 0,
            asked: BTreeMap::new(),
            serving: BTreeMap::new(),
            serving_bytes: 0,
            seen: VecDeque::new(),
            seen_set: FastSet::default(),
            last_heard: now,
            next_ping: now,
            nonce: 0,
            pings: VecDeque::new(),
            srtt: None,
            probe: None,
            transmits: VecDeque::new(),
            events: VecDeque::from([SessionEvent::Node(NodeInput::Linked)]),
            config,
        }
    }

    /// Its handle.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// How both sides know it.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// The peer.
    pub fn peer(&self) -> EndpointId {
        self.peer
    }

    /// What the peer proved.
    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// Where the peer accepts links, if it said.
    pub fn listen(&self) -> Option<std::net::SocketAddr> {
        self.listen
    }

    /// Whether the session lives (its link is up and it did not end).
    pub fn is_linked(&self) -> bool {
        self.ended.is_none()
    }

    /// Why the session ended, once it did.
    pub fn ended(&self) -> Option<Ended> {
        self.ended
    }

    /// The round-trip time measured by heartbeats (smoothed), once there is a sample.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Reliable messages sent and not settled.
    pub fn unsettled(&self) -> usize {
        self.outbox.len()
    }

    /// Reliable messages received and held here (in inboxes, or waiting): count and bytes.
    pub fn held(&self) -> (usize, u64) {
        self.inflow.held()
    }

    /// What this session counts against the endpoint's [`Budgets`]: inbound payload bytes
    /// held (unsettled messages, parked frames, requests in hand) and registration bytes.
    pub fn budgeted(&self) -> (u64, u64) {
        (
            self.inflow.held().1 + self.parked_bytes + self.serving_bytes,
            self.members.bytes(),
        )
    }

    /// Whether a message of the flow `from`, `to`, `channel` is here and not yet in the
    /// receiving agent's inbox as far as this side knows: not acknowledged as received (a
    /// wire that acknowledges receipt), or not settled (one that does not).
    pub fn has_flow(&self, from: &AgentId, to: &AgentId, channel: &ChannelName) -> bool {
        self.outbox
            .has_flow(from, to, channel, self.config.wire.ack_received)
    }

    /// Whether a new message to `to` of `len` bytes would be taken now.
    pub fn has_room(&self, to: &AgentId, len: usize) -> bool {
        self.outbox.can_admit(to, len)
    }

    /// Whether the peer announced `agent`.
    pub fn hosts(&self, agent: &AgentId) -> bool {
        self.members.registered(agent)
    }

    fn event(&mut self, e: SessionEvent<C>) {
        self.events.push_back(e);
    }

    fn control(&mut self, frame: Frame) {
        if self.is_linked() {
            self.transmits
                .push_back(Transmit::Frame(Lane::Control, frame));
        }
    }

    // ----- the end -----

    /// Everything unsettled, marked with who it was for.
    fn orphans(&mut self) -> Vec<Orphan<C::Msg>> {
        let origin = (self.peer, self.trust);
        let mut late = Vec::new();
        let mut orphans = self.outbox.take_all(&mut late);
        for s in late {
            self.event(SessionEvent::Settled(s));
        }
        for o in &mut orphans {
            o.origin.get_or_insert(origin);
        }
        orphans
    }

    fn fail_requests(&mut self) {
        let asked: Vec<(MessageId, C::Req)> = std::mem::take(&mut self.asked).into_iter().collect();
        for (id, req) in asked {
            self.event(SessionEvent::Answered {
                id,
                req,
                answer: Answer::Lost,
            });
        }
        let serving: Vec<MessageId> = std::mem::take(&mut self.serving).into_keys().collect();
        self.inflow.budgets().held.give(self.serving_bytes);
        self.serving_bytes = 0;
        for id in serving {
            self.event(SessionEvent::Cancelled { id });
        }
    }

    /// Ends the session: everything unsettled goes to the node, waiting requests fail, and
    /// (unless the link is gone or the peer said goodbye) the link is to be closed.
    pub fn end(&mut self, why: Ended) {
        if self.ended.is_some() {
            return;
        }
        if !matches!(why, Ended::Goodbye | Ended::LinkLost | Ended::Reset) {
            self.event(SessionEvent::Close(why));
        }
        self.ended = Some(why);
        self.transmits.clear();
        self.fail_requests();
        self.inflow.close();
        self.parked.clear();
        self.inflow.budgets().held.give(self.parked_bytes);
        self.parked_bytes = 0;
        self.members.release();
        let marks = self.outbox.marks();
        let orphans = self.orphans();
        self.event(SessionEvent::Node(NodeInput::Ended {
            orphans,
            why,
            marks,
        }));
        self.event(SessionEvent::Room);
    }

    /// Any sign of life from the peer (a wire with a shared heartbeat tells it here).
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// The peer's shared heartbeat (a wire without per-session pings): it lives, and its
    /// membership is at `generation` (a side behind asks for a snapshot).
    pub fn alive(&mut self, generation: u64, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        self.heard(now);
        if self.members.on_generation(generation, now) == Step::Fetch {
            self.control(Frame::SnapshotRequest);
        }
    }

    // ----- sending -----

    /// Takes a reliable message (from [`outgoing`]) for delivery. `Ok`: it is accepted and
    /// will be settled exactly once ([`SessionEvent::Settled`]), by its deadline.
    ///
    /// # Errors
    /// [`NotSent`], handing back `ctx`.
    pub fn send(
        &mut self,
        meta: MessageMeta,
        body: Encoded,
        ctx: C::Msg,
        now: Instant,
    ) -> Result<(), NotSent<C::Msg>> {
        if !self.is_linked() {
            return Err(NotSent::Unlinked(ctx));
        }
        if !self.outbox.can_admit(&meta.to, meta.len) {
            return Err(NotSent::Full(ctx));
        }
        self.admit(meta, body, ctx, now);
        Ok(())
    }

    /// Numbers a message the window has room for and transmits it.
    fn admit(&mut self, meta: MessageMeta, body: Encoded, ctx: C::Msg, now: Instant) {
        let msg = Orphan::new(meta, body, now, ctx);
        let t = self.outbox.number(
            msg,
            self.generation,
            true,
            now,
            self.config.delivery_deadline,
        );
        if let Some(t) = t {
            // Copies of one envelope admitted one after another travel as one frame.
            let left = match self.transmits.back_mut() {
                Some(back) => back.join(t),
                None => Some(t),
            };
            self.transmits.extend(left);
        }
    }

    /// Sends messages from the front of `batch` as [`Session::send`] does, as many as the
    /// window has room for (the rest stay in `batch`): how many it took, and their payload
    /// bytes. `None` when the session has no link (nothing taken): route again.
    pub fn send_many<I>(&mut self, batch: &mut Peekable<I>, now: Instant) -> Option<(usize, usize)>
    where
        I: Iterator<Item = (MessageMeta, Encoded, C::Msg)>,
    {
        if !self.is_linked() {
            return None;
        }
        let (mut taken, mut bytes) = (0, 0);
        while let Some((meta, body, ctx)) =
            batch.next_if(|(meta, ..)| self.outbox.can_admit(&meta.to, meta.len))
        {
            bytes += meta.len;
            self.admit(meta, body, ctx, now);
            taken += 1;
        }
        Some((taken, bytes))
    }

    /// Sends an unreliable message; `false` when there is no link.
    pub fn send_datagram(&mut self, envelope: Envelope) -> bool {
        if !self.is_linked() {
            return false;
        }
        self.transmits.push_back(Transmit::Frame(
            Lane::Datagram,
            Frame::Datagram {
                generation: self.generation,
                envelope,
            },
        ));
        true
    }

    /// Sends a request; its answer comes as [`SessionEvent::Answered`] with `req`.
    ///
    /// # Errors
    /// Hands `req` back when there is no link.
    pub fn request(&mut self, envelope: Envelope, req: C::Req) -> Result<(), C::Req> {
        if !self.is_linked() {
            return Err(req);
        }
        self.asked.insert(envelope.id, req);
        self.transmits.push_back(Transmit::Frame(
            Lane::Requests,
            Frame::Request {
                generation: self.generation,
                envelope,
            },
        ));
        Ok(())
    }

    /// Gives up on a request: the responder is told; what was kept with it comes back.
    pub fn cancel(&mut self, id: MessageId) -> Option<C::Req> {
        let req = self.asked.remove(&id)?;
        if self.is_linked() {
            self.transmits
                .push_back(Transmit::Frame(Lane::Requests, Frame::Cancel { id }));
        }
        Some(req)
    }

    /// Answers a request a local agent had: `Ok` a response, `Err` a refusal (`Stopped`: it
    /// dropped the request unanswered).
    ///
    /// # Errors
    /// `Err(())` when the requester is gone (it cancelled, or the link went away): the
    /// answer is discarded.
    #[allow(clippy::result_unit_err)]
    pub fn answer(&mut self, id: MessageId, answer: Result<Envelope, Refusal>) -> Result<(), ()> {
        if !self.release_request(id) || !self.is_linked() {
            return Err(());
        }
        let frame = match answer {
            Ok(envelope) => Frame::Response { envelope },
            Err(reason) => Frame::NoAnswer { id, reason },
        };
        self.transmits
            .push_back(Transmit::Frame(Lane::Answers, frame));
        Ok(())
    }

    // ----- receipts -----

    /// The agent took message `seq`.
    pub fn taken(&mut self, seq: u64, now: Instant) {
        self.inflow.settle(seq, None, now, &self.config.wire);
    }

    /// The agent will never take message `seq`: it stopped first.
    pub fn abandoned(&mut self, seq: u64, now: Instant) {
        self.inflow
            .settle(seq, Some(Refusal::Stopped), now, &self.config.wire);
    }

    /// Message `seq` was dropped unread: its time-to-live ran out before its agent took it.
    pub fn expired(&mut self, seq: u64, now: Instant) {
        self.inflow
            .settle(seq, Some(Refusal::Expired), now, &self.config.wire);
    }

    /// Message `seq` was dropped unread: its agent's inbox was full and its channel drops.
    pub fn dropped(&mut self, seq: u64, now: Instant) {
        self.inflow
            .settle(seq, Some(Refusal::Dropped), now, &self.config.wire);
    }

    // ----- the node -----

    /// Does what the node asks.
    ///
    /// # Errors
    /// Redeliveries handed to a session that ended meanwhile (the node has not heard yet)
    /// come back: give them to [`Node::requeue`](crate::Node::requeue).
    pub fn handle(
        &mut self,
        input: SessionInput<C::Msg>,
        now: Instant,
    ) -> Result<(), Vec<Orphan<C::Msg>>> {
        match input {
            SessionInput::Send(frame) => {
                if let Frame::Joined { generation, .. }
                | Frame::Left { generation, .. }
                | Frame::Snapshot { generation, .. } = &frame
                {
                    self.generation = self.generation.max(*generation);
                }
                self.control(frame);
            }
            SessionInput::Redeliver(msgs) if self.ended.is_some() => return Err(msgs),
            SessionInput::Redeliver(msgs) => {
                let config = self.config.clone();
                let mut failed = Vec::new();
                self.outbox
                    .push_back(msgs, config.delivery_deadline, &mut failed);
                for s in failed {
                    self.event(SessionEvent::Settled(s));
                }
                let linked = self.is_linked();
                self.outbox.drain_backlog(
                    self.generation,
                    linked,
                    now,
                    config.delivery_deadline,
                    &mut self.transmits,
                );
            }
            SessionInput::Probe => {
                if self.is_linked() && self.probe.is_none() {
                    let rtt = self.srtt.unwrap_or(PROBE_MIN);
                    let wait = (rtt * 4).max(PROBE_MIN).min(self.config.liveness);
                    let nonce = self.ping(now);
                    self.probe = Some((nonce, now + wait));
                }
            }
            SessionInput::End(why) => self.end(why),
        }
        Ok(())
    }

    fn ping(&mut self, now: Instant) -> u64 {
        self.nonce += 1;
        let nonce = self.nonce;
        if self.pings.len() >= 8 {
            self.pings.pop_front();
        }
        self.pings.push_back((nonce, now));
        let low = self.outbox.low();
        self.control(Frame::Ping {
            nonce,
            generation: self.generation,
            low,
        });
        self.next_ping = now + self.heartbeat;
        nonce
    }

    // ----- receiving -----

    /// A frame from the peer.
    ///
    /// # Errors
    /// The rule it breaks, when it breaks one: the session is then over
    /// ([`Ended::Violation`]) and the link must close.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        locals: &dyn Locals,
    ) -> Result<(), &'static str> {
        if self.ended.is_some() {
            return Ok(());
        }
        self.heard(now);
        if let Err(rule) = self.frame(frame, now, locals) {
            tracing::debug!(peer = ?self.peer, rule, "protocol violation");
            self.end(Ended::Violation(rule));
            return Err(rule);
        }
        Ok(())
    }

    fn frame(
        &mut self,
        frame: Frame,
        now: Instant,
        locals: &dyn Locals,
    ) -> Result<(), &'static str> {
        match frame {
            Frame::Snapshot {
                generation,
                part,
                parts,
                agents,
            } => {
                match self.members.on_snapshot(generation, part, parts, agents) {
                    // Told even when nothing changed: the node learns the peer's membership
                    // is known now.
                    Step::Applied(change) => {
                        self.departed(&change);
                        self.event(SessionEvent::Node(NodeInput::Agents(change)));
                        self.unpark(now, locals);
                    }
                    step => self.membership(step, now, locals),
                }
            }
            Frame::Joined { generation, agent } => {
                let step = self.members.on_joined(generation, agent, now);
                self.membership(step, now, locals);
            }
            Frame::Left { generation, agent } => {
                let step = self.members.on_left(generation, &agent, now);
                self.membership(step, now, locals);
            }
            Frame::SnapshotRequest => self.event(SessionEvent::Node(NodeInput::SnapshotRequested)),
            Frame::Relay(news) => self.event(SessionEvent::Node(NodeInput::Relay(news))),
            Frame::Ping {
                nonce,
                generation,
                low,
            } => {
                self.control(Frame::Pong { nonce });
                let step = self.members.on_generation(generation, now);
                self.membership(step, now, locals);
                let mut ready = Vec::new();
                self.inflow.advance(low, &mut ready);
                self.hand_over(&mut ready);
            }
            Frame::Pong { nonce } => self.pong(nonce, now),
            Frame::Message {
                seq,
                after,
                low,
                generation,
                confirm,
                envelope,
            } => {
                if seq == 0 {
                    return Err("message number 0");
                }
                // What the receiver remembers of a session's messages (their fates, from the
                // sender's `low` up) stays within one span, whatever the sender does.
                if seq.saturating_sub(low) >= crate::config::MAX_RANGE_SPAN {
                    return Err("message numbered a span or more above its low");
                }
                // The session's own buffer: no allocation per message.
                let mut ready = std::mem::take(&mut self.ready);
                self.inflow.advance(low, &mut ready);
                self.message(
                    seq, after, generation, confirm, envelope, now, locals, &mut ready,
                );
                self.hand_over(&mut ready);
                self.ready = ready;
            }
            Frame::Fanout {
                low,
                generation,
                confirm,
                mut copies,
                envelope,
            } => {
                if copies.len() > crate::frame::MAX_FANOUT {
                    return Err("a fanout of more copies than allowed");
                }
                // As for a `Message`, each copy.
                if copies.iter().any(|c| {
                    c.seq == 0 || c.seq.saturating_sub(low) >= crate::config::MAX_RANGE_SPAN
                }) {
                    return Err("a fanout copy numbered 0, or a span or more above its low");
                }
                let Some(last) = copies.pop() else {
                    return Err("a fanout of no copies");
                };
                let mut ready = std::mem::take(&mut self.ready);
                self.inflow.advance(low, &mut ready);
                // Each copy is the message it stands for, addressed to its agent; the last
                // takes the envelope itself.
                for c in copies {
                    let mut e = envelope.clone();
                    e.to = aqe_core::Recipient::Agent(c.to);
                    self.message(
                        c.seq, c.after, generation, confirm, e, now, locals, &mut ready,
                    );
                }
                let mut e = envelope;
                e.to = aqe_core::Recipient::Agent(last.to);
                self.message(
                    last.seq, last.after, generation, confirm, e, now, locals, &mut ready,
                );
                self.hand_over(&mut ready);
                self.ready = ready;
            }
            Frame::Acks { received, taken } => {
                if !valid_ranges(&received) || !valid_ranges(&taken) {
                    return Err("malformed acknowledgement ranges");
                }
                self.outbox.received(&received);
                self.settled(&taken, None, now);
            }
            Frame::Refused { seqs, reason } => {
                if !valid_ranges(&seqs) {
                    return Err("malformed refusal ranges");
                }
                self.settled(&seqs, Some(reason), now);
            }
            Frame::Datagram {
                generation,
                envelope,
            } => self.datagram_in(generation, envelope, now, locals),
            Frame::Request {
                generation,
                envelope,
            } => self.request_in(generation, envelope, now, locals),
            Frame::Cancel { id } => {
                if self.release_request(id) {
                    self.event(SessionEvent::Cancelled { id });
                }
            }
            Frame::Response { envelope } => {
                let Some(id) = envelope.correlation_id else {
                    return Err("a response without the request's id");
                };
                if let Some(req) = self.asked.remove(&id) {
                    self.event(SessionEvent::Answered {
                        id,
                        req,
                        answer: Answer::Response(envelope),
                    });
                }
            }
            Frame::NoAnswer { id, reason } => {
                if let Some(req) = self.asked.remove(&id) {
                    self.event(SessionEvent::Answered {
                        id,
                        req,
                        answer: Answer::Refused(reason),
                    });
                }
            }
        }
        Ok(())
    }

    fn settled(&mut self, ranges: &[(u64, u64)], refused: Option<Refusal>, now: Instant) {
        let (mut done, mut displaced) = (std::mem::take(&mut self.done), Vec::new());
        let freed = self
            .outbox
            .settled(ranges, refused, &mut done, &mut displaced);
        // Only what freed room is settled: `done` is empty otherwise.
        for s in done.drain(..) {
            self.event(SessionEvent::Settled(s));
        }
        done.shrink_to(KEPT_ROOM);
        self.done = done;
        if !freed {
            return;
        }
        if !displaced.is_empty() {
            let origin = (self.peer, self.trust);
            for o in &mut displaced {
                o.origin.get_or_insert(origin);
            }
            self.event(SessionEvent::Node(NodeInput::Displaced {
                orphans: displaced,
            }));
        }
        let config = self.config.clone();
        let linked = self.is_linked();
        self.outbox.drain_backlog(
            self.generation,
            linked,
            now,
            config.delivery_deadline,
            &mut self.transmits,
        );
        self.event(SessionEvent::Room);
    }

    fn pong(&mut self, nonce: u64, now: Instant) {
        if let Some(i) = self.pings.iter().position(|(n, _)| *n == nonce) {
            let sent = self.pings[i].1;
            self.pings.drain(..=i);
            let sample = now.saturating_duration_since(sent);
            self.srtt = Some(match self.srtt {
                Some(s) => (s * 7 + sample) / 8,
                None => sample,
            });
        }
        if self.probe.is_some_and(|(n, _)| n <= nonce) {
            self.probe = None;
        }
    }

    /// Agents of the peer that left: what was sent to them went to instances now gone.
    fn departed(&mut self, change: &crate::peer::AgentsChange) {
        for agent in &change.removed {
            self.outbox.departed(agent);
        }
    }

    fn membership(&mut self, step: Step, now: Instant, locals: &dyn Locals) {
        match step {
            Step::Applied(change) => {
                self.departed(&change);
                if !change.is_empty() {
                    self.event(SessionEvent::Node(NodeInput::Agents(change)));
                }
                self.unpark(now, locals);
            }
            Step::Fetch => self.control(Frame::SnapshotRequest),
            Step::Nothing => {}
        }
    }

    /// Whether `from` may send: `Some(true)` it is the peer's, `Some(false)` it is not,
    /// `None` the announcement may still be on its way (the frame says a newer generation).
    fn sender(&self, from: &AgentId, generation: u64) -> Option<bool> {
        if self.members.registered(from) {
            Some(true)
        } else if generation > self.members.generation() {
            None
        } else {
            Some(false)
        }
    }

    fn park(&mut self, frame: Frame, len: u64, now: Instant) -> bool {
        if self.parked.len() >= self.config.parked as usize
            || (self.parked_bytes > 0 && self.parked_bytes + len > self.config.session_bytes)
            || !self.inflow.budgets().held.take(len)
        {
            return false;
        }
        self.parked_bytes += len;
        self.parked.push_back((frame, now));
        true
    }

    /// A parked frame of `len` payload bytes left parking.
    fn unparked(&mut self, len: u64) {
        self.parked_bytes = self.parked_bytes.saturating_sub(len);
        self.inflow.budgets().held.give(len);
    }

    /// A request of the peer is no longer in hand; `false` if it was not.
    fn release_request(&mut self, id: MessageId) -> bool {
        let Some(len) = self.serving.remove(&id) else {
            return false;
        };
        self.serving_bytes = self.serving_bytes.saturating_sub(len);
        self.inflow.budgets().held.give(len);
        true
    }

    fn unpark(&mut self, now: Instant, locals: &dyn Locals) {
        if self.parked.is_empty() {
            return;
        }
        // What stays parked stays counted; what leaves is given back.
        let parked = std::mem::take(&mut self.parked);
        let mut ready = Vec::new();
        for (frame, since) in parked {
            match frame {
                Frame::Message {
                    seq,
                    after,
                    generation,
                    confirm,
                    envelope,
                    ..
                } => {
                    if self.sender(&envelope.from, generation).is_none() {
                        self.parked.push_back((
                            Frame::Message {
                                seq,
                                after,
                                low: 0,
                                generation,
                                confirm,
                                envelope,
                            },
                            since,
                        ));
                        continue;
                    }
                    self.unparked(envelope.payload.len() as u64);
                    self.inflow.unpark(seq);
                    self.message(
                        seq, after, generation, confirm, envelope, now, locals, &mut ready,
                    );
                }
                Frame::Request {
                    generation,
                    envelope,
                } => {
                    if self.sender(&envelope.from, generation).is_none() {
                        self.parked.push_back((
                            Frame::Request {
                                generation,
                                envelope,
                            },
                            since,
                        ));
                        continue;
                    }
                    self.unparked(envelope.payload.len() as u64);
                    self.request_in(generation, envelope, now, locals);
                }
                Frame::Datagram {
                    generation,
                    envelope,
                } => {
                    if self.sender(&envelope.from, generation).is_none() {
                        self.parked.push_back((
                            Frame::Datagram {
                                generation,
                                envelope,
                            },
                            since,
                        ));
                        continue;
                    }
                    self.unparked(envelope.payload.len() as u64);
                    self.datagram_in(generation, envelope, now, locals);
                }
                _ => {}
            }
        }
        self.hand_over(&mut ready);
    }

    #[allow(clippy::too_many_arguments)]
    fn message(
        &mut self,
        seq: u64,
        after: u64,
        generation: u64,
        confirm: bool,
        envelope: Envelope,
        now: Instant,
        locals: &dyn Locals,
        ready: &mut Vec<Ready>,
    ) {
        let wire = self.config.wire;
        if self.inflow.stale(seq) {
            return;
        }
        if self.inflow.fate(seq).is_some() {
            self.inflow.duplicate(seq, now, &wire);
            return;
        }
        match self.sender(&envelope.from, generation) {
            Some(true) => {}
            Some(false) => {
                tracing::debug!(from = %envelope.from, generation, seq, "a message from an agent its endpoint does not announce");
                return self
                    .inflow
                    .refuse(seq, after, Refusal::NotRegistered, now, &wire, ready);
            }
            None => {
                let len = envelope.payload.len() as u64;
                let frame = Frame::Message {
                    seq,
                    after,
                    low: 0,
                    generation,
                    confirm,
                    envelope,
                };
                if self.park(frame, len, now) {
                    self.inflow.park(seq);
                    // Received: a wire that may lose frames need not send it again.
                    self.inflow.received(confirm, now, &wire);
                } else {
                    tracing::debug!(
                        seq,
                        "no room to park a message until its sender is announced"
                    );
                    self.inflow
                        .refuse(seq, after, Refusal::Overflow, now, &wire, ready);
                }
                return;
            }
        }
        let Some(to) = envelope.target().cloned() else {
            return self
                .inflow
                .refuse(seq, after, Refusal::NotHere, now, &wire, ready);
        };
        if !locals.admits(&to, &envelope.channel) {
            return self
                .inflow
                .refuse(seq, after, Refusal::NotHere, now, &wire, ready);
        }
        let len = envelope.payload.len() as u64;
        if !self.inflow.room(&to, len) {
            tracing::debug!(%to, seq, "no room in the receiving agent's window");
            return self
                .inflow
                .refuse(seq, after, Refusal::Overflow, now, &wire, ready);
        }
        let r = Ready {
            seq,
            to,
            confirm,
            envelope,
        };
        match self.inflow.blocked_by(after) {
            None => self.inflow.deliver(r, len, ready),
            Some(before) => self.inflow.wait(seq, before, r, len),
        }
        self.inflow.received(confirm, now, &wire);
    }

    fn hand_over(&mut self, ready: &mut Vec<Ready>) {
        for r in ready.drain(..) {
            self.event(SessionEvent::Deliver {
                to: r.to,
                seq: Some(r.seq),
                envelope: r.envelope,
            });
        }
    }

    /// An unreliable message: delivered if its sender and receiver check out, parked while
    /// its sender's announcement is on its way, dropped otherwise (at most once).
    fn datagram_in(
        &mut self,
        generation: u64,
        envelope: Envelope,
        now: Instant,
        locals: &dyn Locals,
    ) {
        match self.sender(&envelope.from, generation) {
            Some(true) => {}
            Some(false) => return,
            None => {
                let len = envelope.payload.len() as u64;
                let _ = self.park(
                    Frame::Datagram {
                        generation,
                        envelope,
                    },
                    len,
                    now,
                );
                return;
            }
        }
        if let Some(to) = envelope.target().cloned()
            && locals.admits(&to, &envelope.channel)
        {
            self.event(SessionEvent::Deliver {
                to,
                seq: None,
                envelope,
            });
        }
    }

    fn request_in(
        &mut self,
        generation: u64,
        envelope: Envelope,
        now: Instant,
        locals: &dyn Locals,
    ) {
        let id = envelope.id;
        let refuse = |s: &mut Self, reason| {
            if s.is_linked() {
                s.transmits.push_back(Transmit::Frame(
                    Lane::Answers,
                    Frame::NoAnswer { id, reason },
                ));
            }
        };
        match self.sender(&envelope.from, generation) {
            Some(true) => {}
            Some(false) => return refuse(self, Refusal::NotRegistered),
            None => {
                let len = envelope.payload.len() as u64;
                if !self.park(
                    Frame::Request {
                        generation,
                        envelope,
                    },
                    len,
                    now,
                ) {
                    refuse(self, Refusal::Overflow);
                }
                return;
            }
        }
        let Some(to) = envelope.target().cloned() else {
            return refuse(self, Refusal::NotHere);
        };
        if !locals.admits(&to, &envelope.channel) {
            return refuse(self, Refusal::NotHere);
        }
        if self.seen_set.contains(&id) {
            // A copy: the first was (or is being) answered.
            return;
        }
        let len = envelope.payload.len() as u64;
        if self.serving.len() >= self.config.requests_in_hand as usize
            || (self.serving_bytes > 0 && self.serving_bytes + len > self.config.session_bytes)
            || !self.inflow.budgets().held.take(len)
        {
            return refuse(self, Refusal::Overflow);
        }
        self.serving.insert(id, len);
        self.serving_bytes += len;
        if self.seen.len() >= self.config.requests_in_hand as usize
            && let Some(old) = self.seen.pop_front()
        {
            self.seen_set.remove(&old);
        }
        self.seen.push_back(id);
        self.seen_set.insert(id);
        self.event(SessionEvent::Request { to, envelope });
    }

    // ----- time -----

    /// When [`Session::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let wire = &self.config.wire;
        let mut at = self.last_heard + self.config.liveness;
        let mut min = |t: Option<Instant>| {
            if let Some(t) = t {
                at = at.min(t);
            }
        };
        min(self.outbox.next_check());
        min(self.inflow.ack_at(wire));
        min(self.members.retry_at());
        min(self.probe.map(|(_, d)| d));
        if self.is_linked() && wire.pings {
            min(Some(self.next_ping));
        }
        min(self
            .parked
            .front()
            .map(|(_, since)| *since + self.config.delivery_deadline));
        Some(at)
    }

    /// Does what is due at `now`: heartbeats, acknowledgements, retransmissions, deadlines,
    /// liveness, probes.
    pub fn handle_timeout(&mut self, now: Instant, locals: &dyn Locals) {
        if self.ended.is_some() {
            return;
        }
        if now >= self.last_heard + self.config.liveness {
            tracing::debug!(peer = ?self.peer, "nothing heard for the liveness timeout");
            return self.end(Ended::Unresponsive);
        }
        if self.probe.is_some_and(|(_, deadline)| now >= deadline) {
            tracing::info!(peer = ?self.peer, "an older incarnation did not answer its probe: replaced");
            return self.end(Ended::Replaced);
        }
        let config = self.config.clone();
        let wire = config.wire;
        if self.is_linked() && wire.pings && now >= self.next_ping {
            self.ping(now);
        }
        self.inflow.on_timeout(now, &wire);
        if self.members.on_timeout(now) == Step::Fetch {
            self.control(Frame::SnapshotRequest);
        }
        // Frames parked for the delivery deadline: the announcement is not coming (their
        // senders gave up on them by now).
        let mut ready = Vec::new();
        while self
            .parked
            .front()
            .is_some_and(|(_, since)| now >= *since + config.delivery_deadline)
        {
            if let Some((frame, _)) = self.parked.pop_front() {
                match frame {
                    Frame::Message {
                        seq,
                        after,
                        envelope,
                        ..
                    } => {
                        self.unparked(envelope.payload.len() as u64);
                        self.inflow.unpark(seq);
                        self.inflow.refuse(
                            seq,
                            after,
                            Refusal::NotRegistered,
                            now,
                            &wire,
                            &mut ready,
                        );
                    }
                    Frame::Request { envelope, .. } => {
                        self.unparked(envelope.payload.len() as u64);
                        let id = envelope.id;
                        if self.is_linked() {
                            self.transmits.push_back(Transmit::Frame(
                                Lane::Answers,
                                Frame::NoAnswer {
                                    id,
                                    reason: Refusal::NotRegistered,
                                },
                            ));
                        }
                    }
                    Frame::Datagram { envelope, .. } => {
                        self.unparked(envelope.payload.len() as u64);
                    }
                    _ => {}
                }
            }
        }
        self.hand_over(&mut ready);
        let _ = locals;
        if self.outbox.next_check().is_some_and(|c| now >= c) {
            let linked = self.is_linked();
            let mut failed = Vec::new();
            self.outbox.on_timeout(
                now,
                config.delivery_deadline,
                linked.then_some(self.generation),
                &mut failed,
                &mut self.transmits,
            );
            if !failed.is_empty() {
                for s in failed {
                    self.event(SessionEvent::Settled(s));
                }
                self.outbox.drain_backlog(
                    self.generation,
                    linked,
                    now,
                    config.delivery_deadline,
                    &mut self.transmits,
                );
                self.event(SessionEvent::Room);
            }
        }
    }

    // ----- outputs -----

    /// The next frame to send, if any. Acknowledgements that are due go first.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.is_linked() {
            // Due acknowledgements go ahead of what waits, in their order (added at the
            // back, then turned to the front: no list of their own).
            let wire = self.config.wire;
            let waiting = self.transmits.len();
            self.inflow.acks(&wire, &mut self.transmits);
            let added = self.transmits.len() - waiting;
            self.transmits.rotate_right(added);
        }
        self.transmits.pop_front()
    }

    /// Whether frames wait to be sent (acknowledgements due included).
    pub fn wants_transmit(&self) -> bool {
        !self.transmits.is_empty() || (self.is_linked() && self.inflow.acks_due())
    }

    /// The next thing that happened, if any.
    pub fn poll_event(&mut self) -> Option<SessionEvent<C>> {
        self.events.pop_front()
    }

    /// What the peer has announced.
    pub fn peer_agents(&self) -> Vec<Arc<aqe_core::Registration>> {
        self.members.agents().cloned().collect()
    }

    /// This endpoint's membership generation, as the frames sent here say (what a frame
    /// from one of its agents carries).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The peer's membership generation this side applied.
    pub fn peer_generation(&self) -> u64 {
        self.members.generation()
    }

    /// What is kept with each unsettled message (diagnostics for tests).
    #[doc(hidden)]
    pub fn unsettled_contexts(&self) -> Vec<&C::Msg> {
        self.outbox.contexts().collect()
    }

    /// Messages this side holds, waiting for room at the peer or for their predecessor:
    /// whether `seq` arrived before (for tests).
    #[doc(hidden)]
    pub fn has_fate(&self, seq: u64) -> bool {
        !matches!(self.inflow.fate(seq), None | Some(Fate::Parked))
    }
}
