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
    /// The arguments do not fit together.
    #[error("{0}")]
    Usage(&'static str),
}

impl CliError {
    /// The process's exit code: 2 usage, 3 configuration or files, 4 security,
    /// 5 unreachable, 1 any other failure.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Usage(_) => 2,
            CliError::File { .. } | CliError::Config(_) => 3,
            CliError::Security(_) => 4,
            CliError::Unreachable(_) => 5,
            CliError::Failed(_) => 1,
        })
    }
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
