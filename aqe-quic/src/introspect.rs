//! The endpoint's introspection agent: every QUIC endpoint hosts one (id
//! `aqe.endpoint.<endpoint id>`, type [`ENDPOINT_AGENT_TYPE`]) that answers any request with
//! an [`EndpointReport`] in JSON: its links (RTT, congestion window, loss) and its agents'
//! statistics. Requests reach it only over this endpoint's connections, which are
//! authenticated as the endpoint's security settings say (certificates, token).

use std::time::{Duration, Instant};

use aqe_core::plumbing::inbox;
use aqe_core::{
    AgentId, AgentReport, ENDPOINT_AGENT_TYPE, EndpointReport, Inbound, LinkReport, Payload,
    Registration, Result, Transport,
};

use crate::QuicTransport;

/// Requests held waiting for the reporter: beyond, the transport answers "busy".
const QUEUE: usize = 16;

/// The id of endpoint `id`'s introspection agent.
pub(crate) fn agent_id(endpoint: u64) -> AgentId {
    AgentId::new(format!("aqe.endpoint.{endpoint:016x}"))
}

/// Whether `id` names an endpoint's introspection agent.
pub(crate) fn is_endpoint_agent(id: &AgentId) -> bool {
    id.as_str().starts_with("aqe.endpoint.")
}

/// Attaches the introspection agent to `t` and serves it until the endpoint shuts down.
pub(crate) async fn start(t: &QuicTransport) -> Result<()> {
    let shared = t.shared_arc();
    let id = agent_id(shared.id);
    let (tx, mut rx) = inbox(id.clone(), QUEUE);
    let reg = Registration::new(id.clone(), ENDPOINT_AGENT_TYPE)
        .with_channel(aqe_core::Channel::coordination());
    t.attach(reg, tx).await?;
    let transport = t.clone();
    let started = Instant::now();
    let stop = shared.shutdown.clone();
    shared.tasks.spawn(async move {
        loop {
            let item = tokio::select! {
                () = stop.cancelled() => return,
                item = rx.recv() => item,
            };
            let Some(item) = item else { return };
            if let Inbound::Request {
                envelope,
                responder,
            } = item
            {
                let report = report(&transport, &id, started.elapsed());
                let reply = Payload::json(&report).map(|p| {
                    envelope
                        .reply(
                            id.clone(),
                            aqe_core::MessageKind::Response,
                            bytes::Bytes::new(),
                        )
                        .with_payload(p)
                });
                if let Ok(reply) = reply {
                    // Bounded by the send timeout; a requester gone is no concern here.
                    let _ = tokio::time::timeout(Duration::from_secs(5), responder.respond(reply))
                        .await;
                }
            }
        }
    });
    Ok(())
}

fn report(t: &QuicTransport, me: &AgentId, uptime: Duration) -> EndpointReport {
    let shared = t.shared_arc();
    let links = t
        .links()
        .into_iter()
        .map(|l| LinkReport {
            addr: l.addr.to_string(),
            rtt_us: l.rtt.current.as_micros() as u64,
            smoothed_rtt_us: l.smoothed_rtt.as_micros() as u64,
            congestion_window: l.congestion_window,
            packets_sent: l.packets_sent,
            packets_lost: l.packets_lost,
        })
        .collect();
    let mut agents: Vec<AgentReport> = shared
        .local_agents()
        .into_iter()
        .filter(|a| &a.reg.id != me)
        .map(|a| AgentReport {
            id: a.reg.id.clone(),
            agent_type: a.reg.agent_type.clone(),
            stats: t.stats(&a.reg.id),
        })
        .collect();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    EndpointReport {
        endpoint: format!("{:016x}", shared.id),
        transport: QuicTransport::KIND.to_string(),
        listen: Some(t.local_addr().to_string()),
        uptime_ms: uptime.as_millis() as u64,
        links,
        agents,
    }
}
