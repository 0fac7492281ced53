//! `aqe agent NAME`: one agent whose behaviour is a program speaking JSON lines on stdio
//! (BRIDGE.md). The caller's stdin/stdout, or a child's (`-- CMD ARGS`).
//!
//! Tasks, all owned here and ended before `run` returns: the writer (events to the
//! program, in order, from one bounded queue), the event relay (fleet events), and the
//! commands waiting for the fleet (requests, confirmed sends: at most [`IN_FLIGHT`]). The
//! agent's handlers put their events on the same queue and wait for them to be written.

mod lines;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqe_agent::{Agent, HandlerError, traced};
use aqe_core::{
    AgentId, BroadcastOptions, DiscoveryOptions, Event, MessageId, Payload, RequestOptions,
    SendOptions, StreamId, StreamOptions,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::cli::AgentArgs;
use crate::error::CliError;
use crate::join;
use crate::node::wait_for_signal;
use crate::ops::{leave, wait_settled};

use lines::{Failure, Line};

/// Bridge protocol version, in the `ready` event.
const VERSION: u32 = 1;
/// Commands waiting for the fleet at once (requests, confirmed sends).
const IN_FLIGHT: usize = 256;
/// Events waiting to be written.
const QUEUE: usize = 1024;
/// How long a request waits for the program's `reply`.
const REPLY_WAIT: Duration = Duration::from_secs(300);
/// The most `--max-line` may be.
const MAX_LINE_LIMIT: usize = 256 << 20;

/// An event for the program; `written` hears once it is written and flushed.
struct Out {
    event: Value,
    written: Option<oneshot::Sender<()>>,
}

/// The queue to the writer.
#[derive(Clone)]
struct Events(mpsc::Sender<Out>);

impl Events {
    /// Queues `event` (waiting for room).
    async fn emit(&self, event: Value) {
        let _ = self
            .0
            .send(Out {
                event,
                written: None,
            })
            .await;
    }

    /// Queues `event` and waits until the program has it (written and flushed); false if
    /// the program is gone.
    async fn deliver(&self, event: Value) -> bool {
        let (tx, rx) = oneshot::channel();
        let out = Out {
            event,
            written: Some(tx),
        };
        self.0.send(out).await.is_ok() && rx.await.is_ok()
    }
}

/// What the program answered a request with.
enum Answer {
    Payload(Payload),
    Error(String),
}

/// Requests waiting for the program's `reply`, by id. Bounded by the agent's request
/// handlers (each holds one entry while it runs).
type Pending = Arc<Mutex<HashMap<MessageId, oneshot::Sender<Answer>>>>;

/// Removes a request's entry when its handler ends (answered, or cancelled because the
/// requester gave up).
struct Unregister(Pending, MessageId);

impl Drop for Unregister {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) async fn run(a: AgentArgs) -> Result<(), CliError> {
    if !(1024..=MAX_LINE_LIMIT).contains(&a.max_line) {
        return Err(CliError::Usage(
            "--max-line is between 1024 and 268435456 bytes",
        ));
    }
    let joined = join::transport(&a.join, true).await?;
    let mut transports = Vec::new();
    if joined.quic.is_some() {
        transports.push("quic");
    }
    if joined.nats.is_some() {
        transports.push("nats");
    }
    let (tx, rx) = mpsc::channel::<Out>(QUEUE);
    let events = Events(tx);
    // First on the queue: nothing the agent receives can come before it.
    events
        .emit(json!({
            "type": "ready",
            "bridge": VERSION,
            "agent": a.agent,
            "agentType": a.agent_type,
            "at": joined.at(),
            "transports": transports,
        }))
        .await;
    let pending: Pending = Arc::default();
    let me = match start_agent(&a, joined.transport.clone(), &events, &pending).await {
        Ok(me) => me,
        Err(e) => {
            joined.transport.shutdown().await;
            return Err(e);
        }
    };
    let (input, output, mut child): (Box<dyn AsyncRead + Unpin + Send>, _, _) =
        if a.program.is_empty() {
            let out: Box<dyn AsyncWrite + Unpin + Send> = Box::new(tokio::io::stdout());
            (Box::new(tokio::io::stdin()), out, None)
        } else {
            match spawn(&a.program) {
                Ok((i, o, c)) => (i, o, Some(c)),
                Err(e) => {
                    leave(&me).await;
                    return Err(e);
                }
            }
        };
    // Resolves when the writer ends: the program no longer reads (or all is written).
    let (written_all, mut output_gone) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        write_events(rx, output).await;
        drop(written_all);
    });
    let relay = tokio::spawn(relay_events(me.clone(), events.clone()));
    let mut session = Session {
        join: Arc::new(a.join.clone()),
        me: me.clone(),
        events: events.clone(),
        pending,
        outgoing: HashMap::new(),
        waiting: JoinSet::new(),
        room: Arc::new(Semaphore::new(IN_FLIGHT)),
    };
    let mut input = BufReader::new(input);
    let mut buf = Vec::new();
    let ended = loop {
        let line = tokio::select! {
            l = lines::read_line(&mut input, &mut buf, a.max_line) => l,
            () = wait_for_signal() => break End::Signal,
            status = wait_child(&mut child) => break End::Child(status),
            _ = &mut output_gone => break End::Output,
        };
        match line {
            Ok(Line::Full) => {
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if session.command(&buf).await == Flow::Leave {
                    break End::Input;
                }
            }
            Ok(Line::TooLong) => {
                let f = Failure::new(
                    "lineTooLong",
                    format!("a line is at most {} bytes (--max-line)", a.max_line),
                );
                events.emit(lines::error(&Value::Null, None, &f)).await;
            }
            Ok(Line::Eof) | Err(_) => break End::Input,
        }
        // Answered commands leave the set as they finish.
        while session.waiting.try_join_next().is_some() {}
    };
    tracing::debug!(?ended, "the bridge ends");
    if matches!(ended, End::Input) {
        // The program said all it had to: the answers to what it asked still come (each
        // command waits no longer than its own timeout).
        while session.waiting.join_next().await.is_some() {}
    }
    session.waiting.abort_all();
    while session.waiting.join_next().await.is_some() {}
    wait_settled(&me).await;
    relay.abort();
    leave(&me).await;
    drop(session);
    drop(events);
    // The writer ends once every sender is gone (the agent's handlers went with it): with
    // a child, that closes its stdin.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let status = match (ended, child.as_mut()) {
        (End::Child(status), _) => status,
        (_, Some(c)) => match tokio::time::timeout(Duration::from_secs(2), c.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = c.kill().await;
                c.wait().await.ok()
            }
        },
        (_, None) => None,
    };
    match status {
        Some(s) if !s.success() => Err(CliError::Child(s.code().unwrap_or(1))),
        _ => Ok(()),
    }
}

