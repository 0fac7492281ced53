//! `cargo xtask fuzz [SECS]`: runs every fuzz target of `fuzz/` (cargo-fuzz, nightly) for SECS
//! seconds each (default 60), and fails if any finds a crash. Installs cargo-fuzz if missing.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub(crate) fn fuzz(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let secs: u64 = match args.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("seconds per target: {s}"))?,
        None => 60,
    };
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        bail!("cargo xtask fuzz needs the nightly toolchain (rustup toolchain install nightly)");
    }
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_fuzz {
        println!("installing cargo-fuzz");
        let status = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()?;
        if !status.success() {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    let dir = root.join("fuzz");
    let list = Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "fuzz", "list"])
        .output()
        .context("cargo fuzz list")?;
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    if targets.is_empty() {
        bail!("no fuzz targets found in {}", dir.display());
    }
    let status = Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "fuzz", "build"])
        .status()?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    println!(
        "fuzzing {} targets for {secs} s each (AddressSanitizer)",
        targets.len()
    );
    let mut failed = Vec::new();
    let mut rows = Vec::new();
    for t in &targets {
        let out = Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", t, "--"])
            .arg(format!("-max_total_time={secs}"))
            .arg("-rss_limit_mb=2048")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Done ").and_then(|r| r.split(' ').next()))
            .unwrap_or("?")
            .to_owned();
        let verdict = if out.status.success() {
            "clean".to_owned()
        } else {
            let artifact = log
                .lines()
                .find(|l| l.contains("Test unit written to"))
                .unwrap_or("(see the output)")
                .to_owned();
            failed.push(format!("{t}: {artifact}"));
            "CRASH".to_owned()
        };
        println!("  {t:<12} {runs:>12} runs  {verdict}");
        rows.push((t.clone(), runs, verdict));
    }
    if failed.is_empty() {
        println!("every target ran {secs} s clean");
        Ok(())
    } else {
        bail!("fuzzing found crashes:\n  {}", failed.join("\n  "))
    }
}
