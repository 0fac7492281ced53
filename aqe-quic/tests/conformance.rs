//! The transport conformance suite, unchanged, over real QUIC on loopback.

use std::sync::Arc;

use aqe_core::Transport;
use aqe_core::conformance::Harness;
use aqe_quic::QuicConfig;
use aqe_quic::QuicTransport;

struct Quic;

#[async_trait::async_trait]
impl Harness for Quic {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        let mut eps = Vec::new();
        for _ in 0..n {
            let config = QuicConfig {
                host: "127.0.0.1".into(),
                port: 0,
                ..QuicConfig::default()
            };
            eps.push(QuicTransport::bind(config).await.expect("bind"));
        }
        for i in 0..n {
            for j in i + 1..n {
                eps[i].connect(eps[j].local_addr()).await.expect("connect");
            }
        }
        eps.into_iter()
            .map(|e| Arc::new(e) as Arc<dyn Transport>)
            .collect()
    }
}

aqe_core::conformance_tests!(Quic);
