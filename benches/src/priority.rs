//! Priority under load: the latency of small requests on a high-priority channel while
//! low-priority traffic saturates the same connection (a 16 MiB message again and again,
//! and a flood of 64 B messages), next to the same requests unloaded and the same load
//! with the requests at the load's priority.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aqe_agent::{Agent, HandlerError};
use aqe_core::{Channel, ChannelKind, Priority, RequestOptions};
use bytes::Bytes;

use crate::fleet::{Endpoint, Net, discovered};

/// The channel of the measured requests.
const ALERT: &str = "alert";
/// The low-priority channel of the large messages.
const HEAVY: &str = "heavy";
/// The low-priority ordered channel of the 64 B flood.
const FLOOD: &str = "flood";
/// The size of each large message: 16 MiB less what a channel's largest message leaves room for.
pub const HEAVY_SIZE: usize = 16 * 1024 * 1024 - 128 * 1024;

fn channels(alert: Priority) -> [Channel; 3] {
    [
        Channel::new(ALERT, ChannelKind::Unicast).with_priority(alert),
        Channel::new(HEAVY, ChannelKind::Unicast)
            .with_priority(Priority::MIN)
            .with_ordered(false)
            .with_max_message_size(HEAVY_SIZE + 64 * 1024),
        Channel::new(FLOOD, ChannelKind::Unicast).with_priority(Priority::MIN),
    ]
}

/// The agent that answers the requests and drops the load's messages, on `transport`.
pub async fn server(transport: Arc<dyn aqe_core::Transport>, alert: Priority) -> Agent {
    let mut b = Agent::builder()
        .id("server")
        .agent_type("server")
        .transport(transport)
        .on_request(|_a, req| async move { Ok::<_, HandlerError>(req.decode::<Bytes>()?) })
        .on_message(|_a, env| async move {
            std::hint::black_box(&env.payload);
        });
    for c in channels(alert) {
        b = b.channel(c);
    }
    b.start().await.expect("server")
}

/// The agent that sends the requests and the load, on `transport`, once it sees the server.
pub async fn client(transport: Arc<dyn aqe_core::Transport>, alert: Priority) -> Probe {
    let mut b = Agent::builder()
        .id("client")
        .agent_type("client")
        .transport(transport);
    for c in channels(alert) {
        b = b.channel(c);
    }
    let client = b.start().await.expect("client");
    let to = aqe_core::AgentId::new("server");
    discovered(&client, 1, Some(&to)).await;
    Probe { client, to }
}

/// Two QUIC endpoints: a client agent and a server agent that answers requests and drops
/// messages.
pub struct PriorityPair {
    probe: Probe,
    server: Agent,
    endpoints: [Endpoint; 2],
}

impl std::ops::Deref for PriorityPair {
    type Target = Probe;
    fn deref(&self) -> &Probe {
        &self.probe
    }
}

impl PriorityPair {
    /// Starts the pair with requests on a channel of priority `alert`.
    pub async fn start(alert: Priority) -> Self {
        let bus = Arc::new(aqe_agent::EventBus::new());
        let a = Endpoint::start(&Net::Quic, "prio", &bus).await;
        let b = Endpoint::start(&Net::Quic, "prio", &bus).await;
        a.connect(&b).await;
        let server = server(b.transport.clone(), alert).await;
        let probe = client(a.transport.clone(), alert).await;
        Self {
            probe,
            server,
            endpoints: [a, b],
        }
    }

    /// Shuts both agents and endpoints down.
    pub async fn shutdown(self) {
        self.probe.client.shutdown().await;
        self.server.shutdown().await;
        for e in self.endpoints {
            e.transport.shutdown().await;
        }
    }
}

/// The client side: requests and load towards the server agent.
pub struct Probe {
    /// The client agent.
    pub client: Agent,
    to: aqe_core::AgentId,
}

impl Probe {
    /// `n` requests of 64 B on the alert channel, one at a time with `gap` between them;
    /// each one's round trip.
    pub async fn requests(&self, n: usize, gap: Duration) -> Vec<Duration> {
        let p = Bytes::from(vec![9u8; 64]);
        let options = RequestOptions::default()
            .with_channel(ALERT)
            .with_timeout(Duration::from_secs(30));
        let mut took = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r: Bytes = self
                .client
                .request_from_agent(&self.to, &p, options.clone())
                .await
                .expect("request");
            took.push(t.elapsed());
            std::hint::black_box(r);
            tokio::time::sleep(gap).await;
        }
        took
    }

    /// Saturates the connection with low-priority traffic until [`Load::stop`]: one task
    /// sends 16 MiB messages one after another (with `heavy`), one floods 64 B messages in
    /// batches of 256 (with `flood`).
    pub fn load(&self, heavy: bool, flood: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let heavy = {
            let (client, to, stop) = (self.client.clone(), self.to.clone(), stop.clone());
            tokio::spawn(async move {
                let big = Bytes::from(vec![1u8; HEAVY_SIZE]);
                while !stop.load(Ordering::Relaxed) && heavy {
                    client.send_to_agent(&to, &big, HEAVY).await.expect("heavy");
                }
            })
        };
        let flood = {
            let (client, to, stop) = (self.client.clone(), self.to.clone(), stop.clone());
            tokio::spawn(async move {
                let small = Bytes::from(vec![2u8; 64]);
                while !stop.load(Ordering::Relaxed) && flood {
                    client
                        .send_many(&to, std::iter::repeat_n(&small, 256), FLOOD)
                        .await
                        .expect("flood");
                }
            })
        };
        Load {
            stop,
            tasks: vec![heavy, flood],
        }
    }
}

/// The load of [`PriorityPair::load`], running until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Stops the load and waits until its senders returned.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The `q` quantile of `d` (0.0..=1.0).
pub fn quantile(d: &mut [Duration], q: f64) -> Duration {
    d.sort_unstable();
    let i = ((d.len() as f64 - 1.0) * q).round() as usize;
    d[i.min(d.len() - 1)]
}
