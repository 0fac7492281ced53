//! Resident memory per idle agent and per connection, from the process's resident set before
//! and after creating them (glibc keeps freed memory, so each figure is measured on growth
//! only; run first in the process).

use std::sync::Arc;

use aqe_agent::{Agent, EventBus};

use crate::fleet::{Endpoint, Net};
use crate::record::Memory;

/// The process's resident set, KiB (Linux; 0 elsewhere).
pub fn resident_kib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4.0
}

/// `count` idle agents on one endpoint of `net` (QUIC: connected to a second endpoint).
pub async fn idle_agents(net: &Net, count: usize) -> Memory {
    let bus = Arc::new(EventBus::new());
    let ep = Endpoint::start(net, "mem", &bus).await;
    let other = Endpoint::start(net, "mem", &bus).await;
    ep.connect(&other).await;
    let watcher = Agent::builder()
        .agent_type("watcher")
        .transport(other.transport.clone())
        .start()
        .await
        .expect("agent");
    let before = resident_kib();
    let mut agents = Vec::with_capacity(count);
    for i in 0..count {
        agents.push(
            Agent::builder()
                .id(format!("idle{i}"))
                .agent_type("idle")
                .transport(ep.transport.clone())
                .start()
                .await
                .expect("agent"),
        );
    }
    // Until the other endpoint knows them all (their announcements are part of the cost).
    while watcher.discover_peers(&Default::default()).len() < count {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let after = resident_kib();
    for a in &agents {
        a.shutdown().await;
    }
    watcher.shutdown().await;
    // Nothing of the measurement stays behind to disturb the benchmarks after it.
    ep.transport.shutdown().await;
    other.transport.shutdown().await;
    Memory {
        what: "idle_agent",
        transport: net.name(),
        count,
        kib_each: (after - before) / count as f64,
    }
}

/// `count` QUIC endpoints connected to one: resident memory per connection (both ends).
pub async fn connections(count: usize) -> Memory {
    let bus = Arc::new(EventBus::new());
    let hub = Endpoint::start(&Net::Quic, "mem", &bus).await;
    let mut eps = Vec::with_capacity(count);
    for _ in 0..count {
        eps.push(Endpoint::start(&Net::Quic, "mem", &bus).await);
    }
    let before = resident_kib();
    for e in &eps {
        e.connect(&hub).await;
    }
    let after = resident_kib();
    for e in eps {
        e.transport.shutdown().await;
    }
    hub.transport.shutdown().await;
    Memory {
        what: "connection",
        transport: "quic",
        count,
        kib_each: (after - before) / count as f64,
    }
}
