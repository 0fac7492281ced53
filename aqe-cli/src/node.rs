//! `aqe node DIR`: the agents of a folder of definitions, until Ctrl-C (or SIGTERM).

use std::sync::Arc;

use aqe_agent::{EventBus, Fleet, HandlerError};
use aqe_core::Payload;

use crate::cli::NodeArgs;
use crate::error::CliError;
use crate::payload;

pub(crate) async fn run(args: NodeArgs) -> Result<(), CliError> {
    let bus = Arc::new(EventBus::new());
    // Agents of a node answer requests with what they were sent and log their messages:
    // a node is where a fleet lives; its behaviour comes from the programs built on aqe.
    // Definitions without an id (as the guide writes them): their agents get a random one.
    let mut unnamed = Vec::new();
    let fleet = Fleet::from_dir(&args.dir, bus, |def, builder| {
        if def.id.is_none() {
            unnamed.push(def.agent_type.clone());
        }
        builder
            .on_request_payload(|_agent, req| async move {
                Ok::<_, HandlerError>(Payload {
                    encoding: req.encoding,
                    bytes: req.payload.clone(),
                })
            })
            .on_message(|agent, env| async move {
                tracing::info!(agent = %agent.id(), from = %env.from, channel = %env.channel, payload = %payload::show(&env), "message");
            })
            // Streams are taken and logged line by line, so `aqe stream` loses nothing.
            .on_stream(|agent, mut stream| async move {
                let from = stream.header().from.clone();
                let mut lines = 0u64;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => {
                            for line in String::from_utf8_lossy(&chunk.data).lines() {
                                lines += 1;
                                tracing::info!(agent = %agent.id(), %from, line, "stream");
                            }
                            if chunk.fin {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(agent = %agent.id(), %from, error = %e, "stream failed");
                            return;
                        }
                    }
                }
                tracing::info!(agent = %agent.id(), %from, lines, "stream ended");
            })
    })
    .await?;
    if fleet.agents().is_empty() {
        return Err(CliError::Config(aqe_core::Error::Configuration {
            file: Some(args.dir.clone()),
            field: "(directory)".into(),
            message: "no agent definitions (*.json, *.jsonc) here or in .claude/agents/".into(),
        }));
    }
    for q in fleet.endpoints::<aqe_agent::QuicTransport>() {
        println!("listening on {}", q.local_addr());
        if q.config().security.cert_path.is_none() {
            tracing::warn!(listen = %q.local_addr(),
                "this QUIC endpoint has a development certificate that only this process trusts: no other process or aqe command can join it. Make a fleet's certificates with `aqe certs init certs` and `aqe certs issue certs NAME --ip ADDR`, and name them in quicConfig.security (certPath, keyPath, caPath)");
        }
    }
    for a in fleet.agents() {
        println!("agent {} ({})", a.id(), a.registration().agent_type);
        let agent_type = &a.registration().agent_type;
        if unnamed.contains(agent_type) && a.id().as_str().starts_with(agent_type.as_str()) {
            tracing::warn!(agent = %a.id(),
                "its definition has no \"id\", so it got a random one that changes at every start; give it one (\"id\": \"{agent_type}\") for commands to reach it by name");
        }
    }
    let metrics = match args.metrics {
        Some(addr) => {
            let metrics = aqe_agent::Metrics::new(fleet.agents().iter().cloned());
            let server = aqe_agent::MetricsServer::bind(addr, metrics).await?;
            println!("metrics at http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    tracing::info!(
        agents = fleet.agents().len(),
        "node running; Ctrl-C to stop"
    );
    wait_for_signal().await;
    tracing::info!("stopping");
    if let Some(server) = metrics {
        server.shutdown().await;
    }
    fleet.shutdown().await;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
