//! Priority under load, by hand: `cargo run --release -p aqe-benches --example priority --
//! [N]`. Prints the p50 and p99 of N 64 B requests on a priority-9 channel unloaded, then
//! while priority-0 traffic saturates the connection, then the same with the requests at
//! priority 0. `AQE_LOAD=heavy` or `flood` runs one half of the load only.
//!
//! The same across two processes, to put a real link between them (e.g. two network
//! namespaces joined by a veth pair with a `tbf` rate limit on each end):
//!
//! ```text
//! priority certs DIR SERVER_IP CLIENT_IP      # a CA and a certificate for each side
//! priority serve DIR SERVER_IP:PORT PRIO      # the answering agent (runs until killed)
//! priority client DIR CLIENT_IP SERVER_IP:PORT PRIO N
//! ```
//!
//! For instance, as root (the README's priority row gives what this measured):
//!
//! ```text
//! ip netns add pa; ip netns add pb
//! ip link add va netns pa type veth peer name vb netns pb
//! ip -n pa addr add 10.78.0.1/24 dev va; ip -n pb addr add 10.78.0.2/24 dev vb
//! ip -n pa link set va up; ip -n pb link set vb up
//! ip netns exec pa tc qdisc add dev va root tbf rate 200mbit burst 64kb latency 5ms
//! ip netns exec pb tc qdisc add dev vb root tbf rate 200mbit burst 64kb latency 5ms
//! priority certs /tmp/pc 10.78.0.2 10.78.0.1
//! ip netns exec pb priority serve /tmp/pc 10.78.0.2:7100 9 &
//! ip netns exec pa priority client /tmp/pc 10.78.0.1 10.78.0.2:7100 9 300
//! kill %1; ip netns del pa; ip netns del pb
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aqe_benches::{PriorityPair, Probe, quantile};
use aqe_core::Priority;
use aqe_quic::certs::FleetCa;
use aqe_quic::{QuicConfig, QuicTransport, SecurityConfig};

async fn measure(name: &str, probe: &Probe, n: usize, which: &str) {
    let gap = Duration::from_millis(1);
    let mut idle = probe.requests(n, gap).await;
    let load = probe.load(which != "flood", which != "heavy");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut busy = probe.requests(n, gap).await;
    load.stop().await;
    println!(
        "{name}: unloaded p50 {:?} p99 {:?}; loaded p50 {:?} p99 {:?}",
        quantile(&mut idle, 0.5),
        quantile(&mut idle, 0.99),
        quantile(&mut busy, 0.5),
        quantile(&mut busy, 0.99),
    );
}

/// A certificate and a CA for `name` ("server" or "client") at `ip`, into `dir`.
fn write_certs(dir: &Path, ips: [(&str, IpAddr); 2]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca = FleetCa::generate("aqe priority benchmark")?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    for (name, ip) in ips {
        let c = ca.issue(name, "localhost", &[ip], &[])?;
        std::fs::write(dir.join(format!("{name}.key")), &c.key_pem)?;
        std::fs::write(dir.join(format!("{name}.pem")), &c.cert_pem)?;
    }
    Ok(())
}

/// A QUIC endpoint at `addr` with `name`'s certificate from `dir`, verifying its peer.
async fn bind(dir: &Path, name: &str, addr: SocketAddr) -> anyhow::Result<Arc<QuicTransport>> {
    Ok(Arc::new(
        QuicTransport::bind(QuicConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            security: SecurityConfig {
                cert_path: Some(dir.join(format!("{name}.pem"))),
                key_path: Some(dir.join(format!("{name}.key"))),
                ca_path: Some(dir.join("ca.pem")),
                verify_peer: true,
                ..SecurityConfig::default()
            },
            ..QuicConfig::default()
        })
        .await?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let which = std::env::var("AQE_LOAD").unwrap_or_default();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("missing argument {i}; see the example's header"))
    };
    let prio = |s: &str| -> anyhow::Result<Priority> { Ok(Priority::new(s.parse()?)?) };
    let rt = aqe_benches::runtime();
    rt.block_on(async {
        let which = which.as_str();
        match args.first().map(String::as_str) {
            Some("certs") => write_certs(
                Path::new(arg(1)?),
                [("server", arg(2)?.parse()?), ("client", arg(3)?.parse()?)],
            ),
            Some("serve") => {
                let q = bind(Path::new(arg(1)?), "server", arg(2)?.parse()?).await?;
                let _server = aqe_benches::priority_server(q, prio(arg(3)?)?).await;
                std::future::pending::<anyhow::Result<()>>().await
            }
            Some("client") => {
                let addr = SocketAddr::new(arg(2)?.parse()?, 0);
                let q = bind(Path::new(arg(1)?), "client", addr).await?;
                q.connect(arg(3)?.parse()?).await?;
                let probe = aqe_benches::priority_client(q, prio(arg(4)?)?).await;
                let name = format!("priority {}", arg(4)?);
                measure(&name, &probe, arg(5)?.parse()?, which).await;
                Ok(())
            }
            _ => {
                let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(500);
                for (name, prio) in [("priority 9", Priority::MAX), ("priority 0", Priority::MIN)] {
                    let pair = PriorityPair::start(prio).await;
                    measure(name, &pair, n, which).await;
                    pair.shutdown().await;
                }
                Ok(())
            }
        }
    })
}
