//! The conformance suite, unchanged, over a real `nats-server` on a free loopback port.
//! Each case gets its own fleet on the shared server, so cases never see each other.

use std::sync::Arc;

use aqe_core::Transport;
use aqe_core::conformance::Harness;
use aqe_nats::testing::NatsServer;
use aqe_nats::{NatsConfig, NatsTransport};

struct Nats;

#[async_trait::async_trait]
impl Harness for Nats {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        let url = tokio::task::spawn_blocking(|| NatsServer::shared().url())
            .await
            .expect("server");
        let fleet = format!("conformance-{}", aqe_core::MessageId::next());
        let mut out: Vec<Arc<dyn Transport>> = Vec::new();
        for _ in 0..n {
            let config = NatsConfig {
                servers: vec![url.clone()],
                fleet: fleet.clone(),
                ..NatsConfig::default()
            };
            out.push(Arc::new(
                NatsTransport::connect(config).await.expect("connect"),
            ));
        }
        out
    }
}

aqe_core::conformance_tests!(Nats);
