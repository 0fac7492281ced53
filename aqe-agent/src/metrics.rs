//! Metrics for Prometheus: the figures of a set of agents and of their transports' links, read
//! at each scrape and written in the OpenMetrics text format by `prometheus-client`, served
//! over plain HTTP (`GET /metrics`) to whoever scrapes.
//!
//! Per agent (label `agent`): messages and bytes in and out, failed, dropped and unconfirmed
//! messages, inbox depth, open streams, reachable and unreachable peers, loss, fallbacks
//! used. Per link (label `peer`, its address; once per link even when several agents share
//! its endpoint): RTT, congestion window, packets sent and lost; and the number of links.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqe_core::{Error, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Agent;

/// The agents whose figures a scrape reports.
#[derive(Clone, Default)]
pub struct Metrics {
    agents: Arc<Mutex<Vec<Agent>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("agents", &self.list().len())
            .finish()
    }
}

impl Metrics {
    /// Reports `agents`.
    pub fn new(agents: impl IntoIterator<Item = Agent>) -> Self {
        Self {
            agents: Arc::new(Mutex::new(agents.into_iter().collect())),
        }
    }

    /// Reports `agent` too, from the next scrape on (an agent that shut down is left out).
    pub fn add(&self, agent: Agent) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(agent);
    }

    fn list(&self) -> Vec<Agent> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.retain(|a| !a.is_shut_down());
        agents.clone()
    }

    /// The exposition text of a scrape now.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("aqe");
        registry.register_collector(Box::new(Scrape(self.list())));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// One scrape's agents.
#[derive(Debug)]
struct Scrape(Vec<Agent>);

/// A metric family: its name, its help, and how to read it off one row.
type Figure<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// One agent as a scrape sees it.
struct Seen<'a> {
    agent: &'a Agent,
    stats: aqe_core::Stats,
}

/// Writes each counter of `figures` with a sample per row, labelled `label: key(row)`.
fn counters<T>(
    encoder: &mut DescriptorEncoder<'_>,
    label: &'static str,
    rows: &[(String, T)],
    figures: &[Figure<T, u64>],
) -> std::result::Result<(), std::fmt::Error> {
    for (name, help, get) in figures {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (key, row) in rows {
            ConstCounter::new(get(row)).encode(m.encode_family(&[(label, key.as_str())])?)?;
        }
    }
    Ok(())
}

