//! Joining a fleet from the command line: a QUIC endpoint configured from the options (or a
//! definition file), connected to the bootstrap endpoints; a NATS connection (`--nats`, or
//! the definition's natsConfig); or the chain of both; then waiting for agents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_agent::{Agent, AgentDefinition, Fallback, FallbackPolicy, NatsTransport, QuicTransport};
use aqe_core::{AgentId, Error, Token, Transport};
use aqe_nats::NatsConfig;
use aqe_quic::QuicConfig;

use crate::cli::Join;
use crate::error::CliError;

/// The endpoint's configuration the options describe; a long-running command's (`stay`)
/// re-dials its bootstrap endpoints whenever their connection ends, with backoff.
fn config(join: &Join, stay: bool) -> Result<QuicConfig, CliError> {
    let mut c = match &join.definition {
        Some(path) => AgentDefinition::from_file(path)?
            .config::<QuicConfig>()
            .cloned()
            .unwrap_or_default(),
        None => QuicConfig::default(),
    };
    let (host, port) = join
        .listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
        .ok_or(CliError::Usage("--listen must be host:port"))?;
    if join.definition.is_none() || join.listen != "0.0.0.0:0" {
        c.host = host;
        c.port = port;
    }
    let s = &mut c.security;
    if let (Some(dir), Some(name)) = (&join.certs, &join.name) {
        s.cert_path = Some(dir.join(format!("{name}.pem")));
        s.key_path = Some(dir.join(format!("{name}.key")));
        s.ca_path = Some(dir.join("ca.pem"));
        s.verify_peer = true;
    }
    if let (Some(cert), Some(key), Some(ca)) = (&join.cert, &join.key, &join.ca) {
        s.cert_path = Some(cert.clone());
        s.key_path = Some(key.clone());
        s.ca_path = Some(ca.clone());
        s.verify_peer = true;
    }
    s.check_address |= join.check_address;
    if let Some(t) = &join.token {
        s.enable_token_auth = true;
        s.token = Some(Token::new(t.clone()));
    }
    if stay {
        c.bootstrap_peers.clone_from(&join.bootstrap);
    }
    // A command-line endpoint dials; it also learns the fleet from its bootstrap peers.
    c.connection_timeout = c
        .connection_timeout
        .min(join.wait.max(Duration::from_secs(1)));
    Ok(c)
}

/// The NATS connection the options ask for: `--nats`, or the definition's natsConfig when
/// its chain has NATS.
fn nats_config(join: &Join, def: Option<&AgentDefinition>) -> Option<NatsConfig> {
    if !join.nats.is_empty() {
        let mut c = def
            .and_then(AgentDefinition::config::<NatsConfig>)
            .cloned()
            .unwrap_or_default();
        c.servers.clone_from(&join.nats);
        c.fleet = join.fleet.clone().unwrap_or_else(|| "default".to_owned());
        return Some(c);
    }
    let def = def?;
    def.uses(NatsTransport::KIND)
        .then(|| def.config::<NatsConfig>().cloned())
        .flatten()
}

/// What a command joined with: the transport its agent uses, and the QUIC endpoint and NATS
/// connection in it.
pub(crate) struct Joined {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) quic: Option<Arc<QuicTransport>>,
    pub(crate) nats: Option<Arc<NatsTransport>>,
}

impl Joined {
    /// Where it can be reached, as `listen` and `reply` print it.
    pub(crate) fn at(&self) -> String {
        match &self.quic {
            Some(q) => q.local_addr().to_string(),
            None => "NATS".to_owned(),
        }
    }
}

