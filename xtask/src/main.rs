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
//! `cargo xtask bench [--quick] [criterion args]`: runs the guide's operations on every
//! transport beside their floors (pinned to CPU 0), prints the comparison and writes
//! `target/aqe-bench/report.{md,json,svg}` (see `bench.rs`).

use std::path::{Path, PathBuf};

use anyhow::bail;

mod bench;
mod fuzz;
mod lab;
mod test;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench::bench(&workspace_root(), &args[1..]),
        Some("lab") => lab::lab(&workspace_root(), args.get(1).is_some_and(|a| a == "udp")),
        Some("fuzz") => fuzz::fuzz(&workspace_root(), &args[1..]),
        Some("test") => test::test(&workspace_root(), &args[1..]),
        _ => bail!(
            "usage: cargo xtask test [cargo test arguments] | cargo xtask bench [--quick] [--check] [--save-baseline] [criterion arguments] | cargo xtask lab [udp] | cargo xtask fuzz [SECS]"
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
