//! Metrics for Prometheus, scraped over HTTP from two agents on two QUIC endpoints.
#![cfg(all(feature = "quic", feature = "metrics"))]

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use aqe_agent::{Agent, Metrics, MetricsServer};
use support::{WAIT, quic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr`: the status line, the headers and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut raw))
        .await
        .expect("answered")
        .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// The samples of an exposition: `name{labels}` to value; every line a comment or a sample.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("a sample line");
        out.insert(key.to_owned(), value.parse::<f64>().expect("a number"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_each_agents_traffic_and_each_link() {
    let (qa, qb) = (quic().await, quic().await);
    qa.connect(qb.local_addr()).await.expect("connect");
    let b = Agent::builder()
        .id("b")
        .agent_type("worker")
        .transport(Arc::new(qb.clone()))
        .on_message(|_a, _env| async {})
        .start()
        .await
        .expect("b");
    let a = Agent::builder()
        .id("a")
        .agent_type("commander")
        .transport(Arc::new(qa.clone()))
        .start()
        .await
        .expect("a");
    support::until_peers(&a, 1).await;
    for i in 0..5u32 {
        a.send_confirmed(b.id(), &i, "coordination")
            .await
            .expect("taken");
    }
    let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"), Metrics::new([a, b]))
        .await
        .expect("serve");
    let (status, headers, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let s = samples(&body);
    let at = |k: &str| {
        *s.get(k)
            .unwrap_or_else(|| panic!("{k} missing from:\n{body}"))
    };
    assert_eq!(at(r#"aqe_messages_sent_total{agent="a"}"#), 5.0);
    assert_eq!(at(r#"aqe_messages_received_total{agent="b"}"#), 5.0);
    assert_eq!(
        at(r#"aqe_bytes_sent_total{agent="a"}"#),
        at(r#"aqe_bytes_received_total{agent="b"}"#)
    );
    assert_eq!(at(r#"aqe_messages_unconfirmed{agent="a"}"#), 0.0);
    assert_eq!(at(r#"aqe_inbox_depth{agent="b"}"#), 0.0);
    assert_eq!(at(r#"aqe_connected_peers{agent="a"}"#), 1.0);
    // One link each way: a's endpoint to b's, b's to a's.
    assert_eq!(at("aqe_links"), 2.0);
    let to_b = format!(r#"{{peer="{}"}}"#, qb.local_addr());
    assert!(at(&format!("aqe_link_rtt_seconds{to_b}")) > 0.0);
    assert!(at(&format!("aqe_link_congestion_window_bytes{to_b}")) > 0.0);
    assert!(at(&format!("aqe_link_packets_sent_total{to_b}")) > 0.0);
    let (status, _, _) = get(server.local_addr(), "/other").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    server.shutdown().await;
}
