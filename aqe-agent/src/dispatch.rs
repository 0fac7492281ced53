//! The agent's tasks: the dispatcher that runs handlers, and the event forwarder.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio::task::JoinSet;

use aqe_core::{
    AgentId, Envelope, ErrorBody, Event, Inbound, Inbox, MessageId, MessageKind, RemoteErrorKind,
    Responder,
};

use crate::Agent;
use crate::handler::{Handlers, RequestHandler};

/// Answers kept to serve a request that arrives again (re-sent through a fallback transport
/// after a timeout, say) without running its handler twice.
const ANSWER_CACHE: usize = 1024;
/// How long a kept answer stays valid.
const ANSWER_TTL: Duration = Duration::from_secs(60);

/// A request, by who sent it and its id: the same key whatever transport carried it.
type RequestKey = (AgentId, MessageId);

/// Requests being handled and answers recently given, so that a handler runs at most once
/// per request id.
#[derive(Default)]
struct Requests {
    /// Handlers running, with the way to hand them another requester of the same request.
    running: HashMap<RequestKey, mpsc::UnboundedSender<Responder>>,
    /// Recent answers, oldest first.
    answered: HashMap<RequestKey, (Envelope, Instant)>,
    order: VecDeque<RequestKey>,
}

impl Requests {
    fn remember(&mut self, key: RequestKey, answer: Envelope) {
        while self.order.len() >= ANSWER_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.answered.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.answered.insert(key, (answer, Instant::now()));
    }

    fn answer(&self, key: &RequestKey) -> Option<Envelope> {
        self.answered
            .get(key)
            .filter(|(_, at)| at.elapsed() < ANSWER_TTL)
            .map(|(e, _)| e.clone())
    }
}

/// Takes items off the inbox until shutdown. Message handlers run inline (arrival order),
/// and a message is acknowledged once its handler returned; request and stream handlers run
/// as tasks owned here, at most `permits` at once, and are aborted when the dispatcher ends.
pub(crate) async fn run(
    agent: Agent,
    mut inbox: Inbox,
    handlers: Handlers,
    permits: Arc<Semaphore>,
) {
    let shutdown = agent.inner.shutdown.clone();
    let requests = Arc::new(Mutex::new(Requests::default()));
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
            Inbound::Message { envelope, receipt } => {
                announce(&agent, &envelope);
                if let Some(h) = &handlers.message {
                    tokio::select! {
                        () = h(agent.clone(), envelope) => drop(receipt),
                        () = shutdown.cancelled() => {
                            // The handler did not finish: the sender must not count it delivered.
                            receipt.abandon();
                            break;
                        }
                    }
                } else {
                    drop(receipt);
                }
            }
            Inbound::Request {
                envelope,
                responder,
            } => {
                announce(&agent, &envelope);
                let key = (envelope.from.clone(), envelope.id);
                let cached = {
                    let table = requests.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(join) = table.running.get(&key) {
                        // The same request is being handled: this requester waits for it too.
                        match join.send(responder) {
                            Ok(()) => continue,
                            Err(mpsc::error::SendError(r)) => Err(r),
                        }
                    } else if let Some(answer) = table.answer(&key) {
                        Ok((answer, responder))
                    } else {
                        Err(responder)
                    }
                };
                let Some(permit) = acquire(&permits, &shutdown).await else {
                    break;
                };
                match cached {
                    Ok((answer, responder)) => {
                        tasks.spawn(async move {
                            let _ = responder.respond(answer).await;
                            drop(permit);
                        });
                    }
                    Err(responder) => {
                        let (join, joined) = mpsc::unbounded_channel();
                        requests
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .running
                            .insert(key.clone(), join);
                        let (agent, handler, requests) =
                            (agent.clone(), handlers.request.clone(), requests.clone());
                        tasks.spawn(async move {
                            let answer = answer(agent, handler, envelope, responder, joined).await;
                            let mut table = requests.lock().unwrap_or_else(|p| p.into_inner());
                            table.running.remove(&key);
                            if let Some(answer) = answer {
                                table.remember(key, answer);
                            }
                            drop(permit);
                        });
                    }
                }
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
    // Dropping the responders of aborted handlers tells their requesters; dropping the inbox
    // abandons the messages still in it, so their senders learn they were not delivered.
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

/// Resolves once every responder in `responders` has seen its requester give up.
async fn all_cancelled(responders: &mut [Responder]) {
    for r in responders.iter_mut() {
        r.cancelled().await;
    }
}

/// Runs the request handler and sends its outcome to every requester of this request (the
/// first, and any that sent the same request again meanwhile); gives up when all of them
/// have. Returns the answer sent, to be kept for later repeats.
async fn answer(
    agent: Agent,
    handler: Option<RequestHandler>,
    request: Envelope,
    responder: Responder,
    mut joined: mpsc::UnboundedReceiver<Responder>,
) -> Option<Envelope> {
    let me = agent.id().clone();
    let mut responders = vec![responder];
    let outcome = match handler {
        None => Err((
            RemoteErrorKind::NoHandler,
            format!("agent {me} has no request handler"),
        )),
        Some(h) => {
            let mut work = h(agent.clone(), request.clone());
            loop {
                enum Next<T> {
                    Done(T),
                    Cancelled,
                    Joined(Responder),
                }
                let next = tokio::select! {
                    r = &mut work => Next::Done(r),
                    () = all_cancelled(&mut responders) => Next::Cancelled,
                    Some(r) = joined.recv() => Next::Joined(r),
                };
                match next {
                    Next::Done(r) => break r.map_err(|e| (e.kind(), e.message().to_owned())),
                    Next::Joined(r) => responders.push(r),
                    Next::Cancelled => {
                        tracing::debug!(agent = %me, from = %request.from, "requester gave up; handler cancelled");
                        return None;
                    }
                }
            }
        }
    };
    // Requesters that joined after the handler finished still get the answer.
    joined.close();
    while let Ok(r) = joined.try_recv() {
        responders.push(r);
    }
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
    for r in responders {
        if let Err(e) = r.respond(reply.clone()).await {
            tracing::debug!(agent = %me, error = %e, "response discarded: the requester is gone");
        }
    }
    Some(reply)
}

/// Passes the transport's events on to the agent's subscribers, leaving out the agent's own
/// arrival and departure and delivery reports meant for other agents.
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
            Ok(Event::DeliveryFailed { ref from, .. }) if from != agent.id() => {}
            Ok(e) => agent.emit(e),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                agent.emit(Event::Lagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
