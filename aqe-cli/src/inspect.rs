//! `aqe stats`, `aqe health`, `aqe top`: what every endpoint of the fleet says about itself,
//! asked of its introspection agent over this endpoint's authenticated connections.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_agent::Agent;
use aqe_core::{
    AgentId, EndpointReport, Health, HealthStatus, HealthThresholds, Payload, RequestOptions,
};

use crate::cli::{Format, InspectArgs, TopArgs};
use crate::error::CliError;
use crate::join;

/// An agent joined as the options say (QUIC, NATS or both), and what it joined with (to
/// list the fleet's endpoints).
async fn inspector(a: &InspectArgs) -> Result<(Agent, Arc<join::Joined>), CliError> {
    let joined = Arc::new(join::transport(&a.join, false).await?);
    let agent = match Agent::builder()
        .agent_type("cli")
        .transport(joined.transport.clone())
        .start()
        .await
    {
        Ok(agent) => agent,
        Err(e) => {
            joined.transport.shutdown().await;
            return Err(e.into());
        }
    };
    // Until the fleet's other endpoints are known.
    let deadline = Instant::now() + a.join.wait;
    while endpoints(&joined).len() < a.min_endpoints && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((agent, joined))
}

/// The introspection ids of the endpoints reached, over QUIC and over NATS (an endpoint
/// on both is asked on each: its reports name the transport).
fn endpoints(joined: &join::Joined) -> Vec<AgentId> {
    let quic = joined.quic.iter().flat_map(|q| q.endpoint_agents());
    let nats = joined.nats.iter().flat_map(|n| n.endpoint_agents());
    quic.chain(nats).collect()
}

