//! Helpers shared by the agent tests over QUIC: an endpoint on loopback, waiting for peers.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use aqe_agent::{Agent, QuicTransport};
use aqe_quic::QuicConfig;

pub const WAIT: Duration = Duration::from_secs(10);

/// A QUIC endpoint on 127.0.0.1, any port.
pub async fn quic() -> QuicTransport {
    QuicTransport::bind(QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    })
    .await
    .expect("bind")
}

/// Until `agent` knows at least `n` peers.
pub async fn until_peers(agent: &Agent, n: usize) {
    tokio::time::timeout(WAIT, async {
        while agent.discover_peers(&Default::default()).len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("peers discovered");
}
