//! The guide's operations on each transport (the bus, QUIC on loopback, NATS through a local
//! `nats-server` when one is installed), each next to its floor measured in the same run,
//! with the same runtime and pinning: raw tokio channels, raw s2n-quic, raw NATS.
//!
//! Receivers are spread over endpoints: a direct message, a request and a stream go from a
//! sender on one endpoint to a receiver on another; a broadcast to 10, 50 or 100 agents goes
//! to 10 endpoints of 1, 5 or 10 agents each (on the bus, all agents share the one bus).
//!
//! `cargo xtask bench [--quick]` runs this pinned to one CPU and writes the report from
//! `target/aqe-bench/raw.json`, which this writes at the end.

use std::time::Duration;

use aqe_benches::{
    Bench, BroadcastFloor, Fleet, MpscFloor, NatsFanout, NatsFloor, Net, PriorityPair, Results,
    S2nFloor, Spec, UNRELIABLE, connections, idle_agents, setup,
};
use aqe_core::Priority;
use bytes::Bytes;
use criterion::{Criterion, SamplingMode};

/// Payloads of the guide's operations.
const SIZES: [usize; 2] = [64, 16 * 1024];
/// Broadcast sizes: (agents, per endpoint) over 10 endpoints.
const BROADCASTS: [(&str, usize); 3] =
    [("broadcast10", 1), ("broadcast50", 5), ("broadcast100", 10)];
const FANOUT: usize = 10;
const STREAM_ITEMS: usize = 1000;
const BULK_TOTAL: usize = 16 * 1024 * 1024;
/// Messages per `send_many` call in the batched throughput rows.
const BATCH: usize = 256;
/// The channel column of the batched throughput rows.
const BATCHED_ORDERED: &str = "ordered, send_many";
/// The same, unordered.
const BATCHED_UNORDERED: &str = "unordered, send_many";
const BULK_CHUNK: usize = 256 * 1024;
/// Requests per timed run of the priority rows.
const PRIORITY_REQUESTS: usize = 20;

fn payload(n: usize) -> Bytes {
    Bytes::from(vec![7u8; n])
}

struct Floors {
    mpsc: MpscFloor,
    s2n: S2nFloor,
    nats: Option<NatsFloor>,
}

fn nets(floors: &Floors) -> Vec<Net> {
    let mut nets = vec![Net::Bus, Net::Quic];
    if let Some(n) = &floors.nats {
        nets.push(Net::Nats(n.server.url()));
    }
    nets
}

