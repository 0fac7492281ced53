//! A probe for delivery checks across processes and hosts.
//!
//! - [`write_certs`] makes a fleet CA; each probe process issues itself a node certificate.
//! - [`receive`] runs receiving agents (one, or several on one endpoint) that print one line
//!   per message they take, *before* the handler returns (so before the message is
//!   acknowledged): `M <channel> <n> <redelivered> <agent>`. A process killed at any moment
//!   has printed everything it acknowledged.
//! - [`send`] runs a sender that accounts for every message: accepted (then confirmed or
//!   reported failed) or refused at once.
//!
//! The delivery tests run the receiver as a separate process and kill it with SIGKILL;
//! `cargo xtask lab` runs both in network namespaces with packet loss. Payloads are a `u32`
//! counter, so that every line names the message it is about.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aqe_agent::aqe_nats::NatsConfig;
use aqe_agent::aqe_quic::certs::FleetCa;
use aqe_agent::aqe_quic::{QuicConfig, SecurityConfig};
use aqe_agent::{
    Agent, EventBus, Fallback, FallbackPolicy, HandlerError, NatsTransport, QuicTransport,
};
use aqe_core::{
    AgentId, BroadcastOptions, ChannelName, DeliveryFailure, Event, MessageId, RequestOptions,
    SendOptions, Transport,
};
use tokio::io::AsyncWriteExt;

/// The fleet CA's certificate, in a certificate directory.
pub const CA_FILE: &str = "ca.pem";
/// The fleet CA's key: a probe issues itself a node certificate with it the first time it
/// runs under its name, and keeps it: a probe restarted under the same name holds the same
/// key (a restart: a newer incarnation of that key), one of another name a key of its own.
pub const CA_KEY_FILE: &str = "ca.key";

/// Writes a fleet CA (certificate and key) into `dir`.
///
/// # Errors
/// When a file cannot be written or the CA made.
pub fn write_certs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca = FleetCa::generate("aqe probe CA")?;
    std::fs::write(dir.join(CA_FILE), ca.cert_pem())?;
    std::fs::write(dir.join(CA_KEY_FILE), ca.key_pem())?;
    Ok(())
}

/// How a probe endpoint runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where it listens (port 0 picks one).
    pub listen: SocketAddr,
    /// The endpoint it keeps connecting to, if any.
    pub peer: Option<SocketAddr>,
    /// The directory [`write_certs`] filled (mutual TLS with that CA).
    pub certs: PathBuf,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Liveness timeout.
    pub liveness: Duration,
    /// Delivery deadline.
    pub deadline: Duration,
    /// A NATS server: the endpoint's transport is then the chain QUIC, NATS, bus.
    pub nats: Option<String>,
    /// Its certificate's name in `certs` (`NAME.pem`, `NAME.key`): issued the first time,
    /// kept since. By default its agent's id.
    pub name: Option<String>,
    /// A receiver's message handler takes this long per message (a slow consumer).
    pub handler_delay: Duration,
    /// A receiver's inbox capacity, in items.
    pub inbox: usize,
    /// How many agents a receiver hosts: one, named as asked, or `N` named `<id>-0` ..
    /// `<id>-<N-1>` (a broadcast then reaches several agents of one endpoint: one frame
    /// carrying a copy for each).
    pub agents: usize,
}

/// The probes' channels: the three presets, and `drops` (unicast, unordered, reliable,
/// `dropNewest`: a full inbox drops and reports what comes on it).
pub fn channels() -> Vec<aqe_core::Channel> {
    let mut c = aqe_core::default_channels();
    c.push(
        aqe_core::Channel::new("drops", aqe_core::ChannelKind::Unicast)
            .with_ordered(false)
            .with_slow_consumer(aqe_core::SlowConsumer::DropNewest),
    );
    c
}

impl Options {
    /// A probe listening at `listen`, with certificates from `certs`, and the default
    /// timings.
    pub fn new(listen: SocketAddr, certs: impl Into<PathBuf>) -> Self {
        let defaults = QuicConfig::default();
        Self {
            listen,
            peer: None,
            certs: certs.into(),
            heartbeat: defaults.heartbeat_interval,
            liveness: defaults.liveness_timeout,
            deadline: defaults.delivery_deadline,
            nats: None,
            name: None,
            handler_delay: Duration::ZERO,
            inbox: 4096,
            agents: 1,
        }
    }

    /// These options, with the certificate name `name` unless one is set.
    fn named(&self, name: &str) -> Options {
        let mut o = self.clone();
        o.name.get_or_insert_with(|| name.to_owned());
        o
    }

    fn cert_name(&self) -> &str {
        self.name.as_deref().unwrap_or("probe")
    }

