//! `aqe context`: named sets of joining options saved in a file, as `nats context` does, so
//! that a command needs none of them on its line. Options on the line or in the environment
//! win over the context's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::{ContextCmd, Join};
use crate::error::CliError;

/// What a context holds: the joining options that were given when it was added.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Context {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bootstrap: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    definition: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nats: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet: Option<String>,
}

/// Where contexts live: `AQE_CONTEXT_DIR`, else `$XDG_CONFIG_HOME/aqe`, else
/// `$HOME/.config/aqe`.
fn dir() -> Result<PathBuf, CliError> {
    if let Some(d) = std::env::var_os("AQE_CONTEXT_DIR") {
        return Ok(PathBuf::from(d));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or(CliError::Usage(
            "no place for contexts: set AQE_CONTEXT_DIR, XDG_CONFIG_HOME or HOME",
        ))?;
    Ok(config.join("aqe"))
}

fn file_of(dir: &Path, name: &str) -> Result<PathBuf, CliError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !valid {
        return Err(CliError::Usage(
            "a context's name is letters, digits, '-', '_' and '.' (not first)",
        ));
    }
    Ok(dir.join("contexts").join(format!("{name}.json")))
}

fn read(path: &Path) -> Result<Context, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::File {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        CliError::Config(aqe_core::Error::Configuration {
            file: Some(path.to_path_buf()),
            field: "(context)".into(),
            message: e.to_string(),
        })
    })
}

fn write(path: &Path, text: &str) -> Result<(), CliError> {
    let io = |source| CliError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)
}

/// The selected context's name, if one is selected.
fn selected(dir: &Path) -> Option<String> {
    let name = std::fs::read_to_string(dir.join("current")).ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Absolute, so that the context works from any folder.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Fills what `join` leaves unset from its context (`--context`, else the selected one).
pub(crate) fn apply(join: &mut Join) -> Result<(), CliError> {
    let dir = match (&join.context, dir()) {
        (Some(_), Err(e)) => return Err(e),
        (None, Err(_)) => return Ok(()),
        (_, Ok(d)) => d,
    };
    let Some(name) = join.context.clone().or_else(|| selected(&dir)) else {
        return Ok(());
    };
    let c = read(&file_of(&dir, &name)?)?;
    if join.bootstrap.is_empty() {
        join.bootstrap = c.bootstrap;
    }
    if join.nats.is_empty() {
        join.nats = c.nats;
    }
    // A definition on the line replaces the context's certificates, and the reverse.
    let own_credentials = join.definition.is_some() || join.certs.is_some() || join.cert.is_some();
    if !own_credentials {
        join.definition = c.definition;
        join.certs = c.certs;
    }
    join.name = join.name.take().or(c.name);
    join.token = join.token.take().or(c.token);
    join.fleet = join.fleet.take().or(c.fleet);
    tracing::debug!(context = %name, "joining options from the context");
    Ok(())
}

pub(crate) fn run(cmd: ContextCmd) -> Result<(), CliError> {
    let dir = dir()?;
    match cmd {
        ContextCmd::Add { label: name, join } => {
            let c = Context {
                bootstrap: join.bootstrap,
                definition: join.definition.as_deref().map(absolute),
                certs: join.certs.as_deref().map(absolute),
                name: join.name,
                token: join.token,
                nats: join.nats,
                fleet: join.fleet,
            };
            let path = file_of(&dir, &name)?;
            let text = serde_json::to_string_pretty(&c).unwrap_or_default();
            write(&path, &text)?;
            println!("context {name} saved in {}", path.display());
        }
        ContextCmd::Select { name } => {
            let path = file_of(&dir, &name)?;
            read(&path)?;
            write(&dir.join("current"), &format!("{name}\n"))?;
            println!("context {name} selected");
        }
        ContextCmd::Ls => {
            let current = selected(&dir);
            let mut names: Vec<String> = std::fs::read_dir(dir.join("contexts"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let p = e.path();
                    (p.extension()? == "json")
                        .then(|| p.file_stem()?.to_str().map(str::to_owned))
                        .flatten()
                })
                .collect();
            names.sort();
            for n in names {
                let mark = if current.as_deref() == Some(n.as_str()) {
                    "*"
                } else {
                    " "
                };
                println!("{mark} {n}");
            }
        }
        ContextCmd::Show { name } => {
            let name = name
                .or_else(|| selected(&dir))
                .ok_or(CliError::Usage("no context selected; name one"))?;
            let mut c = read(&file_of(&dir, &name)?)?;
            if c.token.is_some() {
                c.token = Some("(hidden)".to_owned());
            }
            println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
        }
        ContextCmd::Rm { name } => {
            let path = file_of(&dir, &name)?;
            std::fs::remove_file(&path).map_err(|source| CliError::File {
                path: path.clone(),
                source,
            })?;
            if selected(&dir).as_deref() == Some(name.as_str()) {
                let _ = std::fs::remove_file(dir.join("current"));
            }
            println!("context {name} removed");
        }
    }
    Ok(())
}