fn slow(b: &mut Bench<'_, '_>) {
    b.group().sampling_mode(SamplingMode::Flat).sample_size(10);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = aqe_benches::runtime();
    let mut results = Results::default();

    // Memory first, while the process is small and its allocator fresh.
    rt.block_on(async {
        for n in [100, 1000] {
            results.memory.push(idle_agents(&Net::Bus, n).await);
            results.memory.push(idle_agents(&Net::Quic, n).await);
        }
        results.memory.push(connections(20).await);
    });

    let floors = rt.block_on(async {
        Floors {
            mpsc: MpscFloor::start(),
            s2n: S2nFloor::start(FANOUT).await,
            nats: NatsFloor::start().await,
        }
    });
    if floors.nats.is_none() {
        results.skipped.push(
            "NATS: nats-server not found (apt-get install nats-server); NATS not measured"
                .to_owned(),
        );
        eprintln!("nats-server not found: NATS is not measured (apt-get install nats-server)");
    }
    let nets = nets(&floors);
    let fleets: Vec<(Net, Fleet)> = rt.block_on(async {
        let mut v = Vec::new();
        for n in &nets {
            v.push((n.clone(), Fleet::start(n, 1, 1).await));
        }
        v
    });

    // Direct message, until the receiver's handler has it.
    {
        let mut b = Bench::new(c.benchmark_group("direct"), &rt, &mut results);
        for size in SIZES {
            let p = payload(size);
            b.latency(Spec::new("direct", "floor_tokio_mpsc", size), || {
                floors.mpsc.send(&p, 1)
            });
            b.latency(Spec::new("direct", "floor_s2n_stream", size), || {
                floors.s2n.send(&p, 1)
            });
            if let Some(n) = &floors.nats {
                b.latency(Spec::new("direct", "floor_nats_publish", size), || {
                    n.publish(&p, 1)
                });
            }
            for (net, f) in &fleets {
                b.latency(Spec::new("direct", net.name(), size), || {
                    f.send(&p, "coordination", 1)
                });
                // At most once, nothing acknowledged: the contract of the raw floors (small
                // messages only: over QUIC these are datagrams).
                if size <= 1024 {
                    b.latency(
                        Spec::new("direct", net.name(), size).channel(UNRELIABLE),
                        || f.send(&p, UNRELIABLE, 1),
                    );
                }
            }
        }
        b.finish();
    }

    // Request/response.
    {
        let mut b = Bench::new(c.benchmark_group("request_response"), &rt, &mut results);
        for size in SIZES {
            let p = payload(size);
            let op = "request_response";
            b.latency(Spec::new(op, "floor_tokio_mpsc", size), || {
                floors.mpsc.request(p.clone())
            });
            let same_stream = || floors.s2n.request_same_stream(&p);
            let floor = Spec::new(op, "floor_s2n_same_stream", size);
            b.latency(floor.clone(), same_stream);
            b.latency(Spec::new(op, "floor_s2n_new_stream", size), || {
                floors.s2n.request_new_stream(&p)
            });
            if let Some(n) = &floors.nats {
                b.latency(Spec::new(op, "floor_nats_request", size), || n.request(&p));
            }
            for (net, f) in &fleets {
                let request = || f.request(&p);
                b.latency(Spec::new(op, net.name(), size), request);
                if matches!(net, Net::Quic) && size == 64 {
                    b.paired(&Spec::new(op, "quic", size), &floor, same_stream, request);
                }
            }
        }
        b.finish();
    }

    // Request/response under concurrent requesters.
    {
        let mut b = Bench::new(c.benchmark_group("request_concurrent"), &rt, &mut results);
        let p = payload(64);
        let op = "request_response";
        for k in [10, 100] {
            b.each(Spec::new(op, "floor_tokio_mpsc", 64).concurrency(k), || {
                floors.mpsc.requests_concurrent(&p, k)
            });
            b.each(
                Spec::new(op, "floor_s2n_new_stream", 64).concurrency(k),
                || floors.s2n.requests_concurrent(&p, k),
            );
            if let Some(n) = &floors.nats {
                b.each(
                    Spec::new(op, "floor_nats_request", 64).concurrency(k),
                    || n.requests_concurrent(&p, k),
                );
            }
            for (net, f) in &fleets {
                b.each(Spec::new(op, net.name(), 64).concurrency(k), || {
                    f.requests_concurrent(&p, k)
                });
            }
        }
        b.finish();
    }

    // A 1,000-message stream: opened, written, until the last is received.
    {
        let mut b = Bench::new(c.benchmark_group("stream1000"), &rt, &mut results);
        slow(&mut b);
        for size in SIZES {
            let p = payload(size);
            let op = "stream1000";
            b.latency(Spec::new(op, "floor_tokio_mpsc", size), || {
                floors.mpsc.send(&p, STREAM_ITEMS)
            });
            let write_each = || floors.s2n.stream(&p, STREAM_ITEMS, false);
            let floor = Spec::new(op, "floor_s2n_write_each", size);
            b.latency(floor.clone(), write_each);
            b.latency(Spec::new(op, "floor_s2n_buffered", size), || {
                floors.s2n.stream(&p, STREAM_ITEMS, true)
            });
            if let Some(n) = &floors.nats {
                b.latency(Spec::new(op, "floor_nats_publish", size), || {
                    n.publish(&p, STREAM_ITEMS)
                });
            }
            for (net, f) in &fleets {
                let stream = || f.stream(&p, STREAM_ITEMS);
                b.latency(Spec::new(op, net.name(), size), stream);
                if matches!(net, Net::Quic) && size == 64 {
                    b.paired(&Spec::new(op, "quic", size), &floor, write_each, stream);
                }
            }
        }
        b.finish();
    }

    // Broadcast to 10, 50 and 100 agents, until all have it.
    for (op, per) in BROADCASTS {
        let agents = FANOUT * per;
        let group = rt.block_on(async {
            let mut v = Vec::new();
            for net in &nets {
                v.push((net.clone(), Fleet::start(net, FANOUT, per).await));
            }
            v
        });
        let tokio_floor = rt.block_on(async { BroadcastFloor::start(agents) });
        let nats_fan = floors
            .nats
            .as_ref()
            .map(|n| rt.block_on(NatsFanout::start(&n.server.url(), FANOUT, per)));
        let mut b = Bench::new(c.benchmark_group(op), &rt, &mut results);
        for size in SIZES {
            let p = payload(size);
            b.latency(Spec::new(op, "floor_tokio_broadcast", size), || {
                tokio_floor.broadcast(&p)
            });
            let fanout = || floors.s2n.fanout(&p, per);
            let floor = Spec::new(op, "floor_s2n_fanout", size);
            b.latency(floor.clone(), fanout);
            if let Some(n) = &nats_fan {
                b.latency(Spec::new(op, "floor_nats_fanout", size), || n.publish(&p));
            }
            for (net, f) in &group {
                let broadcast = || f.broadcast(&p);
                b.latency(Spec::new(op, net.name(), size), broadcast);
                if matches!(net, Net::Quic) && size == 64 && op != "broadcast50" {
                    b.paired(&Spec::new(op, "quic", size), &floor, fanout, broadcast);
                }
            }
        }
        b.finish();
        rt.block_on(async {
            for (_, f) in group {
                f.shutdown().await;
            }
        });
    }

    // One-way throughput, 64 B and 4 KiB, ordered (`coordination`) and unordered (`results`).
    for size in [64, 4096] {
        let msgs = if size == 64 { 20_000 } else { 5_000 };
        let bytes = (msgs * size) as u64;
        let p = payload(size);
        let op = "throughput";
        let mut b = Bench::new(
            c.benchmark_group(format!("throughput_{size}B")),
            &rt,
            &mut results,
        );
        slow(&mut b);
        let (mpsc, mpsc_floor) = (
            || floors.mpsc.send(&p, msgs),
            Spec::new(op, "floor_tokio_mpsc", size),
        );
        let (stream, stream_floor) = (
            || floors.s2n.send(&p, msgs),
            Spec::new(op, "floor_s2n_stream", size),
        );
        b.volume(mpsc_floor.clone(), msgs as u64, bytes, mpsc);
        b.volume(stream_floor.clone(), msgs as u64, bytes, stream);
        if let Some(n) = &floors.nats {
            b.volume(
                Spec::new(op, "floor_nats_publish", size),
                msgs as u64,
                bytes,
                || n.publish(&p, msgs),
            );
        }
        for (net, f) in &fleets {
            b.volume(
                Spec::new(op, net.name(), size).channel("ordered"),
                msgs as u64,
                bytes,
                || f.send(&p, "coordination", msgs),
            );
            b.volume(
                Spec::new(op, net.name(), size).channel("unordered"),
                msgs as u64,
                bytes,
                || f.send(&p, "results", msgs),
            );
            // The same handed over in batches (`send_many`).
            for (channel, name) in [
                ("coordination", BATCHED_ORDERED),
                ("results", BATCHED_UNORDERED),
            ] {
                let batched = || f.send_batched(&p, channel, msgs, BATCH);
                let spec = Spec::new(op, net.name(), size).channel(name);
                b.volume(spec.clone(), msgs as u64, bytes, batched);
                // The targets' pairs: the bus against a tokio channel at 64 B, QUIC against a
                // raw stream at 4 KiB.
                match (net, size, name) {
                    (Net::Bus, 64, BATCHED_ORDERED) => b.paired(&spec, &mpsc_floor, mpsc, batched),
                    (Net::Quic, 4096, _) => b.paired(&spec, &stream_floor, stream, batched),
                    _ => {}
                }
            }
        }
        b.finish();
    }

    // Bulk: 16 MiB on one stream, in 256 KiB writes.
    {
        let mut b = Bench::new(c.benchmark_group("bulk"), &rt, &mut results);
        slow(&mut b);
        let p = payload(BULK_CHUNK);
        let n = BULK_TOTAL / BULK_CHUNK;
        let raw = || floors.s2n.stream(&p, n, false);
        let floor = Spec::new("bulk", "floor_s2n_stream", BULK_TOTAL);
        b.volume(floor.clone(), 1, BULK_TOTAL as u64, raw);
        for (net, f) in &fleets {
            let bulk = || f.stream(&p, n);
            let spec = Spec::new("bulk", net.name(), BULK_TOTAL);
            b.volume(spec.clone(), 1, BULK_TOTAL as u64, bulk);
            if matches!(net, Net::Quic) {
                b.paired(&spec, &floor, raw, bulk);
            }
        }
        b.finish();
    }

    // Priority under load: 64 B requests on a priority-9 channel, one at a time, while
    // priority-0 channels saturate the same connection (16 MiB messages one after another,
    // and 64 B messages in batches); next to the same requests unloaded (the floor) and the
    // same load with the requests at priority 0 (without priorities).
    {
        let mut b = Bench::new(c.benchmark_group("priority"), &rt, &mut results);
        slow(&mut b);
        let (high, flat) = rt.block_on(async {
            (
                PriorityPair::start(Priority::MAX).await,
                PriorityPair::start(Priority::MIN).await,
            )
        });
        let gap = Duration::from_millis(1);
        let op = "priority_request";
        b.each(
            Spec::new(op, "floor_unloaded", 64).channel("priority 9"),
            || high.requests(PRIORITY_REQUESTS, gap),
        );
        for (pair, channel) in [(&high, "priority 9"), (&flat, "priority 0")] {
            let load = rt.block_on(async { pair.load(true, true) });
            b.each(Spec::new(op, "quic", 64).channel(channel), || {
                pair.requests(PRIORITY_REQUESTS, gap)
            });
            rt.block_on(load.stop());
        }
        b.finish();
        rt.block_on(async {
            high.shutdown().await;
            flat.shutdown().await;
        });
    }

    // Endpoint start to first response.
    {
        let mut b = Bench::new(c.benchmark_group("setup"), &rt, &mut results);
        slow(&mut b);
        let p = payload(64);
        let handshake = || floors.s2n.handshake(&p);
        let floor = Spec::new("setup", "floor_s2n_handshake", 64);
        b.each(floor.clone(), handshake);
        if let Some(n) = &floors.nats {
            b.each(Spec::new("setup", "floor_nats_connect", 64), || n.setup(&p));
        }
        for (net, f) in fleets.iter().filter(|(n, _)| !matches!(n, Net::Bus)) {
            let start = || setup(net, f, &p);
            b.each(Spec::new("setup", net.name(), 64), start);
            if matches!(net, Net::Quic) {
                b.paired_each(&Spec::new("setup", "quic", 64), &floor, handshake, start);
            }
        }
        b.finish();
    }

    rt.block_on(async {
        for (_, f) in fleets {
            f.shutdown().await;
        }
    });
    c.final_summary();
    if let Err(e) = results.write() {
        eprintln!("could not write {}: {e}", Results::path().display());
        std::process::exit(1);
    }
    eprintln!("results written to {}", Results::path().display());
    // The floors' tasks end with the runtime.
    drop(floors);
    rt.shutdown_timeout(Duration::from_secs(1));
}
