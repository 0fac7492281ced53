//! The commands that join a fleet as an agent: send, request, broadcast, reply, listen, peers.

use std::process::Stdio;
use std::sync::Arc;

use aqe_agent::{Agent, HandlerError};
use aqe_core::{AgentId, BroadcastOptions, Payload, RequestOptions};
use tokio::io::AsyncWriteExt;

use crate::cli::{
    BroadcastArgs, Join, ListenArgs, PeersArgs, ReplyArgs, RequestArgs, SendArgs, StreamArgs,
};
use crate::error::CliError;
use crate::join;
use crate::node::wait_for_signal;
use crate::payload;

/// An agent of the fleet, on a fresh endpoint joined as `j` says.
async fn agent(j: &Join, id: Option<&str>, agent_type: &str) -> Result<Agent, CliError> {
    let transport = join::transport(j, false).await?.transport;
    let mut b = Agent::builder()
        .agent_type(agent_type)
        .transport(transport.clone());
    if let Some(id) = id {
        b = b.id(id);
    }
    match b.start().await {
        Ok(agent) => Ok(agent),
        Err(e) => {
            transport.shutdown().await;
            Err(e.into())
        }
    }
}

/// Says on stderr, at any verbosity, when a long-running command loses the connection to a
/// bootstrap endpoint (its endpoint re-dials it, with backoff) and when it is back; ends when
/// dropped.
struct ConnectionReports(tokio::task::JoinHandle<()>);

impl ConnectionReports {
    fn start(me: &Agent, bootstrap: &[String]) -> Self {
        let mut events = me.events();
        let bootstrap = bootstrap.to_vec();
        Self(tokio::spawn(async move {
            let mut lost = std::collections::HashSet::new();
            while let Some(e) = events.recv().await {
                match e {
                    aqe_core::Event::ConnectionLost { addr, reason }
                        if bootstrap.contains(&addr.to_string()) =>
                    {
                        eprintln!("aqe: lost the connection to {addr} ({reason}); reconnecting");
                        lost.insert(addr);
                    }
                    aqe_core::Event::ConnectionEstablished { addr } if lost.remove(&addr) => {
                        eprintln!("aqe: connected to {addr} again");
                    }
                    _ => {}
                }
            }
        }))
    }
}

