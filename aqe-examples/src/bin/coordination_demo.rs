//! The coordination demo: a fleet of agents distributes work, shares results peer to peer,
//! aggregates metrics and streams samples, then reports health and statistics.
//!
//! Usage: `coordination-demo [--bus] [AGENTS_DIR]`. By default the fleet defined in
//! `agents-quic/` runs over real QUIC on loopback (three endpoints, with the event bus as
//! fallback); `--bus` runs the fleet of `agents/` on the in-process event bus alone.
//! Logs: `RUST_LOG=aqe_quic=debug,aqe_agent=debug`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::ensure;
use aqe_agent::EventBus;
use aqe_examples::coordination::{self, Report, SHARD, TASKS};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bus_only = args.iter().any(|a| a == "--bus");
    args.retain(|a| a != "--bus");
    let default = if bus_only { "agents" } else { "agents-quic" };
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default));
    let transport = if bus_only {
        "the in-process event bus"
    } else {
        "QUIC where a definition enables it, the event bus as fallback"
    };
    println!(
        "aqe coordination demo\n   fleet: {}\n   transport: {transport}",
        dir.display()
    );
    let report = coordination::run(&dir, Arc::new(EventBus::new())).await?;
    print(&report);
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
    if !report.endpoints.is_empty() {
        let fallbacks: u64 = report.health.iter().map(|(_, _, s)| s.fallbacks_used).sum();
        ensure!(
            fallbacks == 0,
            "{fallbacks} operation(s) fell back to the event bus: QUIC did not carry everything"
        );
    }
    println!("\nall checks passed");
    Ok(())
}

fn print(report: &Report) {
    for (addr, peers) in &report.endpoints {
        println!("   QUIC endpoint {addr}: connected to {peers} other endpoint(s)");
    }
    println!(
        "\n1. hierarchical: the commander discovered {} executors ({}) and handed out {TASKS} \
         prime-counting tasks round-robin",
        report.workers.len(),
        report.workers.join(", ")
    );
    println!(
        "2. peer to peer: each executor shared its results on the `findings` broadcast channel"
    );
    println!(
        "3. aggregation: the aggregator asked every executor in parallel ({} round(s) until all views were complete):",
        report.rounds
    );
    for m in &report.metrics {
        println!(
            "   {:<12} config rev {}  ran {:>2} task(s)  knows {:>2}/{TASKS} results  primes {}",
            m.worker, m.config_revision, m.tasks_run, m.results_known, m.primes_known
        );
    }
    println!(
        "   fleet total: {} primes below {}; counted directly: {}",
        report.primes,
        u64::from(TASKS) * SHARD,
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
        "   {:<12} {:<9} {:>5} {:>5} {:>5} {:>7} {:>7} {:>9} {:>7} {:>7} {:>9}",
        "agent",
        "status",
        "peers",
        "sent",
        "recv",
        "B sent",
        "B recv",
        "avg RTT",
        "cwnd",
        "dropped",
        "fallbacks"
    );
    for (id, h, s) in &report.health {
        let rtt = if s.rtt.samples > 0 {
            format!("{:.0} us", s.rtt.average.as_secs_f64() * 1e6)
        } else {
            "-".into()
        };
        let cwnd = s
            .congestion_window
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "   {:<12} {:<9} {:>5} {:>5} {:>5} {:>7} {:>7} {:>9} {:>7} {:>7} {:>9}",
            id,
            format!("{:?}", h.status),
            h.connected_peers,
            s.messages_sent,
            s.messages_received,
            s.bytes_sent,
            s.bytes_received,
            rtt,
            cwnd,
            s.messages_dropped,
            s.fallbacks_used
        );
    }
}
