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
    let fleet = Fleet::from_dir(&args.dir, bus, |_def, builder| {
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
    }
    for a in fleet.agents() {
        println!("agent {} ({})", a.id(), a.registration().agent_type);
    }
    tracing::info!(
        agents = fleet.agents().len(),
        "node running; Ctrl-C to stop"
    );
    wait_for_signal().await;
    tracing::info!("stopping");
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
