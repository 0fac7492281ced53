//! Broadcasts under a profiler: one agent broadcasts 64 B on `coordination` to ENDPOINTS
//! endpoints of PER agents each, one broadcast at a time (until every receiver's handler has
//! it), for SECS seconds, over QUIC (or the bus, or NATS at `nats://...`; `floor`: the
//! benchmark's raw s2n-quic fan-out, PER writes on each of ENDPOINTS connections).
//!
//! `taskset -c 0 cargo run --release -p aqe-benches --example fanout -- [quic|floor|bus|NATS_URL]
//! [ENDPOINTS] [PER] [SECS]`. Prints the median and p99 of a broadcast.

use std::time::{Duration, Instant};

use aqe_benches::{Fleet, Net, quantile};
use bytes::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let floor = args.first().is_some_and(|a| a == "floor");
    let net = match args.first().map(String::as_str) {
        Some("bus") => Net::Bus,
        Some(url) if url.starts_with("nats://") => Net::Nats(url.to_owned()),
        _ => Net::Quic,
    };
    let arg = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (endpoints, per, secs) = (arg(1, 10) as usize, arg(2, 1) as usize, arg(3, 5));
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let p = Bytes::from(vec![7u8; 64]);
        let mut took = Vec::new();
        if floor {
            // The benchmark's floor: raw s2n-quic, one write per connection.
            let floor = aqe_benches::S2nFloor::start(endpoints).await;
            for _ in 0..100 {
                floor.fanout(&p, per).await;
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(secs) {
                let one = Instant::now();
                floor.fanout(&p, per).await;
                took.push(one.elapsed());
            }
            println!(
                "raw s2n-quic fan-out to {endpoints} x {per}: p50 {:?} p99 {:?} ({} fan-outs)",
                quantile(&mut took, 0.5),
                quantile(&mut took, 0.99),
                took.len()
            );
            return;
        }
        let fleet = Fleet::start(&net, endpoints, per).await;
        for _ in 0..100 {
            fleet.broadcast(&p).await;
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            let one = Instant::now();
            fleet.broadcast(&p).await;
            took.push(one.elapsed());
        }
        println!(
            "{} broadcast to {endpoints} x {per}: p50 {:?} p99 {:?} ({} broadcasts)",
            net.name(),
            quantile(&mut took, 0.5),
            quantile(&mut took, 0.99),
            took.len()
        );
        fleet.shutdown().await;
    });
}
