//! Request/response latency, 64-byte payloads: aqe over each transport against floors
//! measured in the same run, and NATS request/reply through a local nats-server (when one is
//! installed) as the reference to beat; one-way latency over NATS, aqe against raw NATS. `cargo xtask bench` runs it pinned to one CPU and prints the
//! comparison.

use aqe_benches::{AgentPair, MpscFloor, NatsAgents, NatsFloor, PAYLOAD, S2nFloor};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn request_response(c: &mut Criterion) {
    let rt = runtime();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let mut g = c.benchmark_group("request_response_64B");

    let floor = rt.block_on(async { MpscFloor::start() });
    g.bench_function("floor/tokio_mpsc", |b| {
        b.to_async(&rt).iter(|| floor.round_trip(payload.clone()))
    });

    // The client's streams need `&mut`; an uncontended async mutex costs tens of nanoseconds.
    let s2n = tokio::sync::Mutex::new(rt.block_on(S2nFloor::start()));
    g.bench_function("floor/s2n_quic_same_stream", |b| {
        b.to_async(&rt)
            .iter(|| async { s2n.lock().await.same_stream(payload.clone()).await })
    });
    g.bench_function("floor/s2n_quic_new_stream", |b| {
        b.to_async(&rt)
            .iter(|| async { s2n.lock().await.new_stream(payload.clone()).await })
    });

    let bus = rt.block_on(AgentPair::bus());
    g.bench_function("aqe/bus_agent", |b| {
        b.to_async(&rt).iter(|| bus.request(&payload))
    });

    let quic = rt.block_on(AgentPair::quic());
    g.bench_function("aqe/quic_agent", |b| {
        b.to_async(&rt).iter(|| quic.request(&payload))
    });

    let nats = rt.block_on(NatsFloor::start());
    match &nats {
        Some(nats) => {
            g.bench_function("reference/nats_request_reply", |b| {
                b.to_async(&rt).iter(|| nats.request(payload.clone()))
            });
            let agents = rt.block_on(NatsAgents::start(&nats.server.url()));
            g.bench_function("aqe/nats_agent", |b| {
                b.to_async(&rt).iter(|| agents.request(&payload))
            });
        }
        None => {
            eprintln!("nats-server not found: NATS is not measured (apt-get install nats-server)")
        }
    }
    g.finish();

    // One-way, until the receiver has it: NATS publish to a subscriber, and an aqe message on
    // a reliable ordered channel until the receiving agent's handler has it.
    if let Some(nats) = &nats {
        let mut g = c.benchmark_group("one_way_64B");
        g.bench_function("floor/nats_publish", |b| {
            b.to_async(&rt).iter(|| nats.one_way(payload.clone()))
        });
        let agents = rt.block_on(NatsAgents::start(&nats.server.url()));
        g.bench_function("aqe/nats_agent_send", |b| {
            b.to_async(&rt).iter(|| agents.one_way(&payload))
        });
        g.finish();
    }
}

criterion_group!(benches, request_response);
criterion_main!(benches);
