//! The benchmarks' set-ups: aqe over each transport (bus, QUIC on loopback, NATS through a
//! local `nats-server`) driven through the agent API, and the floors each is compared with,
//! measured in the same run: raw tokio channels, raw s2n-quic, raw NATS. `record` keeps what
//! each benchmark measured for `cargo xtask bench`'s report.
#![warn(missing_docs, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up: a failure is a bug to see at once

mod fleet;
mod memory;
mod nats_floor;
mod priority;
mod record;
mod s2n_floor;
mod tokio_floor;

pub use fleet::{BULK, Endpoint, Fleet, Net, UNRELIABLE, discovered, setup};

/// The runtime every benchmark runs on, floors included: two workers (pinned to one CPU by
/// `cargo xtask bench`).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
pub use memory::{connections, idle_agents, resident_kib};
pub use nats_floor::{NatsFanout, NatsFloor};
pub use priority::{HEAVY_SIZE, Load, PriorityPair, Probe, quantile};
pub use priority::{client as priority_client, server as priority_server};
pub use record::{Bench, Measured, Memory, Paired, Results, Spec};
pub use s2n_floor::S2nFloor;
pub use tokio_floor::{BroadcastFloor, MpscFloor};

/// Every allocation of a benchmark binary is counted, so that a volume benchmark can say
/// how many allocations a message costs (both sides, every thread).
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;
