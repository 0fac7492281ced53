//! The agent's tasks: the dispatcher that runs handlers, and the event forwarder.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::ReusableBoxFuture;

use aqe_core::plumbing::Inbox;
use aqe_core::{
    AgentId, Envelope, ErrorBody, Event, Inbound, IncomingStream, MessageId, MessageKind,
    RemoteErrorKind, Responder,
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

/// The tables every request passes through.
type Map<K, V> = aqe_core::plumbing::FastMap<K, V>;

/// Requests being handled and answers recently given, so that a handler runs at most once
/// per request id.
#[derive(Default)]
struct Requests {
    /// Handlers running, with the requesters of the same request that arrived meanwhile
    /// (they get the same answer).
    running: Map<RequestKey, Vec<Responder>>,
    /// Recent answers, oldest first.
    answered: Map<RequestKey, (Envelope, Instant)>,
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

/// How much an agent's dispatcher runs at once, and holds waiting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Request handlers running at once.
    pub(crate) requests: usize,
    /// Stream handlers running at once (apart from requests: idle streams never stop requests
    /// from being served).
    pub(crate) streams: usize,
}

impl Limits {
    /// Work held waiting for a running slot, per kind, before more is refused.
    fn backlog(n: usize) -> usize {
        n.saturating_mul(4)
    }
}

/// What a dispatcher task was, when it ends.
enum Done {
    /// A request handler.
    Request,
    /// A stream handler.
    Stream,
    /// An answer sent without a handler (repeated from a cache, or "busy").
    Reply,
}

/// Takes items off the inbox until shutdown. Message handlers run inline (arrival order),
/// and a message is acknowledged once its handler returned; request and stream handlers run
/// as tasks owned here, each kind within its limit, and are aborted when the dispatcher ends.
///
/// The dispatcher never waits for a free slot: beyond its limit, work waits in a bounded
/// backlog (requests and streams separately), and beyond that a request is answered "busy"
/// and a stream refused. A panicking handler is caught: a request's requester gets an error
/// response, and the agent's health reports it.
pub(crate) async fn run(agent: Agent, mut inbox: Inbox, handlers: Handlers, limits: Limits) {
    let shutdown = agent.inner.shutdown.clone();
    let requests = Arc::new(Mutex::new(Requests::default()));
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let (mut running_requests, mut running_streams, mut replying) = (0usize, 0usize, 0usize);
    let mut waiting_requests: VecDeque<(Envelope, Responder)> = VecDeque::new();
    let mut waiting_streams: VecDeque<IncomingStream> = VecDeque::new();
    // The message handler's future, one message at a time, in one reused allocation.
    let mut handling = ReusableBoxFuture::new(std::future::ready(()));
    loop {
        // Shutdown closes the inbox, which wakes a wait on it: no watch on the shutdown token
        // is needed (registering one cost every agent a lock per wake-up).
        if agent.is_shut_down() {
            break;
        }
        // An item already waiting, with nothing else to attend to, is taken without a
        // select; the task's budget still makes it yield now and then.
        let waiting = if tasks.is_empty() {
            inbox.try_recv()
        } else {
            None
        };
        let item = if let Some(item) = waiting {
            tokio::task::coop::consume_budget().await;
            item
        } else {
            tokio::select! {
            biased;
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok(Done::Request) => {
                        running_requests -= 1;
                        while running_requests < limits.requests {
                            let Some((envelope, responder)) = waiting_requests.pop_front() else {
                                break;
                            };
                            if start_request(&mut tasks, &agent, &handlers, &requests, envelope, responder).await {
                                running_requests += 1;
                            }
                        }
                    }
                    Ok(Done::Reply) => replying -= 1,
                    Ok(Done::Stream) => {
                        running_streams -= 1;
                        if let Some(stream) = waiting_streams.pop_front() {
                            running_streams += 1;
                            start_stream(&mut tasks, &agent, &handlers, stream);
                        }
                    }
                    // Handler panics are caught inside the tasks; a task only fails if it
                    // was aborted, which happens at shutdown.
                    Err(e) => tracing::debug!(agent = %agent.id(), error = %e, "handler task ended abnormally"),
                }
                continue;
            }
            item = inbox.recv() => match item {
                Some(item) => item,
                None => break,
            },
            }
        };
        if agent.is_shut_down() {
            // Taken after the agent began to stop: never handled, its sender must learn so.
            item.abandon();
            break;
        }
        match item {
            Inbound::Message { envelope, receipt } => {
                announce(&agent, &envelope);
                if let Some(h) = &handlers.message {
                    let from = envelope.from.clone();
                    let traced_by = crate::trace::of(&envelope);
                    h(agent.clone(), envelope, &mut handling);
                    let run = AssertUnwindSafe(crate::trace::handling(traced_by, &mut handling))
                        .catch_unwind();
                    let mut run = std::pin::pin!(run);
                    // Most handlers finish at their first poll: they need no watch on the
                    // shutdown token (registering one per message cost more than many
                    // handlers do).
                    let outcome = match run.as_mut().now_or_never() {
                        Some(outcome) => outcome,
                        None => tokio::select! {
                            biased;
                            outcome = run => outcome,
                            () = shutdown.cancelled() => {
                                // The handler did not finish: the sender must not count it
                                // delivered.
                                receipt.abandon();
                                break;
                            }
                        },
                    };
                    if let Err(panic) = outcome {
                        agent.handler_panicked("message", &panic_message(&panic), &from);
                    }
                    // Processed (or crashed processing it): acknowledged either way, so a
                    // message that crashes its handler is not redelivered forever.
                    drop(receipt);
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
                let fresh = {
                    let mut table = requests.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(joined) = table.running.get_mut(&key) {
                        // The same request is being handled: this requester waits for it too.
                        joined.push(responder);
                        continue;
                    } else if let Some(answer) = table.answer(&key) {
                        Ok((answer, responder))
                    } else {
                        Err(responder)
                    }
                };
                match fresh {
                    Ok((answer, responder)) if replying < Limits::backlog(limits.requests) => {
                        // Answered before: the same answer again, without the handler.
                        replying += 1;
                        tasks.spawn(async move {
                            let _ = responder.respond(answer).await;
                            Done::Reply
                        });
                    }
                    // Too many answers on their way already: the requester hears the
                    // request was dropped (the responder is dropped unanswered).
                    Ok(_) => {}
                    Err(responder) if running_requests < limits.requests => {
                        if start_request(
                            &mut tasks, &agent, &handlers, &requests, envelope, responder,
                        )
                        .await
                        {
                            running_requests += 1;
                        }
                    }
                    Err(responder) if waiting_requests.len() < Limits::backlog(limits.requests) => {
                        waiting_requests.push_back((envelope, responder));
                    }
                    Err(responder) => {
                        tracing::debug!(agent = %agent.id(), from = %envelope.from, "too many requests in hand: busy");
                        if replying < Limits::backlog(limits.requests) {
                            replying += 1;
                            let busy = error_reply(
                                &agent,
                                &envelope,
                                RemoteErrorKind::Busy,
                                "too many requests in hand".into(),
                            );
                            tasks.spawn(async move {
                                let _ = responder.respond(busy).await;
                                Done::Reply
                            });
                        }
                    }
                }
            }
            Inbound::Stream(stream) => {
                if handlers.stream.is_none() {
                    tracing::debug!(agent = %agent.id(), from = %stream.header().from, "no stream handler: stream refused");
                    continue;
                }
                if running_streams < limits.streams {
                    running_streams += 1;
                    start_stream(&mut tasks, &agent, &handlers, stream);
                } else if waiting_streams.len() < Limits::backlog(limits.streams) {
                    waiting_streams.push_back(stream);
                } else {
                    tracing::debug!(agent = %agent.id(), from = %stream.header().from, "too many streams: refused");
                }
            }
        }
    }
    // Dropping the responders of aborted handlers tells their requesters; dropping the inbox
    // abandons the messages still in it, so their senders learn they were not delivered.
    tasks.shutdown().await;
    drop(waiting_requests);
    drop(waiting_streams);
    inbox.close();
}