#[derive(Debug)]
enum End {
    Input,
    /// Nobody reads the events any more.
    Output,
    Signal,
    Child(Option<std::process::ExitStatus>),
}

#[derive(PartialEq)]
enum Flow {
    Go,
    Leave,
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> Option<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await.ok(),
        None => std::future::pending().await,
    }
}

type Io = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
    tokio::process::Child,
);

/// The child program, its stdout the bridge's input and its stdin the bridge's output.
fn spawn(program: &[String]) -> Result<Io, CliError> {
    let mut child = tokio::process::Command::new(&program[0])
        .args(&program[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CliError::File {
            path: program[0].clone().into(),
            source,
        })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(CliError::Usage("the child's stdio could not be piped"));
    };
    Ok((Box::new(stdout), Box::new(stdin), child))
}

/// Writes queued events, one line each; flushes when the queue is empty, then tells those
/// waiting that their events are written.
async fn write_events(mut rx: mpsc::Receiver<Out>, mut out: Box<dyn AsyncWrite + Unpin + Send>) {
    let mut batch = Vec::new();
    let mut text = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        text.clear();
        for o in &batch {
            if serde_json::to_writer(&mut text, &o.event).is_ok() {
                text.push(b'\n');
            }
        }
        if out.write_all(&text).await.is_err() || out.flush().await.is_err() {
            // The program is gone: nothing is written any more, and nobody is told it was.
            return;
        }
        for o in batch.drain(..) {
            if let Some(w) = o.written {
                let _ = w.send(());
            }
        }
    }
    let _ = out.shutdown().await;
}

