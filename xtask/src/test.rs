//! `cargo xtask test [cargo test arguments]`: makes sure what the tests need is installed
//! (`nats-server`; `script` for a test that needs a terminal; `ss` for one that reads a
//! socket's kernel buffer; `python3` and `node` for the bridge's clients; from Debian's
//! packages),
//! then runs the workspace tests with every feature:
//! `cargo test --locked --workspace --all-features`. The NATS tests never skip: without a
//! server they fail, naming what to install.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

pub(crate) fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    ensure_nats_server()?;
    // A CLI test gives a node a terminal; a QUIC test reads a socket's kernel buffer with
    // `ss`; the bridge tests run Python and Node agents.
    for (program, package) in [
        ("script", "bsdutils"),
        ("ss", "iproute2"),
        ("python3", "python3"),
        ("node", "nodejs"),
    ] {
        ensure_program(program, package)?;
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .current_dir(root)
        // Incremental caches would double a clean build's disk use, for a build run once.
        .env(
            "CARGO_INCREMENTAL",
            std::env::var("CARGO_INCREMENTAL").unwrap_or_else(|_| "0".to_owned()),
        )
        .args(["test", "--locked", "--workspace", "--all-features"])
        .args(args)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("the tests failed");
    }
    Ok(())
}

/// Installs `program` (Debian's `package`) when `program --version` does not run.
fn ensure_program(program: &str, package: &str) -> anyhow::Result<()> {
    let present = || {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present() {
        return Ok(());
    }
    println!(
        "{program} is missing; installing it from Debian's packages (apt-get install {package})"
    );
    apt_install(package)?;
    if present() {
        Ok(())
    } else {
        bail!("apt-get installed {package}, but no {program} command was found")
    }
}

/// Installs `nats-server` with apt-get when it is missing.
fn ensure_nats_server() -> anyhow::Result<()> {
    if let Some(path) = aqe_nats::testing::nats_server_binary() {
        println!("nats-server: {}", path.display());
        return Ok(());
    }
    println!(
        "nats-server is missing; installing it from Debian's packages (apt-get install nats-server)"
    );
    apt_install("nats-server")?;
    match aqe_nats::testing::nats_server_binary() {
        Some(path) => {
            println!("nats-server installed: {}", path.display());
            Ok(())
        }
        None => bail!("apt-get installed nats-server, but no nats-server binary was found"),
    }
}

/// `apt-get install PACKAGE`, as root or with sudo, updating the package lists if need be.
fn apt_install(package: &str) -> anyhow::Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| -> bool {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "-q", package]) {
        // The package lists may be stale or absent on a fresh machine.
        let _ = apt(&["update", "-q"]);
        if !apt(&["install", "-y", "-q", package]) {
            bail!(
                "could not install {package} (apt-get install {package}{}); install it and run again",
                if root { "" } else { ", as root or with sudo" }
            );
        }
    }
    Ok(())
}