/// Starts the handler of a request. It is polled once here: a handler that answers at once
/// (the common case) costs no task and no hand-off; one that waits goes on as a task owned
/// by `tasks`. Returns whether it did (and so holds a running slot).
async fn start_request(
    tasks: &mut JoinSet<Done>,
    agent: &Agent,
    handlers: &Handlers,
    requests: &Arc<Mutex<Requests>>,
    envelope: Envelope,
    responder: Responder,
) -> bool {
    let key = (envelope.from.clone(), envelope.id);
    requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .running
        .insert(key.clone(), Vec::new());
    let (agent, handler, requests) = (agent.clone(), handlers.request.clone(), requests.clone());
    // The same message id as the requester's span: one request followed through both sides.
    let span = tracing::info_span!(
        "request",
        id = %envelope.id,
        from = %envelope.from,
        channel = %envelope.channel
    );
    tracing::debug!(parent: &span, "request received");
    let mut work = Box::pin(tracing::Instrument::instrument(
        async move {
            let traced_by = crate::trace::of(&envelope);
            crate::trace::handling(
                traced_by,
                answer(agent, handler, envelope, responder, &requests, key),
            )
            .await;
            Done::Request
        },
        span,
    ));
    if futures::poll!(work.as_mut()).is_ready() {
        return false;
    }
    // Polled again at once by its task, which registers its own wake-ups.
    tasks.spawn(work);
    true
}

