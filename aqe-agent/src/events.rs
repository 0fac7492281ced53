//! The agent's event stream.

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use aqe_core::Event;

/// Events of one agent: peers, connections, messages, streams, errors, fallbacks.
///
/// Membership events (peers, connections) are in the order they happened, and so are the
/// agent's traffic events (messages, streams); the two kinds come from different sources and
/// may interleave either way.
///
/// Each subscriber has its own bounded buffer; one that falls behind gets an
/// [`Event::Lagged`] saying how many events it missed, rather than slowing the agent down.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
    shutdown: CancellationToken,
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<Event>, shutdown: CancellationToken) -> Self {
        Self { rx, shutdown }
    }

    /// The next event; `None` once the agent has shut down and every event was read.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Option<Event> {
        let res = tokio::select! {
            biased;
            r = self.rx.recv() => r,
            () = self.shutdown.cancelled() => self.rx.try_recv().map_err(|e| match e {
                broadcast::error::TryRecvError::Lagged(n) => broadcast::error::RecvError::Lagged(n),
                _ => broadcast::error::RecvError::Closed,
            }),
        };
        match res {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