    /// The QUIC configuration these options describe, with the node certificate of its name.
    pub fn quic_config(&self) -> QuicConfig {
        QuicConfig {
            host: self.listen.ip().to_string(),
            port: self.listen.port(),
            heartbeat_interval: self.heartbeat,
            liveness_timeout: self.liveness,
            delivery_deadline: self.deadline,
            bootstrap_peers: self.peer.iter().map(ToString::to_string).collect(),
            security: SecurityConfig {
                cert_path: Some(self.certs.join(format!("{}.pem", self.cert_name()))),
                key_path: Some(self.certs.join(format!("{}.key", self.cert_name()))),
                ca_path: Some(self.certs.join(CA_FILE)),
                verify_peer: true,
                ..SecurityConfig::default()
            },
            ..QuicConfig::default()
        }
    }

    /// Binds a QUIC endpoint as these options say, with the node certificate of its name
    /// (issued by the fleet CA the first time; a busy port is retried for a few seconds: a
    /// restarted probe may find its predecessor's socket not yet released).
    ///
    /// # Errors
    /// When the CA cannot be read or the endpoint bound.
    pub async fn bind(&self) -> anyhow::Result<QuicTransport> {
        let cert = self.certs.join(format!("{}.pem", self.cert_name()));
        if !cert.exists() {
            let ca = FleetCa::from_pem(
                &std::fs::read_to_string(self.certs.join(CA_FILE))?,
                &std::fs::read_to_string(self.certs.join(CA_KEY_FILE))?,
            )?;
            let issued = ca.issue("aqe probe", "localhost", &[self.listen.ip()], &[])?;
            // Key first, certificate last (renamed into place): a certificate that exists has
            // its key.
            let key = self.certs.join(format!("{}.key", self.cert_name()));
            std::fs::write(&key, &issued.key_pem)?;
            let tmp = self.certs.join(format!(".{}.pem.tmp", self.cert_name()));
            std::fs::write(&tmp, &issued.cert_pem)?;
            std::fs::rename(&tmp, &cert)?;
        }
        let mut last = None;
        for _ in 0..100 {
            match QuicTransport::bind(self.quic_config()).await {
                Ok(t) => return Ok(t),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.map_or_else(|| anyhow::anyhow!("bind failed"), Into::into))
    }

    /// The agent's transport: the QUIC endpoint, or, with a NATS server, the chain QUIC,
    /// NATS, bus.
    ///
    /// # Errors
    /// When the NATS server cannot be reached.
    pub async fn transport(&self, quic: &QuicTransport) -> anyhow::Result<Arc<dyn Transport>> {
        let Some(server) = &self.nats else {
            return Ok(Arc::new(quic.clone()));
        };
        let nats = NatsTransport::connect(NatsConfig {
            servers: vec![server.clone()],
            fleet: "probe".into(),
            heartbeat_interval: self.heartbeat,
            liveness_timeout: self.liveness,
            delivery_deadline: self.deadline,
            ..NatsConfig::default()
        })
        .await
        .with_context(|| format!("connecting to NATS at {server}"))?;
        Ok(Fallback::chain(Arc::new(quic.clone()))
            .then(Arc::new(nats), FallbackPolicy::default())
            .then(Arc::new(EventBus::new()), FallbackPolicy::default())
            .build())
    }
}

/// The ids of the agents a receiver named `agent` hosts (see [`Options::agents`]).
pub fn receiver_ids(agent: &str, agents: usize) -> Vec<String> {
    if agents <= 1 {
        vec![agent.to_owned()]
    } else {
        (0..agents).map(|i| format!("{agent}-{i}")).collect()
    }
}

/// Runs the receiving agents of `agent` ([`receiver_ids`]) until the process ends: prints
/// `READY <addr>`, then a line per message taken (`M <channel> <n> <0|1 redelivered>
/// <agent>`) and per request answered (`R <n>`, answered with `n`).
///
/// # Errors
/// When the endpoint cannot be bound or an agent started.
pub async fn receive(options: &Options, agent: &str) -> anyhow::Result<()> {
    let options = &options.named(agent);
    let quic = options.bind().await?;
    let addr = quic.local_addr();
    let transport = options.transport(&quic).await?;
    let out = Arc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
    let delay = options.handler_delay;
    let mut running = Vec::new();
    for id in receiver_ids(agent, options.agents) {
        let (msg_out, req_out) = (out.clone(), out.clone());
        let mut builder = Agent::builder()
            .id(id.as_str())
            .agent_type("probe-receiver")
            .transport(transport.clone())
            .inbox_capacity(options.inbox);
        for c in channels() {
            builder = builder.channel(c);
        }
        let agent = builder
            .on_message(move |a, env| {
                let out = msg_out.clone();
                let line = format!(
                    "M {} {} {} {}\n",
                    env.channel,
                    env.decode::<u32>().unwrap_or(u32::MAX),
                    u8::from(env.redelivered),
                    a.id()
                );
                async move {
                    // Printed before the handler returns, so before the acknowledgement.
                    {
                        let mut out = out.lock().await;
                        let _ = out.write_all(line.as_bytes()).await;
                        let _ = out.flush().await;
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
            })
            .on_request(move |_, req| {
                let out = req_out.clone();
                async move {
                    let n: u32 = req.decode()?;
                    let mut out = out.lock().await;
                    let _ = out.write_all(format!("R {n}\n").as_bytes()).await;
                    let _ = out.flush().await;
                    Ok::<_, HandlerError>(n)
                }
            })
            .start()
            .await?;
        running.push(agent);
    }
    {
        let mut out = out.lock().await;
        out.write_all(format!("READY {addr}\n").as_bytes()).await?;
        out.flush().await?;
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// What a sender does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The receiving agent.
    pub to: AgentId,
    /// The channel.
    pub channel: ChannelName,
    /// Messages (or requests) numbered `0..count`.
    pub count: u32,
    /// Requests instead of one-way messages.
    pub requests: bool,
    /// A pause after every `pace.0` messages, of `pace.1`.
    pub pace: Option<(u32, Duration)>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// A mixed load: besides message `n` (on `channel`), every tenth `n` also a request and
    /// a fleet broadcast numbered [`BROADCAST_BASE`] + `n`; a progress line every 500 ms.
    pub mix: bool,
    /// Each one-way message's time-to-live.
    pub ttl: Option<Duration>,
    /// Each number a broadcast on `channel` to every agent listening there (not confirmed:
    /// each copy is accounted as the receiver took it or as a failure event names it),
    /// instead of a message to `to`.
    pub broadcast: bool,
}

/// Where the numbers of broadcasts in a mixed load start.
pub const BROADCAST_BASE: u32 = 1_000_000;

/// What became of every message a sender sent.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Accepted for delivery (one-way messages), or answered (requests).
    pub accepted: Vec<u32>,
    /// Refused at once (the send returned an error), with the error.
    pub refused: Vec<(u32, String)>,
    /// Accepted, then reported failed, with the reason.
    pub failed: Vec<(u32, DeliveryFailure)>,
    /// Accepted and still neither confirmed nor failed when the report was made.
    pub unconfirmed: u64,
    /// Requests answered with another number than they sent.
    pub wrong_answers: Vec<u32>,
    /// Unreliable messages dropped by the sender itself (a full datagram queue).
    pub dropped: u64,
    /// Mixed load: requests answered, and failed (with the error).
    pub requests_answered: Vec<u32>,
    /// Mixed load: requests that failed.
    pub requests_failed: Vec<(u32, String)>,
    /// Mixed load: broadcasts the receiver was among the delivered targets of.
    pub broadcasts: Vec<u32>,
    /// Mixed load: broadcasts that did not reach the receiver, with the error.
    pub broadcasts_failed: Vec<(u32, String)>,
    /// Operations a fallback carried, by the transport that carried them.
    pub fallbacks: HashMap<String, u64>,
    /// Broadcast plan: the copies accepted for delivery, by number and target.
    pub copies: Vec<(u32, AgentId)>,
    /// Broadcast plan: copies accepted, then reported failed, with the reason.
    pub copies_failed: Vec<(u32, AgentId, DeliveryFailure)>,
}

/// Sends as `plan` says from `agent`, then waits (up to `settle`) until every accepted
/// message is confirmed or reported failed, and reports.
///
/// # Errors
/// Never for a message: every outcome is in the report.
pub async fn send(agent: &Agent, plan: &Plan, settle: Duration) -> anyhow::Result<Report> {
    let mut events = agent.events();
    let mut report = Report::default();
    let mut ids: HashMap<MessageId, u32> = HashMap::new();
    let mut failures: Vec<(MessageId, AgentId, DeliveryFailure)> = Vec::new();
    let mut fallbacks: HashMap<String, u64> = HashMap::new();
    let mut drain = |events: &mut aqe_agent::EventStream, failures: &mut Vec<_>| {
        while let Some(Some(e)) = futures::FutureExt::now_or_never(events.recv()) {
            match e {
                Event::DeliveryFailed {
                    ids, reason, to, ..
                } => {
                    failures.extend(ids.into_iter().map(|id| (id, to.clone(), reason)));
                }
                Event::FallbackUsed { via, .. } => {
                    *fallbacks.entry(via.to_string()).or_insert(0) += 1;
                }
                _ => {}
            }
        }
    };
    let started = tokio::time::Instant::now();
    let mut next_progress = started;
    for n in 0..plan.count {
        if plan.mix && n % 10 == 0 {
            let options = RequestOptions::default().with_timeout(plan.request_timeout);
            match agent
                .request_from_agent::<u32, u32>(&plan.to, &n, options)
                .await
            {
                Ok(answer) if answer == n => report.requests_answered.push(n),
                Ok(_) => report.wrong_answers.push(n),
                Err(e) => report.requests_failed.push((n, e.to_string())),
            }
            let b = BROADCAST_BASE + n;
            match agent
                .broadcast_to_fleet(&b, BroadcastOptions::on(plan.channel.clone()))
                .await
            {
                Ok(r) => {
                    if r.delivered.contains(&plan.to) {
                        report.broadcasts.push(b);
                    } else if let Some((_, e)) = r.failed.iter().find(|(p, _)| p == &plan.to) {
                        report.broadcasts_failed.push((b, e.to_string()));
                    } else {
                        report
                            .broadcasts_failed
                            .push((b, "receiver not a target".into()));
                    }
                }
                Err(e) => report.broadcasts_failed.push((b, e.to_string())),
            }
        }
        if plan.broadcast {
            match agent
                .broadcast_to_fleet(&n, BroadcastOptions::on(plan.channel.clone()))
                .await
            {
                Ok(r) => {
                    ids.insert(r.id, n);
                    report.accepted.push(n);
                    report
                        .copies
                        .extend(r.delivered.into_iter().map(|to| (n, to)));
                }
                Err(e) => report.refused.push((n, e.to_string())),
            }
        } else if plan.requests {
            let options = RequestOptions::default()
                .with_channel(plan.channel.clone())
                .with_timeout(plan.request_timeout);
            match agent
                .request_from_agent::<u32, u32>(&plan.to, &n, options)
                .await
            {
                Ok(answer) if answer == n => report.accepted.push(n),
                Ok(_) => report.wrong_answers.push(n),
                Err(e) => report.refused.push((n, e.to_string())),
            }
        } else {
            let mut send = SendOptions::on(plan.channel.clone());
            send.ttl = plan.ttl;
            match agent.send_with(&plan.to, &n, send).await {
                Ok(id) => {
                    ids.insert(id, n);
                    report.accepted.push(n);
                }
                Err(e) => report.refused.push((n, e.to_string())),
            }
        }
        if let Some((every, pause)) = plan.pace
            && n % every == every - 1
        {
            tokio::time::sleep(pause).await;
        }
        drain(&mut events, &mut failures);
        if plan.mix && tokio::time::Instant::now() >= next_progress {
            next_progress += Duration::from_millis(500);
            // Progress: elapsed ms, operations done, fallbacks so far.
            println!(
                "P {} {} {}",
                started.elapsed().as_millis(),
                n + 1,
                agent.stats().fallbacks_used
            );
        }
    }
    let settled = tokio::time::timeout(settle, async {
        loop {
            drain(&mut events, &mut failures);
            if agent.stats().messages_unconfirmed == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Events may trail the counter by a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drain(&mut events, &mut failures);
    report.unconfirmed = agent.stats().messages_unconfirmed;
    report.dropped = agent.stats().messages_dropped;
    report.fallbacks = fallbacks;
    if settled.is_err() {
        tracing::warn!(
            left = report.unconfirmed,
            "not every message settled in time"
        );
    }
    for (id, to, reason) in failures {
        if let Some(n) = ids.get(&id) {
            if plan.broadcast {
                report.copies_failed.push((*n, to, reason));
            } else {
                report.failed.push((*n, reason));
            }
        }
    }
    report.failed.sort_by_key(|(n, _)| *n);
    Ok(report)
}

/// Starts a sending agent `id` on a probe endpoint.
///
/// # Errors
/// When the endpoint cannot be bound or the agent started.
pub async fn sender(options: &Options, id: &str) -> anyhow::Result<(QuicTransport, Agent)> {
    let options = &options.named(id);
    let quic = options.bind().await?;
    let transport = options.transport(&quic).await?;
    let mut builder = Agent::builder()
        .id(id)
        .agent_type("probe-sender")
        .transport(transport);
    for c in channels() {
        builder = builder.channel(c);
    }
    let agent = builder.start().await.context("starting the sender")?;
    Ok((quic, agent))
}

/// One line a receiver printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `READY <addr>`.
    Ready(SocketAddr),
    /// A message taken: channel, number, redelivered, the agent that took it.
    Message(String, u32, bool, String),
    /// A request answered.
    Request(u32),
}

impl Line {
    /// Parses a receiver's line.
    pub fn parse(line: &str) -> Option<Line> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "READY" => Some(Line::Ready(words.next()?.parse().ok()?)),
            "M" => Some(Line::Message(
                words.next()?.to_owned(),
                words.next()?.parse().ok()?,
                words.next()? == "1",
                words.next()?.to_owned(),
            )),
            "R" => Some(Line::Request(words.next()?.parse().ok()?)),
            _ => None,
        }
    }
}
