//! Where endpoint start to first response goes (the `setup` benchmark, phase by phase):
//! binding a QUIC endpoint (certificates included), connecting to a fleet endpoint (the
//! handshake and the session's hello), starting an agent, learning of the remote agent,
//! and the first request.
//!
//! `taskset -c 0 cargo run --release -p aqe-benches --example setup_phases [ROUNDS]`.
//! Prints each phase's median over the rounds, microseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_agent::{Agent, HandlerError};
use aqe_core::RequestOptions;
use aqe_quic::{QuicConfig, QuicTransport};
use bytes::Bytes;

fn config() -> QuicConfig {
    QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    }
}

/// A client agent on `q`.
async fn client(q: &Arc<QuicTransport>) -> Agent {
    Agent::builder()
        .agent_type("client")
        .transport(q.clone())
        .start()
        .await
        .expect("agent")
}

/// One request from `agent` to `echo`.
async fn ask(agent: &Agent, echo: &Agent) {
    let _: Bytes = agent
        .request_from_agent(
            echo.id(),
            &Bytes::from_static(b"x"),
            RequestOptions::default(),
        )
        .await
        .expect("request");
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let server = Arc::new(QuicTransport::bind(config()).await.expect("bind"));
        let echo = Agent::builder()
            .id("echo")
            .agent_type("echo")
            .transport(server.clone())
            .on_request(|_a, req| async move { Ok::<_, HandlerError>(req.decode::<Bytes>()?) })
            .start()
            .await
            .expect("echo");
        let names = [
            "bind",
            "connect",
            "agent start",
            "discovered",
            "first request",
            "total",
            "second request",
            "new agent's first",
        ];
        let mut phases: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
        for _ in 0..rounds {
            let t0 = Instant::now();
            let q = Arc::new(QuicTransport::bind(config()).await.expect("bind"));
            let t1 = Instant::now();
            q.connect(server.local_addr()).await.expect("connect");
            let t2 = Instant::now();
            let agent = client(&q).await;
            let t3 = Instant::now();
            aqe_benches::discovered(&agent, 1, Some(echo.id())).await;
            let t4 = Instant::now();
            ask(&agent, &echo).await;
            let t5 = Instant::now();
            ask(&agent, &echo).await;
            let t6 = Instant::now();
            let b = client(&q).await;
            aqe_benches::discovered(&b, 1, Some(echo.id())).await;
            let t7 = Instant::now();
            ask(&b, &echo).await;
            let t8 = Instant::now();
            b.shutdown().await;
            for (i, (a, b)) in [
                (t0, t1),
                (t1, t2),
                (t2, t3),
                (t3, t4),
                (t4, t5),
                (t0, t5),
                (t5, t6),
                (t7, t8),
            ]
            .into_iter()
            .enumerate()
            {
                phases[i].push(b - a);
            }
            agent.shutdown().await;
            aqe_core::Transport::shutdown(&*q).await;
        }
        for (name, v) in names.iter().zip(phases) {
            println!("{name:<14} {:8.0} us", median(v));
        }
        echo.shutdown().await;
        aqe_core::Transport::shutdown(&*server).await;
    });
}
