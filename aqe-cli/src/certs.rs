//! `aqe certs`: a fleet CA and the node certificates it signs, as files an endpoint's
//! definition points at (`security.certPath`, `keyPath`, `caPath`).

use std::path::{Path, PathBuf};

use aqe_quic::certs::FleetCa;

use crate::cli::Certs;
use crate::error::CliError;

fn write(path: PathBuf, text: &str, private: bool) -> Result<(), CliError> {
    let fail = |source| CliError::File {
        path: path.clone(),
        source,
    };
    std::fs::write(&path, text).map_err(fail)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    println!("wrote {}", path.display());
    Ok(())
}

fn read(path: PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(&path).map_err(|source| CliError::File { path, source })
}

/// Loads the CA of `dir`, naming the file that is wrong.
fn load_ca(dir: &Path) -> Result<FleetCa, CliError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let cert_pem = read(cert.clone())?;
    let key_pem = read(key.clone())?;
    FleetCa::from_pem(&cert_pem, &key_pem).map_err(|e| {
        let message = chain(&e);
        CliError::Config(aqe_core::Error::Configuration {
            file: Some(if message.contains("CA key") {
                key
            } else {
                cert
            }),
            field: "(file)".into(),
            message,
        })
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

pub(crate) fn run(c: Certs) -> Result<(), CliError> {
    match c {
        Certs::Init { dir, name, force } => {
            std::fs::create_dir_all(&dir).map_err(|source| CliError::File {
                path: dir.clone(),
                source,
            })?;
            if dir.join("ca.key").exists() && !force {
                return Err(CliError::Usage(
                    "a CA is already there (ca.key): use --force to replace it",
                ));
            }
            let ca = FleetCa::generate(&name)?;
            write(dir.join("ca.pem"), ca.cert_pem(), false)?;
            write(dir.join("ca.key"), ca.key_pem(), true)?;
            Ok(())
        }
        Certs::Issue {
            dir,
            name,
            ip,
            dns,
            server_name,
        } => {
            if name.is_empty() || name.contains(['/', '\\']) || name == "ca" {
                return Err(CliError::Usage(
                    "NAME must be a plain file name other than \"ca\"",
                ));
            }
            let ca = load_ca(&dir)?;
            let node = ca.issue(&name, &server_name, &ip, &dns)?;
            write(dir.join(format!("{name}.pem")), &node.cert_pem, false)?;
            write(dir.join(format!("{name}.key")), &node.key_pem, true)?;
            println!("endpoint id {:016x}", node.endpoint_id);
            Ok(())
        }
    }
}
