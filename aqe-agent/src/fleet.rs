//! Starting a fleet of agents from a directory of definition files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aqe_core::{AgentDefinition, AgentId, Error, Result, Transport};

use crate::{Agent, AgentBuilder};

/// The agents started from a directory of definitions; shuts them down together.
#[derive(Debug, Default)]
pub struct Fleet {
    agents: Vec<Agent>,
}

impl Fleet {
    /// Starts one agent per `*.json` file of `dir`, in file-name order, on `transport`.
    /// `customize` gets each definition and its builder, to add handlers by agent type.
    ///
    /// A definition asking for QUIC (`enableQUIC`) runs on `transport` all the same when
    /// this build has no QUIC transport; a warning says so.
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
            match start_one(&file, &transport, &mut customize).await {
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

    /// Shuts every agent down.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.agents.iter().map(Agent::shutdown)).await;
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

async fn start_one<F>(
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
    if def.enable_quic && transport.kind() != aqe_core::TransportKind::Quic {
        tracing::warn!(file = %file.display(), transport = %transport.kind(),
            "definition enables QUIC, but the fleet's transport is not QUIC; using it anyway");
    }
    let builder = customize(
        &def,
        Agent::builder()
            .definition(&def)
            .transport(transport.clone()),
    );
    builder.start().await.map_err(|e| match e {
        Error::Configuration {
            file: None,
            field,
            message,
        } => Error::Configuration {
            file: Some(file.to_path_buf()),
            field,
            message,
        },
        other => other,
    })
}
