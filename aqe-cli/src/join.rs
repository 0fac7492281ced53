//! Joining a fleet from the command line: a QUIC endpoint configured from the options (or a
//! definition file), connected to the bootstrap endpoints, and waiting for agents.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_agent::{Agent, AgentDefinition, QuicTransport};
use aqe_core::{AgentId, Error, Token};
use aqe_quic::QuicConfig;

use crate::cli::Join;
use crate::error::CliError;

/// The endpoint's configuration the options describe.
fn config(join: &Join) -> Result<QuicConfig, CliError> {
    let mut c = match &join.definition {
        Some(path) => AgentDefinition::from_file(path)?.quic_config,
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
    if let Some(t) = &join.token {
        s.enable_token_auth = true;
        s.token = Some(Token::new(t.clone()));
    }
    // A command-line endpoint dials; it also learns the fleet from its bootstrap peers.
    c.connection_timeout = c
        .connection_timeout
        .min(join.wait.max(Duration::from_secs(1)));
    Ok(c)
}

/// A QUIC endpoint joined to the fleet at `join.bootstrap`.
pub(crate) async fn endpoint(join: &Join) -> Result<Arc<QuicTransport>, CliError> {
    let config = config(join)?;
    let transport = QuicTransport::bind(config).await?;
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
    Ok(Arc::new(transport))
}

/// Waits up to `wait` until `agent` knows `id`.
pub(crate) async fn agent_known(
    agent: &Agent,
    id: &AgentId,
    wait: Duration,
) -> Result<(), CliError> {
    let deadline = Instant::now() + wait;
    loop {
        let peers = agent.discover_peers(&Default::default());
        if peers.iter().any(|p| &p.id == id) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let known: Vec<String> = peers.iter().map(|p| p.id.to_string()).collect();
            tracing::info!(known = ?known, "agents known");
            return Err(CliError::Unreachable(Error::PeerNotFound {
                peer: id.clone(),
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `wait` until `agent` knows at least `n` other agents.
pub(crate) async fn peers_known(agent: &Agent, n: usize, wait: Duration) {
    let deadline = Instant::now() + wait;
    while agent.discover_peers(&Default::default()).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
