//! What the host keeps with what it hands to sessions, and how settlements are told.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};

use aqe_core::plumbing::StatsRecorder;
use aqe_core::{AgentId, ChannelName, DeliveryFailure, Error, Event, MessageId, Result};
use aqe_session::{Answer, Outcome, Settled};

/// Kept with each reliable message: its sender's counters, and the waiter of a confirmed
/// send.
#[derive(Debug)]
pub(crate) struct MsgCtx {
    pub(crate) stats: Arc<StatsRecorder>,
    pub(crate) confirm: Option<oneshot::Sender<Result<()>>>,
    /// A failure is told as an event and counted (not for a message another transport
    /// handed over: that one reports it).
    pub(crate) announce: bool,
}

/// What the sender of a reliable message hears of its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Confirm {
    /// A failure is announced as an event.
    No,
    /// The send waits for the outcome too.
    Wait,
    /// It waits, and a failure is only returned (a message handed over).
    WaitQuietly,
}

impl Confirm {
    pub(crate) fn waits(self) -> bool {
        self != Confirm::No
    }
}

/// Kept with each request: where its answer goes.
#[derive(Debug)]
pub(crate) struct ReqCtx {
    pub(crate) answer: oneshot::Sender<Answer>,
}

/// The host's [`aqe_session::Ctx`].
#[derive(Debug)]
pub(crate) struct HostCtx;

impl aqe_session::Ctx for HostCtx {
    type Msg = MsgCtx;
    type Req = ReqCtx;
}

/// Tells settled messages to their senders: counters, confirmed senders' waiters, and one
/// `DeliveryFailed` event per sender, receiver, channel and reason (ids in send order).
pub(crate) fn settle(
    events: &broadcast::Sender<Event>,
    settled: impl IntoIterator<Item = Settled<MsgCtx>>,
) {
    type Group = (AgentId, AgentId, ChannelName, DeliveryFailure);
    let mut order: Vec<Group> = Vec::new();
    let mut groups: HashMap<Group, Vec<MessageId>> = HashMap::new();
    for s in settled {
        // A large payload is freed as a blocking section: the worker's other tasks go on.
        let body = s.body;
        aqe_core::plumbing::copying(body.len(), move || drop(body));
        let meta = s.meta;
        match s.outcome {
            Outcome::Taken => {
                s.ctx.stats.confirmed(1);
                if let Some(c) = s.ctx.confirm {
                    let _ = c.send(Ok(()));
                }
            }
            Outcome::Failed(reason) => {
                tracing::debug!(from = %meta.from, to = %meta.to, id = %meta.id, %reason, "delivery failed");
                if let Some(c) = s.ctx.confirm {
                    let _ = c.send(Err(Error::DeliveryFailed {
                        to: meta.to.clone(),
                        reason,
                    }));
                }
                if !s.ctx.announce {
                    // Not this transport's failure to count: it is no longer awaited here.
                    s.ctx.stats.unaccepted(1);
                    continue;
                }
                s.ctx.stats.failed(1);
                let key = (meta.from, meta.to, meta.channel, reason);
                groups
                    .entry(key.clone())
                    .or_insert_with(|| {
                        order.push(key);
                        Vec::new()
                    })
                    .push(meta.id);
            }
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
