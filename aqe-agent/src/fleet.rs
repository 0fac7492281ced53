//! Starting a fleet of agents from a directory of definition files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aqe_core::{AgentId, Error, Result, Transport};

use crate::{Agent, AgentBuilder, AgentDefinition};

/// The agents started from a directory of definitions, and the transports started for them
/// (QUIC endpoints, NATS connections, the fallback chains over them); shuts them all down
/// together.
#[derive(Default)]
pub struct Fleet {
    agents: Vec<Agent>,
    /// QUIC endpoints started for the fleet, by the host and port definitions asked for.
    #[cfg(feature = "quic")]
    quic: Vec<(String, u16, aqe_quic::QuicTransport)>,
    /// NATS connections started for the fleet, by their configuration.
    #[cfg(feature = "nats")]
    nats: Vec<(aqe_nats::NatsConfig, aqe_nats::NatsTransport)>,
    /// Fallback chains, by the QUIC endpoint and NATS connection they start with.
    chains: Vec<(ChainKey, Arc<crate::Fallback>)>,
}

/// Which QUIC endpoint and NATS connection of the fleet's (by index) a chain starts with.
type ChainKey = (Option<usize>, Option<usize>);

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("agents", &self.agents)
            .field("chains", &self.chains.len())
            .finish()
    }
}

impl Fleet {
    /// Starts one agent per definition file of `dir` (`*.json`, `*.jsonc`; comments
    /// allowed), in file-name order, on `transport`. A folder without definitions that has
    /// `.claude/agents/` (the guide's layout) or `agents/` is read from there.
    /// `customize` gets each definition and its builder, to add handlers by agent type.
    ///
    /// A definition asking for QUIC (`enableQUIC`, with the `quic` feature) runs on a QUIC
    /// endpoint at its `host:port`; one with a `natsConfig` (with the `nats` feature) also on
    /// a NATS connection; the agent's transport is then the [`Fallback`](crate::Fallback)
    /// chain QUIC, NATS, `transport`. Definitions naming the same host and port share one QUIC
    /// endpoint (port 0 included), whose options come from the first of them; the same
    /// `natsConfig` shares one connection. Without a feature, the part it would add is left
    /// out and a warning says so.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file (and the field) that is wrong, or the
    /// directory that cannot be read; connection errors of a NATS server. Agents already
    /// started are shut down first.
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

