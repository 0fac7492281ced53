//! The hot path under a profiler: one-way 64 B messages from one agent to another, sent in a
//! loop for a few seconds, over the bus or QUIC.
//!
//! `taskset -c 0 cargo run --release -p aqe-benches --example hot_path -- quic|bus [SECS]
//! [ordered|unordered] [BATCH]`; run it under `perf record -g` to see where a message's time
//! goes. With BATCH, messages go in `send_many` batches of that many.
//! Prints messages per second.

use std::time::{Duration, Instant};

use aqe_benches::{Fleet, Net};
use bytes::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let net = match args.first().map(String::as_str) {
        Some("bus") => Net::Bus,
        _ => Net::Quic,
    };
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let channel = match args.get(2).map(String::as_str) {
        Some("unordered") => "results",
        _ => "coordination",
    };
    let per_call: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let fleet = Fleet::start(&net, 1, 1).await;
        let p = Bytes::from(vec![7u8; 64]);
        let batch = 20_000;
        let send = |n| {
            let (fleet, p) = (&fleet, &p);
            async move {
                if per_call > 1 {
                    fleet.send_batched(p, channel, n, per_call).await;
                } else {
                    fleet.send(p, channel, n).await;
                }
            }
        };
        send(batch).await;
        let t = Instant::now();
        let mut sent = 0;
        while t.elapsed() < Duration::from_secs(secs) {
            send(batch).await;
            sent += batch;
        }
        let rate = sent as f64 / t.elapsed().as_secs_f64();
        println!(
            "{} {channel}, {per_call} per call: {rate:.0} msgs/s",
            net.name()
        );
        fleet.shutdown().await;
    });
}
