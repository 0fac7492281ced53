//! Handlers: what an agent runs for the messages, requests and streams it receives.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::ReusableBoxFuture;

use aqe_core::{Envelope, Error, IncomingStream, RemoteErrorKind};

use crate::Agent;

/// Why a request handler failed; sent back to the requester as an error response, where it
/// surfaces as [`Error::Remote`].
///
/// Any error converts into it with `?`; a payload that does not decode becomes a
/// [`RemoteErrorKind::BadRequest`], anything else a [`RemoteErrorKind::HandlerFailed`].
/// (Like `anyhow::Error`, it does not implement `std::error::Error` itself, so that the
/// blanket conversion can exist.)
pub struct HandlerError {
    kind: RemoteErrorKind,
    message: String,
}

impl HandlerError {
    /// A handler failure with this description.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            kind: RemoteErrorKind::HandlerFailed,
            message: message.to_string(),
        }
    }

    /// A request the handler cannot make sense of.
    pub fn bad_request(message: impl fmt::Display) -> Self {
        Self {
            kind: RemoteErrorKind::BadRequest,
            message: message.to_string(),
        }
    }

    /// The class of failure.
    pub fn kind(&self) -> RemoteErrorKind {
        self.kind
    }

    /// The description.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let kind = match (&e as &dyn std::error::Error).downcast_ref::<Error>() {
            Some(Error::Malformed { .. } | Error::Truncated { .. } | Error::Undecodable { .. }) => {
                RemoteErrorKind::BadRequest
            }
            _ => RemoteErrorKind::HandlerFailed,
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Puts the handling of one message into the slot, whose allocation the next message's
/// handling reuses (one handler makes futures of one type): no allocation per message.
pub(crate) type MessageHandler =
    Arc<dyn Fn(Agent, Envelope, &mut ReusableBoxFuture<'static, ()>) + Send + Sync>;
pub(crate) type RequestHandler = Arc<
    dyn Fn(Agent, Envelope) -> BoxFuture<'static, Result<aqe_core::Payload, HandlerError>>
        + Send
        + Sync,
>;
pub(crate) type StreamHandler =
    Arc<dyn Fn(Agent, IncomingStream) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Default)]
pub(crate) struct Handlers {
    pub(crate) message: Option<MessageHandler>,
    pub(crate) request: Option<RequestHandler>,
    pub(crate) stream: Option<StreamHandler>,
}

pub(crate) fn message<F, Fut>(f: F) -> MessageHandler
where
    F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |agent, env, slot| slot.set(f(agent, env)))
}

pub(crate) fn request<F, Fut, T>(f: F) -> RequestHandler
where
    F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
    T: Serialize,
{
    Arc::new(move |agent, env| {
        let fut = f(agent, env);
        Box::pin(async move {
            let value = fut.await?;
            aqe_core::Payload::postcard(&value).map_err(HandlerError::from)
        })
    })
}

pub(crate) fn request_payload<F, Fut>(f: F) -> RequestHandler
where
    F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<aqe_core::Payload, HandlerError>> + Send + 'static,
{
    Arc::new(move |agent, env| Box::pin(f(agent, env)))
}

pub(crate) fn stream<F, Fut>(f: F) -> StreamHandler
where
    F: Fn(Agent, IncomingStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |agent, s| Box::pin(f(agent, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_are_bad_requests() {
        let e = aqe_core::decode::<(u64, u64)>(&[1]).expect_err("short");
        assert_eq!(HandlerError::from(e).kind(), RemoteErrorKind::BadRequest);
        let io = std::io::Error::other("disk full");
        let h = HandlerError::from(io);
        assert_eq!(
            (h.kind(), h.message()),
            (RemoteErrorKind::HandlerFailed, "disk full")
        );
    }
}