/// The fleet events the program sees (BRIDGE.md section 4).
async fn relay_events(me: Agent, events: Events) {
    let mut stream = me.events();
    // Agents known before the program could hear of them (joining learnt them) come first;
    // each agent is announced once until it leaves.
    let mut known = std::collections::HashSet::new();
    for p in me.discover_peers(&DiscoveryOptions::default()) {
        if &p.id != me.id() && known.insert(p.id.clone()) {
            events
                .emit(json!({"type": "peerJoined", "peer": lines::peer(&p)}))
                .await;
        }
    }
    while let Some(e) = stream.recv().await {
        let event = match e {
            Event::PeerDiscovered(p) if &p.id != me.id() && known.insert(p.id.clone()) => {
                json!({"type": "peerJoined", "peer": lines::peer(&p)})
            }
            Event::PeerLeft(id) if known.remove(&id) => {
                json!({"type": "peerLeft", "agent": id.as_str()})
            }
            Event::DeliveryFailed {
                from,
                to,
                channel,
                ids,
                reason,
            } if &from == me.id() => json!({
                "type": "deliveryFailed",
                "to": to.as_str(),
                "channel": channel.as_str(),
                "ids": ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "reason": lines::reason_name(reason),
            }),
            Event::ConnectionLost { addr, reason } => {
                json!({"type": "connectionLost", "addr": addr.to_string(), "reason": reason})
            }
            Event::ConnectionEstablished { addr } => {
                json!({"type": "connectionEstablished", "addr": addr.to_string()})
            }
            Event::SlowConsumer {
                agent,
                channel,
                dropped,
                total,
                waiting,
            } if &agent == me.id() => json!({
                "type": "slowConsumer",
                "channel": channel.as_str(),
                "dropped": dropped,
                "total": total,
                "waiting": waiting,
            }),
            _ => continue,
        };
        events.emit(event).await;
    }
}