/// Writes each gauge of `figures` with a sample per row, labelled `label: key(row)`.
fn gauges<T>(
    encoder: &mut DescriptorEncoder<'_>,
    label: &'static str,
    rows: &[(String, T)],
    figures: &[Figure<T, f64>],
) -> std::result::Result<(), std::fmt::Error> {
    for (name, help, get) in figures {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (key, row) in rows {
            ConstGauge::new(get(row)).encode(m.encode_family(&[(label, key.as_str())])?)?;
        }
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(
        &self,
        mut encoder: DescriptorEncoder<'_>,
    ) -> std::result::Result<(), std::fmt::Error> {
        let agents: Vec<(String, Seen<'_>)> = self
            .0
            .iter()
            .map(|agent| {
                let seen = Seen {
                    agent,
                    stats: agent.stats(),
                };
                (agent.id().to_string(), seen)
            })
            .collect();
        counters(
            &mut encoder,
            "agent",
            &agents,
            &[
                ("messages_sent", "Messages sent", |a| a.stats.messages_sent),
                ("messages_received", "Messages received", |a| {
                    a.stats.messages_received
                }),
                (
                    "messages_failed",
                    "Reliable messages accepted that did not reach their receiver",
                    |a| a.stats.messages_failed,
                ),
                (
                    "messages_dropped",
                    "Messages dropped: unreliable ones that found no room, expired ones",
                    |a| a.stats.messages_dropped,
                ),
                ("bytes_sent", "Payload bytes sent", |a| a.stats.bytes_sent),
                ("bytes_received", "Payload bytes received", |a| {
                    a.stats.bytes_received
                }),
                (
                    "fallbacks_used",
                    "Operations carried by a later transport of the agent's chain",
                    |a| a.stats.fallbacks_used,
                ),
            ],
        )?;
        gauges(
            &mut encoder,
            "agent",
            &agents,
            &[
                (
                    "messages_unconfirmed",
                    "Reliable messages accepted, neither taken nor reported failed yet",
                    |a| a.stats.messages_unconfirmed as f64,
                ),
                ("active_streams", "Streams open, both directions", |a| {
                    a.stats.active_streams as f64
                }),
                (
                    "unreachable_peers",
                    "Peer endpoints lost without a goodbye and not back yet",
                    |a| a.stats.unreachable_peers as f64,
                ),
                ("packet_loss_ratio", "Loss ratio, 0 to 1", |a| {
                    a.stats.packet_loss
                }),
                ("inbox_depth", "Items waiting in the agent's inbox", |a| {
                    a.agent.inbox_depth() as f64
                }),
                ("connected_peers", "Peers reachable now", |a| {
                    a.agent.health().connected_peers as f64
                }),
            ],
        )?;
        // Links, once each: agents of one endpoint share its transport's links.
        let mut links: Vec<(String, aqe_core::LinkReport)> = Vec::new();
        for agent in &self.0 {
            for l in agent.links() {
                if !links.iter().any(|(addr, _)| *addr == l.addr) {
                    links.push((l.addr.clone(), l));
                }
            }
        }
        let m = encoder.encode_descriptor(
            "links",
            "Live links to other endpoints",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(links.len() as i64).encode(m)?;
        gauges(
            &mut encoder,
            "peer",
            &links,
            &[
                (
                    "link_rtt_seconds",
                    "Latest round-trip time of the link",
                    |l| secs(l.rtt_us),
                ),
                (
                    "link_smoothed_rtt_seconds",
                    "Smoothed round-trip time of the link",
                    |l| secs(l.smoothed_rtt_us),
                ),
                (
                    "link_congestion_window_bytes",
                    "Congestion window of the link",
                    |l| l.congestion_window as f64,
                ),
            ],
        )?;
        counters(
            &mut encoder,
            "peer",
            &links,
            &[
                ("link_packets_sent", "Packets sent on the link", |l| {
                    l.packets_sent
                }),
                ("link_packets_lost", "Packets the link lost", |l| {
                    l.packets_lost
                }),
            ],
        )
    }
}

/// The most of a request a scraper may send: its line and headers.
const REQUEST_LIMIT: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes answered at once; further connections wait in the listener's backlog.
const CONCURRENT_SCRAPES: usize = 16;

/// An HTTP endpoint answering `GET /metrics` with [`Metrics::render`], until shut down.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl MetricsServer {
    /// Listens on `addr` (port 0: any free port) and serves `metrics`.
    ///
    /// # Errors
    /// [`Error::Configuration`] (field `metrics`) when `addr` cannot be bound.
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::config("metrics", format!("cannot listen on {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::config("metrics", e.to_string()))?;
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        tasks.spawn(accept(listener, metrics, stop.clone(), tasks.clone()));
        tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        Ok(Self { addr, stop, tasks })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and waits until the scrapes in progress ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    metrics: Metrics,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCRAPES));
    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => s,
        };
        let Ok(slot) = slot else { return };
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let (metrics, stop) = (metrics.clone(), stop.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = answer(stream, &metrics) => {}
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request (bounded in bytes and time) and answers it; the connection closes.
async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_LIMIT {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    let response = match (read, request_target(&head)) {
        (Ok(true), Some(("GET", "/metrics"))) => {
            let body = metrics.render();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        (Ok(true), Some(("GET", _))) => reply(404, "Not Found", "try /metrics\n"),
        (Ok(true), Some(_)) => reply(405, "Method Not Allowed", "GET only\n"),
        _ => reply(400, "Bad Request", "a GET request, please\n"),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

fn secs(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

fn reply(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The method and path of an HTTP request head, if it has a request line.
fn request_target(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    parts.next()?.starts_with("HTTP/1.").then_some(())?;
    Some((method, target.split('?').next().unwrap_or(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_read_strictly() {
        assert_eq!(
            request_target(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_target(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_target(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_target(b"\xff\xfe /x HTTP/1.1\r\n"), None);
        assert_eq!(request_target(b""), None);
    }
}
