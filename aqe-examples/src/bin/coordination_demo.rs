//! The coordination demo: a fleet of agents on the in-process event bus distributes work,
//! shares results peer to peer, aggregates metrics and streams samples, then reports health
//! and statistics.
//!
//! Usage: `coordination-demo [AGENTS_DIR]` (default: the definitions shipped with the crate).
//! Logs: `RUST_LOG=aqe_agent=debug`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::ensure;
use aqe_agent::EventBus;
use aqe_examples::coordination::{self, TASKS};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("agents"));
    println!(
        "aqe coordination demo: fleet from {}, transport: in-process event bus",
        dir.display()
    );
    let report = coordination::run(&dir, Arc::new(EventBus::new())).await?;

    println!(
        "\n1. hierarchical: the commander discovered {} executors: {}",
        report.workers.len(),
        report.workers.join(", ")
    );
    println!("   and handed out {TASKS} prime-counting tasks round-robin");
    println!("2. peer to peer: executors shared each result on the `findings` broadcast channel");
    println!("3. aggregation: the aggregator asked every executor in parallel:");
    for m in &report.metrics {
        println!(
            "   {:<12} config rev {}  ran {:>2} task(s)  knows {:>2}/{TASKS} results  primes {}",
            m.worker, m.config_revision, m.tasks_run, m.results_known, m.primes_known
        );
    }
    println!(
        "   fleet total: {} primes below {}; direct count: {}",
        report.primes,
        u64::from(TASKS) * 5_000,
        report.expected_primes
    );
    println!(
        "4. streaming: the monitor streamed {} samples to the commander",
        report.samples.len()
    );
    for s in &report.samples {
        println!(
            "   sample {}: {} peers, {} messages received",
            s.seq, s.peers, s.messages_received
        );
    }
    println!(
        "\nhealth and statistics ({:.1} ms for the four patterns):",
        report.elapsed.as_secs_f64() * 1e3
    );
    println!(
        "   {:<12} {:<9} {:>5} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7}",
        "agent", "status", "peers", "sent", "recv", "B sent", "B recv", "avg RTT", "dropped"
    );
    for (id, h, s) in &report.health {
        let rtt = if s.rtt.samples > 0 {
            format!("{:.1} us", s.rtt.average.as_secs_f64() * 1e6)
        } else {
            "-".into()
        };
        println!(
            "   {:<12} {:<9} {:>5} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7}",
            id,
            format!("{:?}", h.status),
            h.connected_peers,
            s.messages_sent,
            s.messages_received,
            s.bytes_sent,
            s.bytes_received,
            rtt,
            s.messages_dropped
        );
    }

    ensure!(
        report.primes == report.expected_primes,
        "the fleet counted {} primes, expected {}",
        report.primes,
        report.expected_primes
    );
    ensure!(
        report.metrics.iter().all(|m| m.results_known == TASKS),
        "an executor missed shared results"
    );
    ensure!(report.samples.len() == 5, "the stream lost samples");
    println!("\nall checks passed");
    Ok(())
}
