//! Delivery receipts: how a transport learns that a reliable message reached its agent.
//!
//! Every reliable message a transport puts in an inbox carries a [`Receipt`]. The agent
//! runtime drops the receipt once the message handler has returned (or at once when the agent
//! has no message handler): dropping it *acknowledges* the message, and the transport then
//! counts it delivered (over QUIC: it sends the acknowledgement to the sender). A receipt the
//! agent could not honour (it stopped with the message still queued or in hand) is
//! [abandoned](Receipt::abandon) instead, and the sender reports the message failed or
//! delivers it again elsewhere.
//!
//! Acknowledging after the handler, not on arrival, is what makes a crash of the receiving
//! process visible to the sender: what the handler had not finished is unconfirmed, never
//! silently counted as delivered.

use std::fmt;
use std::sync::Arc;

/// Where acknowledgements of many messages go; `token` tells them apart (a sequence number,
/// say). Shared by the messages of one connection, so a receipt costs no allocation.
pub trait AckSink: Send + Sync + 'static {
    /// The agent took the message.
    fn acknowledged(&self, token: u64);
    /// The agent will never take the message: it stopped first.
    fn abandoned(&self, token: u64);
    /// The message's time-to-live ran out before its agent took it: it was dropped unread.
    fn expired(&self, token: u64);
    /// The agent's inbox was full and the channel's slow-consumer policy dropped it unread.
    fn dropped(&self, token: u64);
}

/// What a one-off receipt does, for transports without a shared sink.
pub trait AckOnce: Send + 'static {
    /// The agent took the message.
    fn acknowledged(self: Box<Self>);
    /// The agent will never take the message.
    fn abandoned(self: Box<Self>);
    /// The message's time-to-live ran out before its agent took it.
    fn expired(self: Box<Self>);
    /// The agent's full inbox dropped it unread.
    fn dropped(self: Box<Self>);
}

/// How a reliable message ended at its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its agent took it (the handler returned).
    Taken,
    /// Its agent stopped before taking it.
    Abandoned,
    /// Its time-to-live ran out before its agent took it.
    Expired,
    /// Its agent's inbox was full and its channel drops ([`SlowConsumer`](crate::SlowConsumer)).
    Dropped,
}

enum Inner {
    None,
    Shared(Arc<dyn AckSink>, u64),
    Once(Box<dyn AckOnce>),
}

/// The acknowledgement of one reliable message; acknowledges when dropped.
///
/// `also` holds receipts of copies of the same message that arrived while it was still
/// queued (a sender's redelivery after a connection failure): they are settled with it.
#[must_use = "dropping a receipt acknowledges the message"]
pub struct Receipt {
    inner: Inner,
    /// Boxed: copies are rare, and every message's receipt moves through queues.
    #[allow(clippy::box_collection)] // a thin pointer: 8 bytes where a Vec takes 24
    also: Option<Box<Vec<Receipt>>>,
}

impl Receipt {
    /// A receipt nobody waits for (unreliable messages, messages made up by a test).
    pub fn none() -> Self {
        Self {
            inner: Inner::None,
            also: None,
        }
    }

    /// A receipt reporting to a shared sink under `token`.
    pub fn shared(sink: Arc<dyn AckSink>, token: u64) -> Self {
        Self {
            inner: Inner::Shared(sink, token),
            also: None,
        }
    }

    /// A receipt with its own handler.
    pub fn once(handler: impl AckOnce) -> Self {
        Self {
            inner: Inner::Once(Box::new(handler)),
            also: None,
        }
    }

    /// Whether anyone waits for this receipt (reliable messages).
    pub fn is_tracked(&self) -> bool {
        !matches!(self.inner, Inner::None)
    }

    /// Settles `other` (the receipt of a duplicate) together with this one.
    pub fn join(&mut self, other: Receipt) {
        self.also.get_or_insert_with(Box::default).push(other);
    }

    /// Marks the message as never taken: its agent stopped first.
    pub fn abandon(mut self) {
        self.settle(Fate::Abandoned);
    }

    /// Marks the message as dropped unread: its time-to-live ran out first.
    pub fn expire(mut self) {
        self.settle(Fate::Expired);
    }

    /// Marks the message as dropped unread by a full inbox.
    pub fn drop_unread(mut self) {
        self.settle(Fate::Dropped);
    }

    fn settle(&mut self, fate: Fate) {
        match (std::mem::replace(&mut self.inner, Inner::None), fate) {
            (Inner::None, _) => {}
            (Inner::Shared(sink, token), Fate::Taken) => sink.acknowledged(token),
            (Inner::Shared(sink, token), Fate::Abandoned) => sink.abandoned(token),
            (Inner::Shared(sink, token), Fate::Expired) => sink.expired(token),
            (Inner::Shared(sink, token), Fate::Dropped) => sink.dropped(token),
            (Inner::Once(h), Fate::Taken) => h.acknowledged(),
            (Inner::Once(h), Fate::Abandoned) => h.abandoned(),
            (Inner::Once(h), Fate::Expired) => h.expired(),
            (Inner::Once(h), Fate::Dropped) => h.dropped(),
        }
        for mut r in self.also.take().map(|a| *a).unwrap_or_default() {
            r.settle(fate);
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        self.settle(Fate::Taken);
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::None => "none",
            Inner::Shared(..) => "shared",
            Inner::Once(_) => "once",
        };
        f.debug_struct("Receipt")
            .field("kind", &kind)
            .field("copies", &self.also.as_ref().map_or(0, |a| a.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, bool)>>);

    impl AckSink for Log {
        fn acknowledged(&self, token: u64) {
            self.0.lock().expect("lock").push((token, true));
        }
        fn abandoned(&self, token: u64) {
            self.0.lock().expect("lock").push((token, false));
        }
        fn expired(&self, token: u64) {
            self.0.lock().expect("lock").push((token + 1000, false));
        }
        fn dropped(&self, token: u64) {
            self.0.lock().expect("lock").push((token + 2000, false));
        }
    }

    #[test]
    fn drop_acknowledges_abandon_does_not_and_copies_follow() {
        let log = Arc::new(Log::default());
        drop(Receipt::shared(log.clone(), 1));
        let mut r = Receipt::shared(log.clone(), 2);
        r.join(Receipt::shared(log.clone(), 3));
        r.abandon();
        let mut r = Receipt::shared(log.clone(), 4);
        r.join(Receipt::shared(log.clone(), 5));
        drop(r);
        let mut r = Receipt::shared(log.clone(), 6);
        r.join(Receipt::shared(log.clone(), 7));
        r.expire();
        Receipt::shared(log.clone(), 8).drop_unread();
        assert!(!Receipt::none().is_tracked());
        assert_eq!(
            *log.0.lock().expect("lock"),
            [
                (1, true),
                (2, false),
                (3, false),
                (4, true),
                (5, true),
                (1006, false),
                (1007, false),
                (2008, false)
            ]
        );
    }
}