/// The agent, its handlers handing what arrives to the program.
async fn start_agent(
    a: &AgentArgs,
    transport: Arc<dyn aqe_core::Transport>,
    events: &Events,
    pending: &Pending,
) -> Result<Agent, CliError> {
    let (on_message, on_request, on_stream) = (events.clone(), events.clone(), events.clone());
    let pending = pending.clone();
    let streams = Arc::new(AtomicU64::new(1));
    let mut b = Agent::builder()
        .id(a.agent.as_str())
        .agent_type(a.agent_type.as_str())
        .inbox_capacity(a.inbox)
        .transport(transport)
        .on_message(move |_, env| {
            let events = on_message.clone();
            // Taken once the program has the line. When it cannot have it (it stopped
            // reading), the handler never ends: the bridge is leaving, and a handler cut
            // short by the agent's shutdown leaves the message untaken, as it is.
            async move {
                if !events.deliver(lines::inbound("message", &env)).await {
                    std::future::pending::<()>().await;
                }
            }
        })
        .on_request_payload(move |_, env| {
            let (events, pending) = (on_request.clone(), pending.clone());
            async move {
                let (tx, rx) = oneshot::channel();
                {
                    let mut p = lock(&pending);
                    if p.contains_key(&env.id) {
                        return Err(HandlerError::new("a request with this id is in hand"));
                    }
                    p.insert(env.id, tx);
                }
                let _unregister = Unregister(pending.clone(), env.id);
                if !events.deliver(lines::inbound("request", &env)).await {
                    return Err(HandlerError::new("the agent's program is gone"));
                }
                match tokio::time::timeout(REPLY_WAIT, rx).await {
                    Ok(Ok(Answer::Payload(p))) => Ok(p),
                    Ok(Ok(Answer::Error(m))) => Err(HandlerError::new(m)),
                    _ => Err(HandlerError::new("the agent's program did not answer")),
                }
            }
        })
        .on_stream(move |_, mut stream| {
            let events = on_stream.clone();
            let n = streams.fetch_add(1, Ordering::Relaxed);
            async move {
                let h = stream.header();
                events
                    .emit(json!({
                        "type": "streamOpened",
                        "stream": n,
                        "from": h.from.as_str(),
                        "channel": h.options.channel.as_str(),
                    }))
                    .await;
                let mut closed = json!({"type": "streamClosed", "stream": n});
                loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            let mut e = json!({"type": "chunk", "stream": n, "fin": chunk.fin});
                            lines::put_bytes(&mut e, &chunk.data);
                            events.deliver(e).await;
                            if chunk.fin {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            closed["error"] = json!(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
                events.emit(closed).await;
            }
        });
    for c in &a.capabilities {
        b = b.capability(c.as_str());
    }
    Ok(b.start().await?)
}

/// Runs `work` in `trace`, when the command gave one.
async fn in_trace<F: Future>(trace: Option<aqe_core::TraceParent>, work: F) -> F::Output {
    match trace {
        Some(t) => traced(t, work).await,
        None => work.await,
    }
}

/// Waits until `to` is known, as the other commands do: up to `--wait`, or until the
/// fleet's membership has settled without it (then `notFound`, naming the closest agents).
async fn known(me: &Agent, to: &AgentId, join: &crate::cli::Join) -> Result<(), Failure> {
    join::agent_known(me, to, join)
        .await
        .map_err(|e| Failure::new("notFound", e.to_string()))
}

/// The commands' side of one bridge.
struct Session {
    /// How the agent joined: how long to wait for an agent not known yet.
    join: Arc<crate::cli::Join>,
    me: Agent,
    events: Events,
    pending: Pending,
    /// Streams the program opened, by the number `streamOpen` answered.
    outgoing: HashMap<u64, StreamId>,
    /// Commands waiting for the fleet.
    waiting: JoinSet<()>,
    room: Arc<Semaphore>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendCmd {
    to: String,
    channel: Option<String>,
    ttl_ms: Option<u64>,
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestCmd {
    to: String,
    channel: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    retries: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BroadcastCmd {
    channel: Option<String>,
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize)]
struct ReplyCmd {
    id: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct OpenCmd {
    to: String,
    channel: Option<String>,
}

#[derive(Deserialize)]
struct WriteCmd {
    stream: u64,
    #[serde(default)]
    fin: bool,
    #[serde(default)]
    ack: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DiscoverCmd {
    agent_type: Option<String>,
    capability: Option<String>,
    channel: Option<String>,
    limit: Option<usize>,
}

impl Session {
    /// Carries out one line.
    async fn command(&mut self, line: &[u8]) -> Flow {
        let c = match lines::command(line) {
            Ok(c) => c,
            Err((reference, f)) => {
                self.events.emit(lines::error(&reference, None, &f)).await;
                return Flow::Go;
            }
        };
        if c.op == "leave" {
            return Flow::Leave;
        }
        let answer = self.carry_out(&c).await;
        match answer {
            Ok(None) => {}
            Ok(Some(fields)) => self.events.emit(lines::ok(&c.reference, fields)).await,
            Err(f) => {
                self.events
                    .emit(lines::error(&c.reference, Some(&c.op), &f))
                    .await;
            }
        }
        Flow::Go
    }

    /// What the command answers (`None`: nothing now), or why it failed.
    async fn carry_out(&mut self, c: &lines::Command) -> Result<Option<Value>, Failure> {
        let body = &c.body;
        let trace = lines::trace(body)?;
        match c.op.as_str() {
            "send" => {
                let cmd: SendCmd = lines::fields(body)?;
                let payload = lines::payload(body)?;
                let mut options = SendOptions::on(cmd.channel.as_deref().unwrap_or("coordination"));
                options.ttl = cmd.ttl_ms.map(Duration::from_millis);
                options.confirm = cmd.confirm;
                let to = AgentId::from(cmd.to.as_str());
                let (me, join) = (self.me.clone(), self.join.clone());
                let send = async move {
                    known(&me, &to, &join).await?;
                    let send = me.send_payload_with(&to, payload, options);
                    in_trace(trace, send).await.map_err(Failure::from)
                };
                if !cmd.confirm {
                    let id = send.await?;
                    return Ok(Some(json!({"id": id.to_string()})));
                }
                self.wait_for(c, async move {
                    send.await.map(|id| json!({"id": id.to_string()}))
                })
                .await;
                Ok(None)
            }
            "request" => {
                let cmd: RequestCmd = lines::fields(body)?;
                let payload = lines::payload(body)?;
                let options = RequestOptions {
                    timeout: Duration::from_millis(cmd.timeout_ms.unwrap_or(30_000)),
                    retries: cmd.retries,
                    channel: cmd.channel.as_deref().unwrap_or("results").into(),
                    ..RequestOptions::default()
                };
                let to = AgentId::from(cmd.to.as_str());
                let (me, join) = (self.me.clone(), self.join.clone());
                let reference = c.reference.clone();
                let events = self.events.clone();
                let op = c.op.clone();
                self.spawn(async move {
                    let answer = async {
                        known(&me, &to, &join).await?;
                        let ask = me.request_payload(&to, payload, options);
                        in_trace(trace, ask).await.map_err(Failure::from)
                    }
                    .await;
                    let event = match answer {
                        Ok(env) => {
                            let mut e = json!({
                                "type": "response",
                                "ref": reference,
                                "from": env.from.as_str(),
                                "id": env.id.to_string(),
                            });
                            lines::put_payload(&mut e, &env);
                            e
                        }
                        Err(f) => lines::error(&reference, Some(&op), &f),
                    };
                    events.emit(event).await;
                })
                .await;
                Ok(None)
            }
            "broadcast" => {
                let cmd: BroadcastCmd = lines::fields(body)?;
                let payload = lines::payload(body)?;
                let options = BroadcastOptions {
                    channel: cmd.channel.as_deref().unwrap_or("coordination").into(),
                    confirm: cmd.confirm,
                    ..BroadcastOptions::default()
                };
                let go = self.me.broadcast_payload(payload, options);
                let report = in_trace(trace, go).await?;
                let failed: Vec<Value> = report
                    .failed
                    .iter()
                    .map(|(id, e)| {
                        let f = Failure::of(e);
                        json!({"agent": id.as_str(), "code": f.code, "message": f.message})
                    })
                    .collect();
                Ok(Some(json!({
                    "id": report.id.to_string(),
                    "delivered": report.delivered.iter().map(|i| i.as_str()).collect::<Vec<_>>(),
                    "failed": failed,
                })))
            }
            "reply" => {
                let cmd: ReplyCmd = lines::fields(body)?;
                let answer = match cmd.error {
                    Some(m) => Answer::Error(m),
                    None => Answer::Payload(lines::payload(body)?),
                };
                let id = u64::from_str_radix(&cmd.id, 16)
                    .map(MessageId)
                    .map_err(|_| Failure::new("badField", "id: 16 hex digits"))?;
                let waiting = lock(&self.pending).remove(&id);
                match waiting.map(|tx| tx.send(answer)) {
                    Some(Ok(())) => Ok(None),
                    _ => Err(Failure::new(
                        "unknownRequest",
                        format!("no request {} waits for a reply", cmd.id),
                    )),
                }
            }
            "streamOpen" => {
                let cmd: OpenCmd = lines::fields(body)?;
                let options = StreamOptions {
                    channel: cmd.channel.as_deref().unwrap_or("coordination").into(),
                    ..StreamOptions::default()
                };
                let to = AgentId::from(cmd.to.as_str());
                known(&self.me, &to, &self.join).await?;
                let open = self.me.open_stream(&to, options);
                let id = in_trace(trace, open).await?;
                self.outgoing.insert(id.0, id);
                Ok(Some(json!({"stream": id.0})))
            }
            "streamWrite" => {
                let cmd: WriteCmd = lines::fields(body)?;
                let data = lines::data(body)?;
                let id = self.stream(cmd.stream)?;
                self.me
                    .write_stream(id, bytes::Bytes::from(data), cmd.fin)
                    .await?;
                if cmd.fin {
                    self.outgoing.remove(&cmd.stream);
                }
                Ok(cmd.ack.then(|| json!({"stream": cmd.stream})))
            }
            "streamClose" => {
                let cmd: WriteCmd = lines::fields(body)?;
                let id = self.stream(cmd.stream)?;
                self.outgoing.remove(&cmd.stream);
                self.me.close_stream(id).await?;
                Ok(None)
            }
            "discover" => {
                let cmd: DiscoverCmd = lines::fields(body)?;
                let mut options = DiscoveryOptions {
                    max_peers: cmd.limit,
                    channels: cmd.channel.into_iter().map(Into::into).collect(),
                    ..DiscoveryOptions::default()
                };
                if cmd.agent_type.is_some() || cmd.capability.is_some() {
                    let (t, cap) = (cmd.agent_type, cmd.capability);
                    options = options.with_filter(move |p| {
                        t.as_deref().is_none_or(|t| p.agent_type.as_str() == t)
                            && cap
                                .as_deref()
                                .is_none_or(|c| p.capabilities.iter().any(|x| x.as_str() == c))
                    });
                }
                let peers: Vec<Value> = self
                    .me
                    .discover_peers(&options)
                    .iter()
                    .map(lines::peer)
                    .collect();
                Ok(Some(json!({"peers": peers})))
            }
            "stats" => {
                let s = self.me.stats();
                let h = self.me.health();
                Ok(Some(json!({
                    "stats": {
                        "messagesSent": s.messages_sent,
                        "messagesReceived": s.messages_received,
                        "messagesFailed": s.messages_failed,
                        "messagesDropped": s.messages_dropped,
                        "messagesUnconfirmed": s.messages_unconfirmed,
                        "bytesSent": s.bytes_sent,
                        "bytesReceived": s.bytes_received,
                        "activeStreams": s.active_streams,
                        "uptimeMs": s.uptime.as_millis() as u64,
                    },
                    "health": {
                        "status": format!("{:?}", h.status).to_lowercase(),
                        "connectedPeers": h.connected_peers,
                        "message": h.message,
                    },
                    "inboxDepth": self.me.inbox_depth(),
                })))
            }
            other => Err(Failure::new("unknownOp", format!("no command {other:?}"))),
        }
    }

    fn stream(&self, n: u64) -> Result<StreamId, Failure> {
        self.outgoing
            .get(&n)
            .copied()
            .ok_or_else(|| Failure::new("stream", format!("no open stream {n}")))
    }

    /// Runs `work` beside the reading of commands (waiting while [`IN_FLIGHT`] already do);
    /// its answer is the command's.
    async fn wait_for(
        &mut self,
        c: &lines::Command,
        work: impl Future<Output = Result<Value, Failure>> + Send + 'static,
    ) {
        let (reference, op, events) = (c.reference.clone(), c.op.clone(), self.events.clone());
        self.spawn(async move {
            let event = match work.await {
                Ok(fields) => lines::ok(&reference, fields),
                Err(f) => lines::error(&reference, Some(&op), &f),
            };
            events.emit(event).await;
        })
        .await;
    }

    async fn spawn(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        let Ok(permit) = self.room.clone().acquire_owned().await else {
            return;
        };
        self.waiting.spawn(async move {
            work.await;
            drop(permit);
        });
    }
}
