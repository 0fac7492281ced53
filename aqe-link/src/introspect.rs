//! The endpoint's own answer: a request addressed to `aqe.endpoint.<endpoint id>` is
//! answered by the endpoint itself with an [`EndpointReport`] in JSON (its links and its
//! agents' statistics), to the peers the configuration allows. It is no agent: it is in no
//! membership, no snapshot, no discovery.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use aqe_core::{AgentId, AgentReport, EndpointReport, Envelope, LinkReport, MessageKind, Payload};
use aqe_session::{EndpointId, Principal, Refusal, Trust};

use crate::Wire;
use crate::cell::{Cell, Shared};
use crate::host::Introspection;
use crate::node::Tables;

/// Introspection ids are this prefix and the endpoint id's 32 hex digits.
pub const ENDPOINT_AGENT_PREFIX: &str = "aqe.endpoint.";

/// The id requests for endpoint `e`'s report are addressed to.
pub fn endpoint_agent(e: EndpointId) -> AgentId {
    AgentId::new(format!("{ENDPOINT_AGENT_PREFIX}{e}"))
}

/// The endpoint an introspection id names, if it is one.
pub(crate) fn endpoint_of(id: &AgentId) -> Option<EndpointId> {
    id.as_str()
        .strip_prefix(ENDPOINT_AGENT_PREFIX)?
        .parse()
        .ok()
}

/// Whether a peer with `trust` may read this endpoint's report.
pub(crate) fn allowed(policy: &Introspection, trust: &Trust) -> bool {
    match policy {
        Introspection::Nobody => false,
        Introspection::Verified => matches!(trust.principal, Principal::Key(_)),
        Introspection::Authenticated => trust.authenticated,
        Introspection::Keys(keys) => {
            matches!(trust.principal, Principal::Key(k) if keys.contains(&k))
        }
    }
}

pub(crate) struct Reporter {
    pub(crate) me: EndpointId,
    pub(crate) policy: Introspection,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tables: Arc<Tables>,
    pub(crate) wire: Arc<dyn Wire>,
    pub(crate) started: Instant,
}

impl Reporter {
    /// Answers introspection requests until the host stops.
    pub(crate) async fn run(
        self,
        mut rx: mpsc::Receiver<(Arc<Cell>, Envelope)>,
        stop: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                n = rx.recv() => n,
            };
            let Some((cell, request)) = next else { return };
            let id = request.id;
            if !allowed(&self.policy, &cell.trust) {
                tracing::debug!(peer = ?cell.peer, "introspection refused to a peer the configuration does not allow");
                let _ = cell.pump(&self.shared, |s, _| s.answer(id, Err(Refusal::NotHere)));
                continue;
            }
            let answer = Payload::json(&self.report()).map(|p| {
                request
                    .reply(
                        endpoint_agent(self.me),
                        MessageKind::Response,
                        bytes::Bytes::new(),
                    )
                    .with_payload(p)
            });
            let _ = match answer {
                Ok(reply) => cell.pump(&self.shared, |s, _| s.answer(id, Ok(reply))),
                Err(_) => cell.pump(&self.shared, |s, _| s.answer(id, Err(Refusal::Stopped))),
            };
        }
    }

    fn report(&self) -> EndpointReport {
        let links = link_reports(&self.tables.cells());
        let agents = self
            .shared
            .locals
            .all()
            .into_iter()
            .map(|l| AgentReport {
                id: l.reg.id.clone(),
                agent_type: l.reg.agent_type.clone(),
                stats: l.stats.snapshot(),
            })
            .collect();
        EndpointReport {
            endpoint: self.me.to_string(),
            transport: self.wire.kind().to_string(),
            listen: self.wire.listen().map(|a| a.to_string()),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            links,
            agents,
        }
    }
}

/// The live links among `cells`, as their wires measure them.
pub(crate) fn link_reports(cells: &[std::sync::Arc<crate::cell::Cell>]) -> Vec<LinkReport> {
    cells
        .iter()
        .filter(|c| c.is_live())
        .map(|c| {
            let f = c.link.figures().unwrap_or_default();
            let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            LinkReport {
                addr: c.link.address().to_string(),
                rtt_us: us(f.rtt.current),
                smoothed_rtt_us: us(f.smoothed_rtt),
                congestion_window: f.congestion_window,
                packets_sent: f.packets_sent,
                packets_lost: f.packets_lost,
            }
        })
        .collect()
}
