//! The repository's own tools.
//!
//! `cargo xtask test [cargo test arguments]`: installs what the tests need (`nats-server`)
//! when it is missing, then runs `cargo test --locked --workspace --all-features`: the
//! README's test command.
//!
//! `cargo xtask fuzz [SECS]`: runs every fuzz target of `fuzz/` (cargo-fuzz, nightly) for
//! SECS seconds (default 60) and fails on a crash.
//!
//! `cargo xtask lab [udp]`: aqe between separate processes in network namespaces, under 0 to
//! 10 % packet loss, with a receiver killed by SIGKILL, and with UDP blocked between the hosts
//! while NATS carries on (`udp`: that scenario only); prints sent / received / duplicated /
//! reordered / failed per scenario (root only; see `lab.rs`).
//!
//! `cargo xtask bench [criterion args]`: runs the latency benchmarks (pinned to CPU 0 with
//! `taskset` when available, since a wake-up that crosses CPUs costs tens of microseconds on a
//! small VM), then prints each median with its ratio to the floor measured in the same run,
//! and writes the table to `target/aqe-bench.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod fuzz;
mod lab;
mod test;

/// What each measurement is compared with: (benchmark, floor, what it shows).
const COMPARISONS: &[(&str, &str, &str)] = &[
    (
        "floor/tokio_mpsc",
        "floor/tokio_mpsc",
        "raw tokio channel + task (in-process floor)",
    ),
    (
        "aqe/bus_agent",
        "floor/tokio_mpsc",
        "agent request over the event bus",
    ),
    (
        "floor/s2n_quic_same_stream",
        "floor/s2n_quic_same_stream",
        "raw s2n-quic, one long-lived stream (QUIC floor)",
    ),
    (
        "floor/s2n_quic_new_stream",
        "floor/s2n_quic_same_stream",
        "raw s2n-quic, a new stream per request",
    ),
    (
        "aqe/quic_agent",
        "floor/s2n_quic_same_stream",
        "agent request over QUIC",
    ),
    (
        "reference/nats_request_reply",
        "floor/s2n_quic_same_stream",
        "NATS request/reply via a local nats-server (reference)",
    ),
    (
        "aqe/quic_agent",
        "reference/nats_request_reply",
        "agent request over QUIC, against NATS",
    ),
];

const GROUP: &str = "request_response_64B";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("lab") => lab::lab(&workspace_root(), args.get(1).is_some_and(|a| a == "udp")),
        Some("fuzz") => fuzz::fuzz(&workspace_root(), &args[1..]),
        Some("test") => test::test(&workspace_root(), &args[1..]),
        _ => bail!(
            "usage: cargo xtask test [cargo test arguments] | cargo xtask bench [criterion arguments] | cargo xtask lab [udp] | cargo xtask fuzz [SECS]"
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn bench(extra: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    let pinned = Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", "cargo"]);
        c
    } else {
        eprintln!("taskset not found: running unpinned (figures are then much noisier)");
        Command::new("cargo")
    };
    cmd.current_dir(&root)
        .args([
            "bench",
            "--locked",
            "-p",
            "aqe-benches",
            "--bench",
            "latency",
            "--",
        ])
        .args(extra);
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed: {status}");
    }
    let criterion = root.join("target").join("criterion").join(GROUP);
    let mut table = format!(
        "request/response, 64-byte payloads, medians{}\n\n| benchmark | median | ratio to floor | floor | what |\n|---|---|---|---|---|\n",
        if pinned {
            ", pinned to CPU 0"
        } else {
            ", unpinned"
        }
    );
    for (name, floor, what) in COMPARISONS {
        let (Some(m), Some(f)) = (median_ns(&criterion, name)?, median_ns(&criterion, floor)?)
        else {
            table.push_str(&format!("| {name} | (not run) | | {floor} | {what} |\n"));
            continue;
        };
        table.push_str(&format!(
            "| {name} | {:.1} us | {:.2}x | {floor} | {what} |\n",
            m / 1e3,
            m / f
        ));
    }
    println!("\n{table}");
    let out = root.join("target").join("aqe-bench.md");
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    println!("written to {}", out.display());
    Ok(())
}

/// The median of a benchmark's last run, in nanoseconds, if it ran.
fn median_ns(group_dir: &Path, name: &str) -> anyhow::Result<Option<f64>> {
    let file = group_dir
        .join(name.replace('/', "_"))
        .join("new")
        .join("estimates.json");
    if !file.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    Ok(v["median"]["point_estimate"].as_f64())
}
