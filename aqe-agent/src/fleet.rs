//! Starting a fleet of agents from a directory of definition files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aqe_core::{AgentId, Error, Result, Started, Transport, TransportConfig};

use crate::{Agent, AgentBuilder, AgentDefinition};

/// The agents started from a directory of definitions, and the transports started for them
/// (QUIC endpoints, NATS connections, the fallback chains over them); shuts them all down
/// together.
#[derive(Default)]
pub struct Fleet {
    agents: Vec<Agent>,
    /// Transports started for the fleet, with the configuration that started them.
    started: Vec<(Arc<dyn TransportConfig>, Started)>,
    /// Fallback chains, by the started transports they go through (indices into
    /// `started`, in order).
    chains: Vec<(Vec<usize>, Arc<crate::Fallback>)>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("agents", &self.agents)
            .field("transports", &self.started.len())
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
    /// A definition's transports ([`AgentDefinition::transports`]: `enableQUIC` with its
    /// `quicConfig`, a `natsConfig`, in `chain` order) are started for it, and the agent's
    /// transport is then the [`Fallback`](crate::Fallback) chain of them, then `transport`.
    /// Definitions whose configurations share a transport (QUIC: the same host and port,
    /// port 0 included, with the first one's options; NATS: the same configuration) share
    /// it. A transport of `transport`'s own kind is not started again.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file (and the field) that is wrong, or the
    /// directory that cannot be read; what starting a transport meets (a NATS server that
    /// does not answer is not an error: the connection is made when it does). Agents already
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

    /// The transports started for the fleet, in the order they were started.
    pub fn transports(&self) -> impl Iterator<Item = &Started> {
        self.started.iter().map(|(_, s)| s)
    }

    /// The transports started for the fleet that are of type `T` (`aqe_quic::QuicTransport`).
    pub fn endpoints<T: 'static>(&self) -> impl Iterator<Item = &T> {
        self.transports().filter_map(Started::as_type)
    }

    /// Shuts every agent down, then the transports the fleet started. The transport given
    /// to [`Fleet::from_dir`] is the caller's and keeps running.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.agents.iter().map(Agent::shutdown)).await;
        for (_, chain) in &self.chains {
            chain.close().await;
        }
        futures::future::join_all(self.started.iter().map(|(_, s)| s.transport.shutdown())).await;
    }

    /// The started transport for `config`: one that serves it already, or a new one.
    async fn start(&mut self, config: &Arc<dyn TransportConfig>, file: &Path) -> Result<usize> {
        if let Some(i) = self
            .started
            .iter()
            .position(|(c, _)| config.shares_with(&**c))
        {
            return Ok(i);
        }
        // A fleet runs until stopped: a transport whose server is away connects later.
        let started = config
            .start_persistent()
            .await
            .map_err(|e| e.in_config(Some(file), ""))?;
        tracing::info!(file = %file.display(), transport = %config.kind(), "transport started");
        self.started.push((config.clone(), started));
        Ok(self.started.len() - 1)
    }

    /// The transport for a definition: the fleet's, or the chain of its transports, then
    /// the fleet's.
    async fn transport_for(
        &mut self,
        def: &AgentDefinition,
        file: &Path,
        fleet: &Arc<dyn Transport>,
    ) -> Result<Arc<dyn Transport>> {
        let mut key = Vec::new();
        for config in def.transports.iter().filter(|c| c.kind() != fleet.kind()) {
            key.push(self.start(config, file).await?);
        }
        if key.is_empty() {
            return Ok(fleet.clone());
        }
        if let Some((_, chain)) = self.chains.iter().find(|(k, _)| *k == key) {
            return Ok(chain.clone());
        }
        let mut links = key.iter().map(|&i| self.started[i].1.transport.clone());
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
