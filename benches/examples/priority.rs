//! Priority under load, by hand: `cargo run --release -p aqe-benches --example priority --
//! [N]`. Prints the p50 and p99 of N 64 B requests on a priority-9 channel unloaded, then
//! while priority-0 traffic saturates the connection, then the same with the requests at
//! priority 0.

use std::time::Duration;

use aqe_benches::{PriorityPair, quantile};
use aqe_core::Priority;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // `AQE_LOAD=heavy` or `flood`: one half of the load only (to see which costs what).
    let which = std::env::var("AQE_LOAD").unwrap_or_default();
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let which = which.as_str();
        for (name, prio) in [("priority 9", Priority::MAX), ("priority 0", Priority::MIN)] {
            let pair = PriorityPair::start(prio).await;
            let gap = Duration::from_millis(1);
            let mut idle = pair.requests(n, gap).await;
            let load = pair.load(which != "flood", which != "heavy");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut busy = pair.requests(n, gap).await;
            load.stop().await;
            println!(
                "{name}: unloaded p50 {:?} p99 {:?}; loaded p50 {:?} p99 {:?}",
                quantile(&mut idle, 0.5),
                quantile(&mut idle, 0.99),
                quantile(&mut busy, 0.5),
                quantile(&mut busy, 0.99),
            );
            pair.shutdown().await;
        }
    });
}
