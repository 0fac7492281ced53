//! What can go wrong, each with its exit code: part of the interface, like the messages.

use std::path::PathBuf;
use std::process::ExitCode;

use aqe_core::Error;

/// A failed command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CliError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The command line or a file says something that cannot work (a certificate file that
    /// cannot be loaded included).
    #[error(transparent)]
    Config(Error),
    /// A certificate, key or token was refused, or could not be loaded.
    #[error(transparent)]
    Security(Error),
    /// The fleet, or the agent named, could not be reached.
    #[error(transparent)]
    Unreachable(Error),
    /// The operation reached its peer and failed there, or timed out.
    #[error(transparent)]
    Failed(Error),
    /// The agent named is not in the fleet as far as it could be seen.
    #[error("agent {agent} not found{}", unknown_hint(known, *bootstrapped))]
    UnknownAgent {
        /// The agent asked for.
        agent: aqe_core::AgentId,
        /// Agents that are known, the closest names first.
        known: Vec<aqe_core::AgentId>,
        /// Whether a bootstrap endpoint was given.
        bootstrapped: bool,
    },
    /// The arguments do not fit together.
    #[error("{0}")]
    Usage(&'static str),
    /// The program `aqe agent` ran exited with this status (its own exit code).
    #[error("the agent's program exited with status {0}")]
    Child(i32),
}

impl CliError {
    /// The process's exit code: 2 usage, 3 configuration or files, 4 security,
    /// 5 unreachable, 1 any other failure.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Usage(_) => 2,
            CliError::File { .. } | CliError::Config(_) => 3,
            CliError::Security(_) => 4,
            CliError::Unreachable(_) | CliError::UnknownAgent { .. } => 5,
            CliError::Failed(_) => 1,
            CliError::Child(code) => u8::try_from(*code).unwrap_or(1),
        })
    }
}

/// What follows "agent X not found": why, and what is there instead.
fn unknown_hint(known: &[aqe_core::AgentId], bootstrapped: bool) -> String {
    if !bootstrapped {
        return ": no --bootstrap (or --definition) given, so there is no fleet to ask; add --bootstrap HOST:PORT".into();
    }
    if known.is_empty() {
        return ": the fleet announced no agents".into();
    }
    let names: Vec<&str> = known.iter().map(aqe_core::AgentId::as_str).collect();
    format!("; known agents, closest first: {}", names.join(", "))
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        match e {
            Error::Configuration { .. }
            | Error::Security {
                kind: aqe_core::SecurityFailure::CertificateLoad,
                ..
            } => CliError::Config(e),
            Error::Security { .. } => CliError::Security(e),
            e if e.is_unreachable() && !matches!(e, Error::Timeout { .. }) => {
                CliError::Unreachable(e)
            }
            e => CliError::Failed(e),
        }
    }
}