/// Every other endpoint's report, in endpoint order, once at least `a.min_endpoints` answer
/// (or the join wait passed): an endpoint that left between being listed and being asked
/// (a command of the fleet that just exited) is not reported, and does not count.
async fn reports(
    agent: &Agent,
    joined: &join::Joined,
    a: &InspectArgs,
) -> Vec<(AgentId, Result<EndpointReport, String>)> {
    let deadline = Instant::now() + a.join.wait;
    loop {
        let out = reports_now(agent, joined).await;
        if out.iter().filter(|(_, r)| r.is_ok()).count() >= a.min_endpoints
            || Instant::now() >= deadline
        {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reports of the endpoints listed now.
async fn reports_now(
    agent: &Agent,
    joined: &join::Joined,
) -> Vec<(AgentId, Result<EndpointReport, String>)> {
    let mine = endpoints(joined);
    let options = RequestOptions {
        timeout: Duration::from_secs(3),
        ..RequestOptions::default()
    };
    // One endpoint after the other: a handful of small requests, in endpoint order.
    let mut out = Vec::with_capacity(mine.len());
    for id in mine {
        let outcome = match Payload::json_text("{}") {
            Ok(p) => agent.request_payload(&id, p, options.clone()).await,
            Err(e) => Err(e),
        };
        let report = match outcome.and_then(|env| env.decode::<EndpointReport>()) {
            // It left since it was listed.
            Err(aqe_core::Error::PeerNotFound { .. }) => continue,
            r => r.map_err(|e| e.to_string()),
        };
        out.push((id, report));
    }
    out
}

async fn leave(agent: &Agent, joined: &join::Joined) {
    agent.shutdown().await;
    joined.transport.shutdown().await;
}

/// Each agent's (messages sent, messages received) in the previous frame.
type Counters = HashMap<String, (u64, u64)>;

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The table `aqe stats` and `aqe top` print; `rates` gives per-second figures against the
/// previous frame's counters.
fn table(
    reports: &[(AgentId, Result<EndpointReport, String>)],
    rates: Option<(&Counters, Duration)>,
) -> String {
    let mut s = String::new();
    for (id, r) in reports {
        match r {
            Err(e) => {
                let _ = writeln!(s, "endpoint {id}: no report ({e})");
            }
            Ok(r) => {
                let _ = writeln!(
                    s,
                    "endpoint {} {} listen {} up {:.0}s",
                    r.endpoint,
                    r.transport,
                    r.listen.as_deref().unwrap_or("-"),
                    r.uptime_ms as f64 / 1000.0
                );
                let _ = writeln!(
                    s,
                    "  {:<22} {:>9} {:>9} {:>10} {:>9} {:>7}",
                    "link", "rtt ms", "srtt ms", "cwnd", "packets", "lost"
                );
                for l in &r.links {
                    let _ = writeln!(
                        s,
                        "  {:<22} {:>9} {:>9} {:>10} {:>9} {:>7}",
                        l.addr,
                        ms(l.rtt_us),
                        ms(l.smoothed_rtt_us),
                        l.congestion_window,
                        l.packets_sent,
                        l.packets_lost
                    );
                }
                let _ = writeln!(
                    s,
                    "  {:<22} {:>9} {:>9} {:>11} {:>11} {:>9} {:>7}",
                    "agent", "msgs out", "msgs in", "bytes out", "bytes in", "rtt ms", "failed"
                );
                for a in &r.agents {
                    let st = &a.stats;
                    let (out, inn) = match rates {
                        Some((prev, dt)) => {
                            let (po, pi) = prev
                                .get(a.id.as_str())
                                .copied()
                                .unwrap_or((st.messages_sent, st.messages_received));
                            let secs = dt.as_secs_f64().max(1e-3);
                            (
                                format!(
                                    "{:.0}/s",
                                    (st.messages_sent.saturating_sub(po)) as f64 / secs
                                ),
                                format!(
                                    "{:.0}/s",
                                    (st.messages_received.saturating_sub(pi)) as f64 / secs
                                ),
                            )
                        }
                        None => (
                            st.messages_sent.to_string(),
                            st.messages_received.to_string(),
                        ),
                    };
                    let rtt = if st.rtt.samples > 0 {
                        format!("{:.2}", st.rtt.average.as_secs_f64() * 1e3)
                    } else {
                        "-".into()
                    };
                    let _ = writeln!(
                        s,
                        "  {:<22} {:>9} {:>9} {:>11} {:>11} {:>9} {:>7}",
                        a.id.as_str(),
                        out,
                        inn,
                        st.bytes_sent,
                        st.bytes_received,
                        rtt,
                        st.messages_failed
                    );
                }
            }
        }
    }
    s
}

pub(crate) async fn stats(a: InspectArgs) -> Result<(), CliError> {
    let (agent, transport) = inspector(&a).await?;
    let reports = reports(&agent, &transport, &a).await;
    leave(&agent, &transport).await;
    match a.format {
        Format::Json => println!("{}", crate::ops::json(&as_json(&reports))),
        Format::Text => print!("{}", table(&reports, None)),
    }
    Ok(())
}

/// The reports as JSON: one object per endpoint, its report or the error asking for it.
fn as_json(reports: &[(AgentId, Result<EndpointReport, String>)]) -> serde_json::Value {
    serde_json::Value::Array(
        reports
            .iter()
            .map(|(id, r)| match r {
                Ok(r) => serde_json::json!({ "endpoint": id, "report": r }),
                Err(e) => serde_json::json!({ "endpoint": id, "error": e }),
            })
            .collect(),
    )
}

pub(crate) async fn health(a: InspectArgs) -> Result<(), CliError> {
    let (agent, transport) = inspector(&a).await?;
    let reports = reports(&agent, &transport, &a).await;
    leave(&agent, &transport).await;
    let thresholds = HealthThresholds::default();
    let mut worst = HealthStatus::Healthy;
    // (agent, status, reason), in endpoint order.
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for (id, r) in &reports {
        match r {
            Err(e) => rows.push((id.to_string(), "unknown".into(), e.clone())),
            Ok(r) => {
                for ag in &r.agents {
                    let h =
                        Health::assess(&ag.stats, true, r.links.len(), 1, Vec::new(), &thresholds);
                    if h.status != HealthStatus::Healthy && worst == HealthStatus::Healthy
                        || h.status == HealthStatus::Unhealthy
                    {
                        worst = h.status;
                    }
                    rows.push((ag.id.to_string(), format!("{:?}", h.status), h.message));
                }
            }
        }
    }
    match a.format {
        Format::Json => {
            let doc: Vec<serde_json::Value> = rows
                .iter()
                .map(|(agent, status, reason)| {
                    serde_json::json!({ "agent": agent, "status": status, "reason": reason })
                })
                .collect();
            println!("{}", crate::ops::json(&doc));
        }
        Format::Text => {
            println!("agent\tstatus\treason");
            for (agent, status, reason) in &rows {
                println!("{agent}\t{status}\t{reason}");
            }
        }
    }
    if worst == HealthStatus::Unhealthy {
        return Err(CliError::Failed(aqe_core::Error::Protocol {
            detail: "an agent of the fleet is unhealthy",
        }));
    }
    Ok(())
}

pub(crate) async fn top(a: TopArgs) -> Result<(), CliError> {
    let (agent, transport) = inspector(&a.inspect).await?;
    let mut prev: Counters = HashMap::new();
    let mut last = Instant::now();
    loop {
        let reports = reports(&agent, &transport, &a.inspect).await;
        let now = Instant::now();
        if a.inspect.format == Format::Json {
            // One document per frame, a line each.
            println!("{}", as_json(&reports));
            if a.once {
                break;
            }
        } else {
            let frame = table(&reports, (!prev.is_empty()).then_some((&prev, now - last)));
            if a.once {
                print!("{frame}");
                break;
            }
            // Clear the screen and home the cursor, then the frame.
            print!("\x1b[2J\x1b[H{frame}");
        }
        prev = reports
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .flat_map(|r| r.agents.iter())
            .map(|ag| {
                (
                    ag.id.to_string(),
                    (ag.stats.messages_sent, ag.stats.messages_received),
                )
            })
            .collect();
        last = now;
        tokio::select! {
            () = crate::node::wait_for_signal() => break,
            () = tokio::time::sleep(a.interval) => {}
        }
    }
    leave(&agent, &transport).await;
    Ok(())
}
