//! The hot path under a profiler: one-way messages from one agent to another, sent in a loop
//! for a few seconds, over the bus or QUIC; or requests one after another; or 1,000-message
//! streams.
//!
//! `taskset -c 0 cargo run --release -p aqe-benches --example hot_path -- quic|bus [SECS]
//! [ordered|unordered|request|stream|floor-send|floor-request|floor-stream] [BATCH] [BYTES]`;
//! run it under `perf record -g` to see where a message's time goes. With BATCH, messages go
//! in `send_many` batches of that many; BYTES is the payload's size (64 by default). The
//! `floor-` modes run raw s2n-quic's one-way messages on a long-lived stream, request and
//! 1,000-message stream instead, to profile side by side. Prints messages (or operations) per
//! second, and the packets the sender's QUIC connections sent and lost.

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
    let mode = args.get(2).map_or("ordered", String::as_str);
    let channel = match mode {
        "unordered" => "results",
        _ => "coordination",
    };
    let per_call: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let size: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let fleet = Fleet::start(&net, 1, 1).await;
        // The raw s2n-quic floor of the same operation, to profile side by side.
        let floor = match mode {
            "floor-stream" | "floor-request" | "floor-send" => {
                Some(aqe_benches::S2nFloor::start(0).await)
            }
            _ => None,
        };
        let p = Bytes::from(vec![7u8; size]);
        // Operations per round, and one round.
        let batch = match mode {
            "request" | "floor-request" => 2_000,
            "stream" | "floor-stream" => 10,
            _ => 20_000,
        };
        let round = |n| {
            let (fleet, p, floor) = (&fleet, &p, &floor);
            async move {
                match mode {
                    "request" => {
                        for _ in 0..n {
                            fleet.request(p).await;
                        }
                    }
                    "stream" => {
                        for _ in 0..n {
                            fleet.stream(p, 1_000).await;
                        }
                    }
                    "floor-request" => {
                        if let Some(floor) = floor {
                            for _ in 0..n {
                                floor.request_same_stream(p).await;
                            }
                        }
                    }
                    "floor-stream" => {
                        if let Some(floor) = floor {
                            for _ in 0..n {
                                floor.stream(p, 1_000, false).await;
                            }
                        }
                    }
                    "floor-send" => {
                        if let Some(floor) = floor {
                            floor.send(p, n).await;
                        }
                    }
                    _ if per_call > 1 => fleet.send_batched(p, channel, n, per_call).await,
                    _ => fleet.send(p, channel, n).await,
                }
            }
        };
        round(batch).await;
        let t = Instant::now();
        let mut done = 0;
        while t.elapsed() < Duration::from_secs(secs) {
            round(batch).await;
            done += batch;
        }
        let rate = done as f64 / t.elapsed().as_secs_f64();
        println!(
            "{} {mode}, {size} B, {per_call} per call: {rate:.0} per second",
            net.name()
        );
        // What the sender's connections saw: a lost packet on loopback is a receive buffer
        // overflowing.
        for l in fleet.sender.links() {
            println!(
                "link to {}: {} packets sent, {} lost, congestion window {} B",
                l.addr, l.packets_sent, l.packets_lost, l.congestion_window
            );
        }
        fleet.shutdown().await;
    });
}
