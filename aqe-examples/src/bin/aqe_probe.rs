//! `aqe-probe`: the delivery probe of the tests and of `cargo xtask lab`.
//!
//! ```text
//! aqe-probe certs DIR                          a fleet CA in DIR (each probe issues itself a
//!                                              node certificate from it, named by --name or
//!                                              its agent's id, and keeps it for its restarts)
//! aqe-probe receive --listen ADDR --certs DIR [--agent ID] [--agents N] [--name N]
//!                   [--peer ADDR] [--handler-us MICROS (a slow consumer)] [--inbox ITEMS]
//!                   [timings]
//! aqe-probe send --listen ADDR --peer ADDR --certs DIR --to ID [--channel C] [--count N]
//!                [--requests | --mix | --broadcast] [--pace N:MICROS] [--settle-ms MS]
//!                [--ttl-ms MS] [timings]
//! timings: --heartbeat-ms MS --liveness-ms MS --deadline-ms MS
//! --nats URL (receive and send): the chain QUIC, NATS (fleet `probe`), bus
//! ```
//!
//! `--mix`: besides each message, every tenth number also a request and a fleet broadcast
//! (numbered from 1 000 000); progress lines `P <ms> <operations> <fallbacks>`.
//!
//! `--agents N`: the receiver hosts `ID-0` .. `ID-<N-1>` instead of `ID`. `--broadcast`: each
//! number is a broadcast on the channel (`--to` is then the agent the sender waits to
//! discover before it starts).
//!
//! `receive` prints `READY <addr>`, then one line per message taken (`M <channel> <n> <0|1>
//! <agent>`) or request answered (`R <n>`). `send` prints one JSON report: accepted, refused
//! and failed numbers (for broadcasts, the copies accepted and those failed, by target),
//! and what was left unconfirmed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use aqe_examples::probe::{self, Options, Plan};

struct Args(HashMap<String, String>, Vec<String>);

impl Args {
    fn parse(raw: &[String]) -> anyhow::Result<Self> {
        let (mut named, mut free) = (HashMap::new(), Vec::new());
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if name == "requests" || name == "mix" || name == "broadcast" {
                    named.insert(name.to_owned(), "true".to_owned());
                } else {
                    let v = it
                        .next()
                        .with_context(|| format!("--{name} needs a value"))?;
                    named.insert(name.to_owned(), v.clone());
                }
            } else {
                free.push(a.clone());
            }
        }
        Ok(Self(named, free))
    }

    fn get<T: std::str::FromStr>(&self, name: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.0
            .get(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| anyhow::anyhow!("--{name} {v}: {e}"))
            })
            .transpose()
    }

    fn need<T: std::str::FromStr>(&self, name: &str) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.get(name)?
            .with_context(|| format!("--{name} is required"))
    }

    fn options(&self) -> anyhow::Result<Options> {
        let mut o = Options::new(self.need("listen")?, self.need::<PathBuf>("certs")?);
        o.peer = self.get("peer")?;
        o.nats = self.get("nats")?;
        o.name = self.get("name")?;
        let ms = |name: &str| -> anyhow::Result<Option<Duration>> {
            Ok(self.get::<u64>(name)?.map(Duration::from_millis))
        };
        if let Some(d) = ms("heartbeat-ms")? {
            o.heartbeat = d;
        }
        if let Some(d) = ms("liveness-ms")? {
            o.liveness = d;
        }
        if let Some(d) = ms("deadline-ms")? {
            o.deadline = d;
        }
        if let Some(us) = self.get::<u64>("handler-us")? {
            o.handler_delay = Duration::from_micros(us);
        }
        if let Some(n) = self.get::<usize>("inbox")? {
            o.inbox = n;
        }
        if let Some(n) = self.get::<usize>("agents")? {
            o.agents = n;
        }
        Ok(o)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some((role, rest)) = raw.split_first() else {
        bail!("usage: aqe-probe certs|receive|send ... (see the source's header)");
    };
    let args = Args::parse(rest)?;
    match role.as_str() {
        "certs" => {
            let dir = args.1.first().context("certs DIR")?;
            probe::write_certs(&PathBuf::from(dir))
        }
        "receive" => {
            let agent = args
                .get::<String>("agent")?
                .unwrap_or_else(|| "sink".into());
            probe::receive(&args.options()?, &agent).await
        }
        "send" => {
            let options = args.options()?;
            let peer: SocketAddr = args.need("peer")?;
            let plan = Plan {
                to: args.need::<String>("to")?.into(),
                channel: args
                    .get::<String>("channel")?
                    .unwrap_or_else(|| "coordination".into())
                    .into(),
                count: args.get("count")?.unwrap_or(1000),
                requests: args.0.contains_key("requests"),
                mix: args.0.contains_key("mix"),
                broadcast: args.0.contains_key("broadcast"),
                pace: match args.get::<String>("pace")? {
                    Some(p) => {
                        let (n, us) = p.split_once(':').context("--pace N:MICROS")?;
                        Some((n.parse()?, Duration::from_micros(us.parse()?)))
                    }
                    None => None,
                },
                request_timeout: Duration::from_millis(
                    args.get("request-timeout-ms")?.unwrap_or(2000),
                ),
                ttl: args.get::<u64>("ttl-ms")?.map(Duration::from_millis),
            };
            let (quic, agent) = probe::sender(&options, "source").await?;
            quic.connect(peer).await?;
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while agent
                .discover_peers(&Default::default())
                .iter()
                .all(|p| p.id != plan.to)
            {
                if tokio::time::Instant::now() > until {
                    bail!("{} not discovered at {peer}", plan.to);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let settle = Duration::from_millis(args.get("settle-ms")?.unwrap_or(30_000));
            let report = probe::send(&agent, &plan, settle).await?;
            println!(
                "{}",
                serde_json::json!({
                    "accepted": report.accepted,
                    "refused": report.refused.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    "refusals": report.refused.iter().take(5).map(|(_, e)| e).collect::<Vec<_>>(),
                    "failed": report.failed.iter().map(|(n, r)| (n, format!("{r:?}"))).collect::<Vec<_>>(),
                    "unconfirmed": report.unconfirmed,
                    "wrong_answers": report.wrong_answers,
                    "dropped": report.dropped,
                    "requests_answered": report.requests_answered.len(),
                    "requests_failed": report.requests_failed,
                    "broadcasts": report.broadcasts,
                    "broadcasts_failed": report.broadcasts_failed,
                    "fallbacks": report.fallbacks,
                    "copies": report.copies.iter().map(|(n, to)| (n, to.as_str())).collect::<Vec<_>>(),
                    "copies_failed": report.copies_failed.iter().map(|(n, to, r)| (n, to.as_str(), format!("{r:?}"))).collect::<Vec<_>>(),
                })
            );
            agent.shutdown().await;
            aqe_core::Transport::shutdown(&quic).await;
            Ok(())
        }
        other => bail!("unknown role {other}: certs, receive or send"),
    }
}