/// The transport a command's agent joins with: the QUIC endpoint (unless only NATS is asked
/// for), the NATS connection (if asked for), or the chain of both, in the definition's order
/// (QUIC first otherwise). A long-running command (`stay`) keeps re-dialing its bootstrap
/// endpoints.
pub(crate) async fn transport(join: &Join, stay: bool) -> Result<Joined, CliError> {
    let def = match &join.definition {
        Some(path) => Some(AgentDefinition::from_file(path)?),
        None => None,
    };
    let nats = nats_config(join, def.as_ref());
    let quic_asked = !join.bootstrap.is_empty()
        || def.as_ref().is_some_and(|d| d.uses(QuicTransport::KIND))
        || nats.is_none();
    let nats_first = def
        .as_ref()
        .is_some_and(|d| d.transports.first().map(|t| t.kind()) == Some(NatsTransport::KIND));
    let nats = match nats {
        Some(config) => {
            let servers = config.servers.join(",");
            let connect = NatsTransport::connect(config);
            match tokio::time::timeout(join.wait, connect).await {
                Ok(Ok(n)) => Some(Arc::new(n)),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(CliError::Unreachable(Error::ConnectionTimeout {
                        addr: aqe_core::Address::named(servers),
                        after: join.wait,
                    }));
                }
            }
        }
        None => None,
    };
    let endpoint = if quic_asked {
        match endpoint_as(join, stay, nats.is_some()).await {
            Ok(q) => Some(q),
            Err(e) => {
                if let Some(n) = &nats {
                    n.shutdown().await;
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    let quic = endpoint.clone().map(|q| q as Arc<dyn Transport>);
    let nats_endpoint = nats.clone();
    let nats = nats.map(|n| n as Arc<dyn Transport>);
    let transport = match (quic, nats) {
        (Some(q), Some(n)) => {
            let (first, second) = if nats_first { (n, q) } else { (q, n) };
            Fallback::chain(first)
                .then(second, FallbackPolicy::default())
                .build()
        }
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => return Err(CliError::Usage("nothing to join with")),
    };
    Ok(Joined {
        transport,
        quic: endpoint,
        nats: nats_endpoint,
    })
}

/// A QUIC endpoint joined to the fleet at `join.bootstrap`.
/// With NATS beside it (`beside_nats`), the endpoint dials its bootstrap endpoints in the
/// background instead: where UDP cannot pass, NATS carries on at once.
async fn endpoint_as(
    join: &Join,
    stay: bool,
    beside_nats: bool,
) -> Result<Arc<QuicTransport>, CliError> {
    let config = config(join, stay || beside_nats)?;
    let transport = QuicTransport::bind(config).await?;
    if beside_nats {
        return Ok(Arc::new(transport));
    }
    if let Err(e) = bootstrap(&transport, join).await {
        // Whatever it reached hears a goodbye: nothing is left behind under this name.
        aqe_core::Transport::shutdown(&transport).await;
        return Err(e);
    }
    Ok(Arc::new(transport))
}

/// Connects `transport` to every bootstrap endpoint of `join`.
async fn bootstrap(transport: &QuicTransport, join: &Join) -> Result<(), CliError> {
    for addr in &join.bootstrap {
        let resolved = tokio::net::lookup_host(addr.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                CliError::Config(Error::Configuration {
                    file: None,
                    field: "--bootstrap".into(),
                    message: format!("{addr} is not a reachable host:port"),
                })
            })?;
        match tokio::time::timeout(join.wait, transport.connect(resolved)).await {
            Ok(Ok(())) => tracing::info!(%addr, "connected"),
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "bootstrap failed");
                return Err(match CliError::from(e) {
                    CliError::Failed(e) => CliError::Unreachable(e),
                    other => other,
                });
            }
            Err(_) => {
                return Err(CliError::Unreachable(Error::ConnectionTimeout {
                    addr: resolved.into(),
                    after: join.wait,
                }));
            }
        }
    }
    Ok(())
}

/// How long the fleet's membership must stay unchanged, once something is known, before an
/// agent missing from it is reported missing: peers learnt from the bootstrap endpoints are
/// dialed and announce their agents within a few round trips.
const SETTLED: Duration = Duration::from_millis(1000);

/// Waits until `agent` knows `id`: up to `join.wait`, or until the membership has been
/// complete (unchanged for [`SETTLED`]) without it, and then names the agents it knows,
/// closest first. Without a bootstrap endpoint there is nobody to ask, and it says so.
pub(crate) async fn agent_known(agent: &Agent, id: &AgentId, join: &Join) -> Result<(), CliError> {
    let started = Instant::now();
    let deadline = started + join.wait;
    let bootstrapped =
        !join.bootstrap.is_empty() || join.definition.is_some() || !join.nats.is_empty();
    let mut seen: Vec<AgentId> = Vec::new();
    let mut changed = started;
    loop {
        let mut peers: Vec<AgentId> = agent
            .discover_peers(&Default::default())
            .into_iter()
            .map(|p| p.id)
            .collect();
        if peers.iter().any(|p| p == id) {
            return Ok(());
        }
        peers.sort();
        let now = Instant::now();
        if peers != seen {
            seen = peers;
            changed = now;
        }
        let settled = !seen.is_empty() && now.duration_since(changed) >= SETTLED;
        if !bootstrapped || settled || now >= deadline {
            return Err(CliError::UnknownAgent {
                agent: id.clone(),
                known: closest(id, &seen),
                bootstrapped,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The known agents, the most alike to `id` first (edit distance), at most five.
fn closest(id: &AgentId, known: &[AgentId]) -> Vec<AgentId> {
    let mut v: Vec<(usize, &AgentId)> = known
        .iter()
        .map(|k| (distance(id.as_str(), k.as_str()), k))
        .collect();
    v.sort();
    v.into_iter().take(5).map(|(_, k)| k.clone()).collect()
}

/// Levenshtein distance, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Waits up to `wait` until `agent` knows at least `n` other agents.
pub(crate) async fn peers_known(agent: &Agent, n: usize, wait: Duration) {
    let deadline = Instant::now() + wait;
    while agent.discover_peers(&Default::default()).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{closest, distance};
    use aqe_core::AgentId;

    #[test]
    fn the_closest_names_come_first() {
        assert_eq!(distance("worker", "worker"), 0);
        assert_eq!(distance("worker", "wroker"), 2);
        assert_eq!(distance("", "abc"), 3);
        let known: Vec<AgentId> = ["monitor", "worker-2", "analyzer", "worker"]
            .into_iter()
            .map(AgentId::from)
            .collect();
        let got = closest(&AgentId::from("workr"), &known);
        assert_eq!(got[0].as_str(), "worker");
        assert_eq!(got[1].as_str(), "worker-2");
    }
}