impl Drop for ConnectionReports {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shuts the agent down and closes its endpoint, telling its peers at once (a process that
/// just exits leaves them to notice its silence).
pub(crate) async fn leave(me: &Agent) {
    me.shutdown().await;
    me.transport().shutdown().await;
}

pub(crate) async fn send(a: SendArgs) -> Result<(), CliError> {
    let payload = payload::from_args(&a.payload).await?;
    let me = agent(&a.join, None, "cli").await?;
    let to = AgentId::from(a.to.as_str());
    let outcome = async {
        join::agent_known(&me, &to, &a.join).await?;
        // Returns once the receiving agent has taken it: a command line has nothing to come
        // back to, so "accepted" would not say enough.
        let env_id = me.send_payload(&to, payload, a.channel.as_str()).await?;
        let confirmed = me.stats();
        tracing::debug!(id = %env_id, ?confirmed, "sent");
        wait_settled(&me).await;
        println!("sent {env_id} to {to}");
        Ok(())
    }
    .await;
    // Whatever happened: the endpoint says goodbye, so its name is free at once.
    leave(&me).await;
    outcome
}

/// Waits (briefly) until what this agent sent is settled, so that exiting loses nothing.
pub(crate) async fn wait_settled(me: &Agent) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let s = me.stats();
        if s.messages_unconfirmed == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub(crate) async fn request(a: RequestArgs) -> Result<(), CliError> {
    let payload = payload::from_args(&a.payload).await?;
    let me = agent(&a.join, None, "cli").await?;
    let to = AgentId::from(a.to.as_str());
    let options = RequestOptions {
        timeout: a.timeout,
        retries: a.retries,
        ..RequestOptions::default()
    };
    let outcome = async {
        join::agent_known(&me, &to, &a.join).await?;
        let started = std::time::Instant::now();
        let response = me.request_payload(&to, payload, options).await?;
        Ok::<_, CliError>((response, started.elapsed()))
    }
    .await;
    leave(&me).await;
    let (response, elapsed) = outcome?;
    match a.format {
        crate::cli::Format::Text => println!("{}", payload::show(&response)),
        crate::cli::Format::Json => println!("{}", payload::document(&response, elapsed)),
    }
    Ok(())
}

pub(crate) async fn broadcast(a: BroadcastArgs) -> Result<(), CliError> {
    let payload = payload::from_args(&a.payload).await?;
    let me = agent(&a.join, None, "cli").await?;
    join::peers_known(&me, a.min_peers, a.join.wait).await;
    let options = BroadcastOptions {
        channel: a.channel.as_str().into(),
        confirm: a.confirm,
        ..BroadcastOptions::default()
    };
    let report = me.broadcast_payload(payload, options).await;
    wait_settled(&me).await;
    leave(&me).await;
    let report = report?;
    let verb = if a.confirm { "taken by" } else { "sent to" };
    for id in &report.delivered {
        println!("{verb} {id}");
    }
    for (id, e) in &report.failed {
        println!("failed {id}: {e}");
    }
    if report.delivered.is_empty() {
        return Err(CliError::Unreachable(aqe_core::Error::PeerNotFound {
            peer: AgentId::from("(any agent on the channel)"),
        }));
    }
    Ok(())
}

pub(crate) async fn reply(a: ReplyArgs) -> Result<(), CliError> {
    if !a.echo && a.command.is_none() {
        return Err(CliError::Usage("give --echo or --command CMD"));
    }
    let transport = join::transport(&a.join, true).await?.transport;
    let (served_tx, mut served) = tokio::sync::mpsc::channel::<()>(64);
    let command = a.command.clone().map(Arc::new);
    let me = Agent::builder()
        .id(a.agent.as_str())
        .agent_type(a.agent_type.as_str())
        .transport(transport)
        .on_request_payload(move |_agent, req| {
            let command = command.clone();
            let served = served_tx.clone();
            async move {
                eprintln!("request from {}: {}", req.from, payload::show(&req));
                let answer = match command {
                    None => Ok(Payload {
                        encoding: req.encoding,
                        bytes: req.payload.clone(),
                    }),
                    Some(cmd) => run_command(&cmd, &req.payload).await,
                };
                let _ = served.send(()).await;
                answer
            }
        })
        .start()
        .await?;
    println!("agent {} answering", me.id());
    let _watch = ConnectionReports::start(&me, &a.join.bootstrap);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = wait_for_signal() => break,
            r = served.recv() => {
                if r.is_none() { break; }
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    // Let the last answer leave.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
    leave(&me).await;
    Ok(())
}

/// The command's output for `input` on its stdin: JSON when it is JSON, else raw.
async fn run_command(cmd: &str, input: &[u8]) -> Result<Payload, HandlerError> {
    let fail = |m: String| HandlerError::new(m);
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run {cmd:?}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .await
            .map_err(|e| fail(format!("{cmd:?} did not read its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!("{cmd:?} exited with {}", out.status)));
    }
    Ok(Payload::json_text(out.stdout.clone()).unwrap_or_else(|_| Payload::raw(out.stdout)))
}

pub(crate) async fn stream(a: StreamArgs) -> Result<(), CliError> {
    use tokio::io::AsyncBufReadExt;
    let me = agent(&a.join, None, "cli").await?;
    let to = AgentId::from(a.to.as_str());
    if let Err(e) = join::agent_known(&me, &to, &a.join).await {
        leave(&me).await;
        return Err(e);
    }
    let options = aqe_core::StreamOptions {
        channel: a.channel.as_str().into(),
        ..aqe_core::StreamOptions::default()
    };
    let outcome = async {
        let id = me.open_stream(&to, options).await?;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut n = 0u64;
        loop {
            let line = tokio::select! {
                l = lines.next_line() => l,
                () = wait_for_signal() => Ok(None),
            };
            match line {
                Ok(Some(line)) => {
                    me.write_stream(id, bytes::Bytes::from(line + "\n"), false)
                        .await?;
                    n += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        me.close_stream(id).await?;
        Ok::<_, aqe_core::Error>(n)
    }
    .await;
    leave(&me).await;
    let n = outcome?;
    eprintln!("streamed {n} lines to {to}");
    Ok(())
}

pub(crate) async fn listen(a: ListenArgs) -> Result<(), CliError> {
    let joined = join::transport(&a.join, true).await?;
    let (transport, at) = (joined.transport.clone(), joined.at());
    let (tx, mut got) = tokio::sync::mpsc::channel::<String>(1024);
    let streamed = tx.clone();
    let me = Agent::builder()
        .id(a.agent.as_str())
        .agent_type(a.agent_type.as_str())
        .transport(transport)
        .on_message(move |_agent, env| {
            let tx = tx.clone();
            async move {
                let line = format!("{} [{}] {}", env.from, env.channel, payload::show(&env));
                let _ = tx.send(line).await;
            }
        })
        .on_stream(move |_agent, mut stream| {
            let tx = streamed.clone();
            async move {
                let from = stream.header().from.clone();
                while let Some(Ok(chunk)) = stream.next().await {
                    let text = String::from_utf8_lossy(&chunk.data);
                    for line in text.lines() {
                        let _ = tx.send(format!("{from} [stream] {line}")).await;
                    }
                    if chunk.fin {
                        break;
                    }
                }
            }
        })
        .start()
        .await?;
    // Where others bootstrap from: the address this endpoint accepts on.
    println!("agent {} listening at {at}", me.id());
    let _watch = ConnectionReports::start(&me, &a.join.bootstrap);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = wait_for_signal() => break,
            line = got.recv() => {
                let Some(line) = line else { break };
                println!("{line}");
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    break;
                }
            }
        }
    }
    leave(&me).await;
    Ok(())
}

pub(crate) async fn peers(a: PeersArgs) -> Result<(), CliError> {
    let me = agent(&a.join, None, "cli").await?;
    join::peers_known(&me, a.min_peers, a.join.wait).await;
    let peers = me.discover_peers(&Default::default());
    if a.format == crate::cli::Format::Json {
        println!("{}", json(&peers));
    } else if !peers.is_empty() {
        println!("id\ttype\tstate\tchannels");
    }
    for p in peers
        .iter()
        .filter(|_| a.format == crate::cli::Format::Text)
    {
        let channels: Vec<&str> = p.channels.iter().map(|c| c.as_str()).collect();
        println!(
            "{}\t{}\t{:?}\t{}",
            p.id,
            p.agent_type,
            p.state,
            channels.join(",")
        );
    }
    leave(&me).await;
    if peers.is_empty() {
        return Err(CliError::Unreachable(aqe_core::Error::PeerNotFound {
            peer: AgentId::from("(any agent)"),
        }));
    }
    Ok(())
}

/// `value` as one JSON document.
pub(crate) fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
