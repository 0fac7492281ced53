//! The agent's tasks: the dispatcher that runs handlers, and the event forwarder.

use std::sync::Arc;

use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinSet;

use aqe_core::{
    Envelope, ErrorBody, Event, Inbound, Inbox, MessageKind, RemoteErrorKind, Responder,
};

use crate::Agent;
use crate::handler::{Handlers, RequestHandler};

/// Takes items off the inbox until shutdown. Message handlers run inline (arrival order);
/// request and stream handlers run as tasks owned here, at most `permits` at once, and are
/// aborted when the dispatcher ends.
pub(crate) async fn run(
    agent: Agent,
    mut inbox: Inbox,
    handlers: Handlers,
    permits: Arc<Semaphore>,
) {
    let shutdown = agent.inner.shutdown.clone();
    let mut tasks = JoinSet::new();
    loop {
        let item = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            item = inbox.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        match item {
            Inbound::Message(env) => {
                announce(&agent, &env);
                if let Some(h) = &handlers.message {
                    tokio::select! {
                        () = h(agent.clone(), env) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
            Inbound::Request {
                envelope,
                responder,
            } => {
                announce(&agent, &envelope);
                let Some(permit) = acquire(&permits, &shutdown).await else {
                    break;
                };
                let (agent, handler) = (agent.clone(), handlers.request.clone());
                tasks.spawn(async move {
                    answer(agent, handler, envelope, responder).await;
                    drop(permit);
                });
            }
            Inbound::Stream(stream) => {
                let (id, from) = (stream.header().id, stream.header().from.clone());
                let Some(h) = handlers.stream.clone() else {
                    tracing::debug!(agent = %agent.id(), %from, "no stream handler: stream refused");
                    continue;
                };
                agent.emit(Event::StreamOpened {
                    stream: id,
                    from: from.clone(),
                });
                let Some(permit) = acquire(&permits, &shutdown).await else {
                    break;
                };
                let agent = agent.clone();
                tasks.spawn(async move {
                    h(agent.clone(), stream).await;
                    agent.emit(Event::StreamClosed { stream: id, from });
                    drop(permit);
                });
            }
        }
    }
    // Dropping the responders of aborted handlers tells their requesters.
    tasks.shutdown().await;
    inbox.close();
}

async fn acquire(
    permits: &Arc<Semaphore>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::select! {
        p = permits.clone().acquire_owned() => p.ok(),
        () = shutdown.cancelled() => None,
    }
}

fn announce(agent: &Agent, env: &Envelope) {
    agent.emit(Event::MessageReceived {
        id: env.id,
        from: env.from.clone(),
        channel: env.channel.clone(),
        kind: env.kind,
        size: env.payload.len(),
    });
}

/// Runs the request handler and sends its outcome back; gives up if the requester does.
async fn answer(
    agent: Agent,
    handler: Option<RequestHandler>,
    request: Envelope,
    mut responder: Responder,
) {
    let me = agent.id().clone();
    let outcome = match handler {
        None => Err((
            RemoteErrorKind::NoHandler,
            format!("agent {me} has no request handler"),
        )),
        Some(h) => {
            let work = h(agent.clone(), request.clone());
            tokio::select! {
                r = work => r.map_err(|e| (e.kind(), e.message().to_owned())),
                () = responder.cancelled() => {
                    tracing::debug!(agent = %me, from = %request.from, "requester gave up; handler cancelled");
                    return;
                }
            }
        }
    };
    let limit = agent
        .registration()
        .channel(&request.channel)
        .map(|c| c.max_message_size)
        .unwrap_or(usize::MAX);
    let outcome = outcome.and_then(|payload| {
        if payload.len() > limit {
            Err((
                RemoteErrorKind::HandlerFailed,
                format!(
                    "response of {} bytes exceeds the channel limit of {limit} bytes",
                    payload.len()
                ),
            ))
        } else {
            Ok(payload)
        }
    });
    let reply = match outcome {
        Ok(payload) => request.reply(me.clone(), MessageKind::Response, payload),
        Err((kind, message)) => {
            let body = aqe_core::encode(&ErrorBody { kind, message }).unwrap_or_default();
            request.reply(me.clone(), MessageKind::Error, body)
        }
    };
    if let Err(e) = responder.respond(reply).await {
        tracing::debug!(agent = %me, error = %e, "response discarded: the requester is gone");
    }
}

/// Passes the transport's events on to the agent's subscribers, leaving out the agent's own
/// arrival and departure.
pub(crate) async fn forward_events(agent: Agent, mut events: broadcast::Receiver<Event>) {
    let shutdown = agent.inner.shutdown.clone();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(Event::PeerDiscovered(p)) if &p.id == agent.id() => {}
            Ok(Event::PeerLeft(id)) if &id == agent.id() => {}
            Ok(e) => agent.emit(e),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                agent.emit(Event::Lagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
