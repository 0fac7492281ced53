//! Starting a fleet of agents from a directory of definition files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aqe_core::{AgentId, Error, Result, Transport};

use crate::{Agent, AgentBuilder, AgentDefinition};

/// The agents started from a directory of definitions, and the QUIC endpoints started for
/// them; shuts them all down together.
#[derive(Default)]
pub struct Fleet {
    agents: Vec<Agent>,
    /// QUIC endpoints started for the fleet, each with its fallback to the fleet's transport.
    endpoints: Vec<FleetEndpoint>,
}

/// A QUIC endpoint the fleet started, by the host and port definitions asked for.
#[cfg_attr(not(feature = "quic"), allow(dead_code))]
struct FleetEndpoint {
    host: String,
    port: u16,
    #[cfg(feature = "quic")]
    quic: aqe_quic::QuicTransport,
    fallback: Arc<crate::Fallback>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("agents", &self.agents)
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Fleet {
    /// Starts one agent per `*.json` file of `dir`, in file-name order, on `transport`.
    /// `customize` gets each definition and its builder, to add handlers by agent type.
    ///
    /// A definition asking for QUIC (`enableQUIC`), with the `quic` feature, runs on a QUIC
    /// endpoint at its `host:port` with a [`Fallback`](crate::Fallback) to `transport`.
    /// Definitions naming the same host and port share one endpoint (port 0 included: one
    /// endpoint for all of them), whose options come from the first of them. Without the
    /// feature, such a definition runs on `transport`, and a warning says so.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file (and the field) that is wrong, or the
    /// directory that cannot be read. Agents already started are shut down first.
    pub async fn from_dir<F>(
        dir: impl AsRef<Path>,
        transport: Arc<dyn Transport>,
        mut customize: F,
    ) -> Result<Self>
    where
        F: FnMut(&AgentDefinition, AgentBuilder) -> AgentBuilder,
    {
        let dir = dir.as_ref();
        let files = definition_files(dir).await?;
        let mut fleet = Fleet::default();
        for file in files {
            match fleet.start_one(&file, &transport, &mut customize).await {
                Ok(agent) => fleet.agents.push(agent),
                Err(e) => {
                    fleet.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(fleet)
    }

    /// The agents, in file-name order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The agent with this id.
    pub fn get(&self, id: &AgentId) -> Option<&Agent> {
        self.agents.iter().find(|a| a.id() == id)
    }

    /// Shuts every agent down, then the QUIC endpoints the fleet started. The transport
    /// given to [`Fleet::from_dir`] is the caller's and keeps running.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.agents.iter().map(Agent::shutdown)).await;
        for e in &self.endpoints {
            e.fallback.close().await;
            #[cfg(feature = "quic")]
            e.quic.shutdown().await;
        }
    }

    /// The QUIC endpoints started for the fleet.
    #[cfg(feature = "quic")]
    pub fn quic_endpoints(&self) -> impl Iterator<Item = &aqe_quic::QuicTransport> {
        self.endpoints.iter().map(|e| &e.quic)
    }

    /// The transport for a definition: the fleet's, or a QUIC endpoint falling back to it.
    async fn transport_for(
        &mut self,
        def: &AgentDefinition,
        file: &Path,
        fallback: &Arc<dyn Transport>,
    ) -> Result<Arc<dyn Transport>> {
        if !def.enable_quic {
            return Ok(fallback.clone());
        }
        #[cfg(feature = "quic")]
        {
            if fallback.kind() == aqe_quic::QuicTransport::KIND {
                return Ok(fallback.clone());
            }
            let (host, port) = (&def.quic_config.host, def.quic_config.port);
            if let Some(e) = self
                .endpoints
                .iter()
                .find(|e| &e.host == host && e.port == port)
            {
                return Ok(e.fallback.clone());
            }
            let quic = aqe_quic::QuicTransport::bind(def.quic_config.clone())
                .await
                .map_err(|e| e.in_config(Some(file), "quicConfig."))?;
            tracing::info!(file = %file.display(), listen = %quic.local_addr(), "QUIC endpoint started");
            let both = crate::Fallback::new(
                Arc::new(quic.clone()),
                fallback.clone(),
                crate::FallbackPolicy::default(),
            );
            self.endpoints.push(FleetEndpoint {
                host: host.clone(),
                port,
                quic,
                fallback: both.clone(),
            });
            Ok(both)
        }
        #[cfg(not(feature = "quic"))]
        {
            tracing::warn!(file = %file.display(), transport = %fallback.kind(),
                "definition enables QUIC, but aqe-agent was built without the `quic` feature; using the fleet's transport");
            Ok(fallback.clone())
        }
    }

    async fn start_one<F>(
        &mut self,
        file: &Path,
        transport: &Arc<dyn Transport>,
        customize: &mut F,
    ) -> Result<Agent>
    where
        F: FnMut(&AgentDefinition, AgentBuilder) -> AgentBuilder,
    {
        let text = tokio::fs::read_to_string(file)
            .await
            .map_err(|e| Error::Configuration {
                file: Some(file.to_path_buf()),
                field: "(file)".to_owned(),
                message: e.to_string(),
            })?;
        let def = AgentDefinition::from_json(&text, Some(file))?;
        let transport = self.transport_for(&def, file, transport).await?;
        let builder = customize(&def, Agent::builder().definition(&def).transport(transport));
        builder
            .start()
            .await
            .map_err(|e| e.in_config(Some(file), ""))
    }
}

async fn definition_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let unreadable = |e: std::io::Error| Error::Configuration {
        file: Some(dir.to_path_buf()),
        field: "(directory)".to_owned(),
        message: e.to_string(),
    };
    let mut entries = tokio::fs::read_dir(dir).await.map_err(unreadable)?;
    let mut files = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(unreadable)? {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