    /// Shuts every agent down, then the transports the fleet started. The transport given
    /// to [`Fleet::from_dir`] is the caller's and keeps running.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.agents.iter().map(Agent::shutdown)).await;
        for (_, chain) in &self.chains {
            chain.close().await;
        }
        #[cfg(feature = "quic")]
        for (_, _, q) in &self.quic {
            q.shutdown().await;
        }
        #[cfg(feature = "nats")]
        for (_, n) in &self.nats {
            n.shutdown().await;
        }
    }

    /// The QUIC endpoints started for the fleet.
    #[cfg(feature = "quic")]
    pub fn quic_endpoints(&self) -> impl Iterator<Item = &aqe_quic::QuicTransport> {
        self.quic.iter().map(|(_, _, q)| q)
    }

    /// The NATS connections started for the fleet.
    #[cfg(feature = "nats")]
    pub fn nats_endpoints(&self) -> impl Iterator<Item = &aqe_nats::NatsTransport> {
        self.nats.iter().map(|(_, n)| n)
    }

    /// The QUIC endpoint for a definition, started if need be; `None` when it asks for none.
    #[cfg_attr(not(feature = "quic"), allow(clippy::unused_async))]
    async fn quic_for(
        &mut self,
        def: &AgentDefinition,
        file: &Path,
        fleet_kind: aqe_core::TransportKind,
    ) -> Result<Option<(usize, Arc<dyn Transport>)>> {
        if !def.enable_quic {
            return Ok(None);
        }
        #[cfg(feature = "quic")]
        {
            if fleet_kind == aqe_quic::QuicTransport::KIND {
                return Ok(None);
            }
            let (host, port) = (&def.quic_config.host, def.quic_config.port);
            if let Some(i) = self
                .quic
                .iter()
                .position(|(h, p, _)| h == host && *p == port)
            {
                return Ok(Some((i, Arc::new(self.quic[i].2.clone()))));
            }
            let quic = aqe_quic::QuicTransport::bind(def.quic_config.clone())
                .await
                .map_err(|e| e.in_config(Some(file), "quicConfig."))?;
            tracing::info!(file = %file.display(), listen = %quic.local_addr(), "QUIC endpoint started");
            self.quic.push((host.clone(), port, quic.clone()));
            Ok(Some((self.quic.len() - 1, Arc::new(quic))))
        }
        #[cfg(not(feature = "quic"))]
        {
            tracing::warn!(file = %file.display(), transport = %fleet_kind,
                "definition enables QUIC, but aqe-agent was built without the `quic` feature; QUIC is left out");
            Ok(None)
        }
    }

    /// The NATS connection for a definition, made if need be; `None` when it asks for none.
    #[cfg_attr(not(feature = "nats"), allow(clippy::unused_async, unused_variables))]
    async fn nats_for(
        &mut self,
        def: &AgentDefinition,
        file: &Path,
        fleet_kind: aqe_core::TransportKind,
    ) -> Result<Option<(usize, Arc<dyn Transport>)>> {
        #[cfg(feature = "nats")]
        {
            let Some(config) = &def.nats_config else {
                return Ok(None);
            };
            if fleet_kind == aqe_nats::NatsTransport::KIND {
                return Ok(None);
            }
            if let Some(i) = self.nats.iter().position(|(c, _)| c == config) {
                return Ok(Some((i, Arc::new(self.nats[i].1.clone()))));
            }
            let nats = aqe_nats::NatsTransport::connect(config.clone())
                .await
                .map_err(|e| e.in_config(Some(file), "natsConfig."))?;
            tracing::info!(file = %file.display(), server = %nats.server(), fleet = %config.fleet, "NATS connection started");
            self.nats.push((config.clone(), nats.clone()));
            Ok(Some((self.nats.len() - 1, Arc::new(nats))))
        }
        #[cfg(not(feature = "nats"))]
        Ok(None)
    }

    /// The transport for a definition: the fleet's, or the chain QUIC, NATS, the fleet's.
    async fn transport_for(
        &mut self,
        def: &AgentDefinition,
        file: &Path,
        fleet: &Arc<dyn Transport>,
    ) -> Result<Arc<dyn Transport>> {
        let quic = self.quic_for(def, file, fleet.kind()).await?;
        let nats = self.nats_for(def, file, fleet.kind()).await?;
        let key = (quic.as_ref().map(|q| q.0), nats.as_ref().map(|n| n.0));
        if key == (None, None) {
            return Ok(fleet.clone());
        }
        if let Some((_, chain)) = self.chains.iter().find(|(k, _)| *k == key) {
            return Ok(chain.clone());
        }
        let mut links = quic.into_iter().chain(nats).map(|(_, t)| t);
        let Some(first) = links.next() else {
            return Ok(fleet.clone());
        };
        let mut builder = crate::Fallback::chain(first);
        for t in links {
            builder = builder.then(t, crate::FallbackPolicy::default());
        }
        let chain = builder
            .then(fleet.clone(), crate::FallbackPolicy::default())
            .build();
        self.chains.push((key, chain.clone()));
        Ok(chain)
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

/// The definition files `dir` holds: its `.json`/`.jsonc` files that look like definitions
/// ([`AgentDefinition::looks_like`]; the others are skipped, and a warning names them), or,
/// when it has none, every one of `.claude/agents/` (the guide's layout) or `agents/`.
async fn definition_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for path in definitions_in(dir).await? {
        let looks = tokio::fs::read_to_string(&path)
            .await
            .is_ok_and(|text| AgentDefinition::looks_like(&text));
        if looks {
            files.push(path);
        } else {
            skipped.push(path);
        }
    }
    if !files.is_empty() {
        if !skipped.is_empty() {
            tracing::warn!(skipped = ?skipped, "JSON files that are no agent definitions skipped");
        }
        return Ok(files);
    }
    // A project folder laid out as the guide's: definitions under `.claude/agents/`.
    for sub in [".claude/agents", "agents"] {
        let nested = dir.join(sub);
        if tokio::fs::metadata(&nested).await.is_ok_and(|m| m.is_dir()) {
            let files = definitions_in(&nested).await?;
            if !files.is_empty() {
                if !skipped.is_empty() {
                    tracing::info!(dir = %nested.display(), skipped = ?skipped, "definitions read from the project's agents folder; the JSON files beside it skipped");
                }
                return Ok(files);
            }
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(skipped = ?skipped, "JSON files that are no agent definitions skipped");
    }
    Ok(files)
}

/// The `.json` and `.jsonc` files of `dir`, in name order.
async fn definitions_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let unreadable = |e: std::io::Error| Error::Configuration {
        file: Some(dir.to_path_buf()),
        field: "(directory)".to_owned(),
        message: e.to_string(),
    };
    let mut entries = tokio::fs::read_dir(dir).await.map_err(unreadable)?;
    let mut files = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(unreadable)? {
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|e| e == "json" || e == "jsonc")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
