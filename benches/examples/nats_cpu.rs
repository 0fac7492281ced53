//! Where one NATS operation's time goes: wall time and CPU time per operation (this process
//! and `nats-server`), raw async-nats beside aqe over NATS, sequential operations.
//!
//! `taskset -c 0 cargo run --release -p aqe-benches --example nats_cpu [N] [only]`, with
//! `ROUNDS=k` rounds (default 3) of every operation in turn. Each line is one operation's
//! mean (so batched work, such as acknowledgements, counts), where criterion reports medians.

use std::time::Instant;

use aqe_benches::{Fleet, NatsFloor, Net};
use bytes::Bytes;

/// CPU seconds (user, system) of process `pid` ("self" for this one).
fn cpu(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0;
    let v = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    (v(11), v(12))
}

fn server_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "nats-server").then_some(name)
    })
}

async fn measure<F, Fut>(label: &str, n: usize, op: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n / 10 {
        op().await;
    }
    let server = server_pid().unwrap_or_default();
    let (u0, s0) = cpu("self");
    let (su0, ss0) = cpu(&server);
    let t = Instant::now();
    for _ in 0..n {
        op().await;
    }
    let wall = t.elapsed().as_secs_f64();
    let (u1, s1) = cpu("self");

    let (su1, ss1) = cpu(&server);
    let per = |x: f64| x / n as f64 * 1e6;
    println!(
        "{label:<14} wall {:6.1} us  self user {:5.1} sys {:5.1}  server user {:5.1} sys {:5.1}",
        per(wall),
        per(u1 - u0),
        per(s1 - s0),
        per(su1 - su0),
        per(ss1 - ss0)
    );
    per(wall)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let floor = NatsFloor::start().await.expect("nats-server installed");
        let fleet = Fleet::start(&Net::Nats(floor.server.url()), 1, 1).await;
        let p = Bytes::from(vec![7u8; 64]);
        let only = std::env::args().nth(2).unwrap_or_default();
        let run = |label: &str| only.is_empty() || label.contains(only.as_str());
        let mut walls: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        let rounds: usize = std::env::var("ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3);
        for _ in 0..rounds {
            for label in [
                "raw publish",
                "aqe send",
                "aqe unreliable",
                "raw request",
                "aqe request",
            ] {
                if !run(label) {
                    continue;
                }
                let w = match label {
                    "raw publish" => measure(label, n, || floor.publish(&p, 1)).await,
                    "aqe send" => measure(label, n, || fleet.send(&p, "coordination", 1)).await,
                    "aqe unreliable" => {
                        measure(label, n, || fleet.send(&p, aqe_benches::UNRELIABLE, 1)).await
                    }
                    "raw request" => measure(label, n, || floor.request(&p)).await,
                    _ => measure(label, n, || fleet.request(&p)).await,
                };
                walls.entry(label).or_default().push(w);
            }
        }
        let median = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for (label, v) in &walls {
            let floor = if label.contains("request") {
                "raw request"
            } else {
                "raw publish"
            };
            // Each round's ratio to the floor measured just before it, then their median:
            // drifts of the machine cancel out.
            let ratio = walls.get(floor).map_or(f64::NAN, |f| {
                median(&v.iter().zip(f).map(|(a, b)| a / b).collect())
            });
            println!(
                "median {label:<14} {:6.1} us  ratio {ratio:.3} (median of rounds)",
                median(v)
            );
        }
        fleet.shutdown().await;
    });
}