fn start_stream(
    tasks: &mut JoinSet<Done>,
    agent: &Agent,
    handlers: &Handlers,
    stream: IncomingStream,
) {
    let Some(h) = handlers.stream.clone() else {
        return;
    };
    let (id, from) = (stream.header().id, stream.header().from.clone());
    agent.emit(Event::StreamOpened {
        stream: id,
        from: from.clone(),
    });
    let agent = agent.clone();
    tasks.spawn(async move {
        if let Err(panic) = AssertUnwindSafe(h(agent.clone(), stream))
            .catch_unwind()
            .await
        {
            agent.handler_panicked("stream", &panic_message(&panic), &from);
        }
        agent.emit(Event::StreamClosed { stream: id, from });
        Done::Stream
    });
}

/// What a panic said, if it said it with a string.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// The error response to `request`.
fn error_reply(
    agent: &Agent,
    request: &Envelope,
    kind: RemoteErrorKind,
    message: String,
) -> Envelope {
    let body = aqe_core::encode(&ErrorBody { kind, message }).unwrap_or_default();
    request.reply(agent.id().clone(), MessageKind::Error, body)
}

fn announce(agent: &Agent, env: &Envelope) {
    if !agent.watched() {
        return;
    }
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
/// first, and any that sent the same request again meanwhile: they wait in `requests`); gives
/// up when all of them have. The answer is kept for later repeats, in the same step that
/// ends the run, so that a repeat finds either the run or its answer.
async fn answer(
    agent: Agent,
    handler: Option<RequestHandler>,
    request: Envelope,
    responder: Responder,
    requests: &Mutex<Requests>,
    key: RequestKey,
) {
    let lock = || requests.lock().unwrap_or_else(|p| p.into_inner());
    let me = agent.id().clone();
    let mut responders = vec![responder];
    let outcome = match handler {
        None => Err((
            RemoteErrorKind::NoHandler,
            format!("agent {me} has no request handler"),
        )),
        Some(h) => {
            let mut work = AssertUnwindSafe(h(agent.clone(), request.clone())).catch_unwind();
            loop {
                let done = tokio::select! {
                    // The handler first: one that is done at once never sets up the watch
                    // for cancellation (a timer and a waiter per request).
                    biased;
                    r = &mut work => Some(r),
                    () = all_cancelled(&mut responders) => None,
                };
                match done {
                    Some(Ok(r)) => break r.map_err(|e| (e.kind(), e.message().to_owned())),
                    Some(Err(panic)) => {
                        let message = panic_message(&panic);
                        agent.handler_panicked("request", &message, &request.from);
                        break Err((
                            RemoteErrorKind::HandlerFailed,
                            format!("the request handler panicked: {message}"),
                        ));
                    }
                    None => {
                        // Those waiting gave up; any that joined since still wait.
                        let mut table = lock();
                        let joined = table
                            .running
                            .get_mut(&key)
                            .map(std::mem::take)
                            .unwrap_or_default();
                        if joined.is_empty() {
                            table.running.remove(&key);
                            tracing::debug!(agent = %me, from = %request.from, "requester gave up; handler cancelled");
                            return;
                        }
                        responders.extend(joined);
                    }
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
        if payload.bytes.len() > limit {
            Err((
                RemoteErrorKind::HandlerFailed,
                format!(
                    "response of {} bytes exceeds the channel limit of {limit} bytes",
                    payload.bytes.len()
                ),
            ))
        } else {
            Ok(payload)
        }
    });
    let mut reply = match outcome {
        Ok(payload) => request
            .reply(me.clone(), MessageKind::Response, bytes::Bytes::new())
            .with_payload(payload),
        Err((kind, message)) => error_reply(&agent, &request, kind, message),
    };
    // The answer comes from the handler's span of the request's trace.
    if let Some(t) = crate::trace::current_trace() {
        reply.trace = Some(Box::new(t));
    }
    {
        let mut table = lock();
        responders.extend(table.running.remove(&key).unwrap_or_default());
        table.remember(key, reply.clone());
    }
    for r in responders {
        if let Err(e) = r.respond(reply.clone()).await {
            tracing::debug!(agent = %me, error = %e, "response discarded: the requester is gone");
        }
    }
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
            Ok(_) if !agent.watched() => {}
            Ok(e) => agent.emit(e),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                agent.emit(Event::Lagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
