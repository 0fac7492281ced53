//! aqe itself: a sending agent on an endpoint of its own and receiving agents spread over
//! other endpoints, over one transport, driven through the agent API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aqe_agent::{Agent, EventBus, HandlerError};
use aqe_core::{BroadcastOptions, Channel, RequestOptions, StreamOptions, Transport};

use aqe_quic::{QuicConfig, QuicTransport};
use bytes::Bytes;

use crate::tokio_floor::Tally;

/// The transport a fleet runs on.
#[derive(Debug, Clone)]
pub enum Net {
    /// One in-process event bus.
    Bus,
    /// QUIC endpoints on loopback.
    Quic,
    /// NATS endpoints on the server at this URL.
    Nats(String),
}

impl Net {
    /// The name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Net::Bus => "bus",
            Net::Quic => "quic",
            Net::Nats(_) => "nats",
        }
    }
}

/// The channel bulk transfers and large streams use.
pub const BULK: &str = "bulk";

/// An unreliable unicast channel: at most once, nothing acknowledged (raw NATS publish's
/// contract).
pub const UNRELIABLE: &str = "unreliable";

fn channels() -> [Channel; 4] {
    [
        Channel::new(UNRELIABLE, aqe_core::ChannelKind::Unicast).with_reliable(false),
        Channel::coordination(),
        Channel::results(),
        Channel::new(BULK, aqe_core::ChannelKind::Unicast).with_max_message_size(1 << 20),
    ]
}

/// One endpoint of a fleet.
pub struct Endpoint {
    /// The transport agents attach to.
    pub transport: Arc<dyn Transport>,
    /// The same, when it is QUIC (to connect it).
    pub quic: Option<Arc<QuicTransport>>,
}

impl Endpoint {
    /// A new endpoint of `net`, in NATS fleet `fleet`; bus endpoints are all `bus`.
    pub async fn start(net: &Net, fleet: &str, bus: &Arc<EventBus>) -> Self {
        match net {
            Net::Bus => Self {
                transport: bus.clone(),
                quic: None,
            },
            Net::Quic => {
                let q = Arc::new(
                    QuicTransport::bind(QuicConfig {
                        host: "127.0.0.1".into(),
                        ..QuicConfig::default()
                    })
                    .await
                    .expect("bind"),
                );
                Self {
                    transport: q.clone(),
                    quic: Some(q),
                }
            }
            Net::Nats(url) => Self {
                transport: Arc::new(
                    aqe_nats::NatsTransport::connect(aqe_nats::NatsConfig {
                        servers: vec![url.clone()],
                        fleet: fleet.to_owned(),
                        ..aqe_nats::NatsConfig::default()
                    })
                    .await
                    .expect("connect"),
                ),
                quic: None,
            },
        }
    }

    /// Connects this QUIC endpoint to `other`'s (nothing to do on other transports).
    pub async fn connect(&self, other: &Endpoint) {
        if let (Some(a), Some(b)) = (&self.quic, &other.quic) {
            a.connect(b.local_addr()).await.expect("connect");
        }
    }
}

/// Waits until `agent` knows `n` peers (or the one named `target`).
pub async fn discovered(agent: &Agent, n: usize, target: Option<&aqe_core::AgentId>) {
    let mut events = agent.events();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let peers = agent.discover_peers(&Default::default());
        let enough = match target {
            Some(t) => peers.iter().any(|p| &p.id == t),
            None => peers.len() >= n,
        };
        if enough {
            return;
        }
        assert!(Instant::now() < deadline, "peers not discovered");
        let _ = tokio::time::timeout(Duration::from_millis(5), events.recv()).await;
    }
}

/// A sending agent and `endpoints` x `per_endpoint` receiving agents. Receivers echo requests,
/// and report every message (and every stream's end) to the benchmark.
pub struct Fleet {
    /// The sending agent, alone on its endpoint.
    pub sender: Agent,
    /// The receiving agents.
    pub receivers: Vec<Agent>,
    tally: Tally,
    /// The fleet's name (its NATS subjects).
    name: String,
    /// The sender's endpoint, and the receivers'.
    endpoints: (Endpoint, Vec<Endpoint>),
}

impl Fleet {
    /// Starts the fleet and waits until the sender sees every receiver.
    pub async fn start(net: &Net, endpoints: usize, per_endpoint: usize) -> Self {
        let fleet = format!("bench{}", aqe_core::MessageId::next());
        let bus = Arc::new(EventBus::new());
        let (done, tally) = Tally::new();
        let hub = Endpoint::start(net, &fleet, &bus).await;
        let mut receivers = Vec::new();
        let mut receiving = Vec::new();
        for e in 0..endpoints {
            let ep = Endpoint::start(net, &fleet, &bus).await;
            hub.connect(&ep).await;
            let t = ep.transport.clone();
            receiving.push(ep);
            for a in 0..per_endpoint {
                let (on_msg, on_stream) = (done.clone(), done.clone());
                let mut b = Agent::builder()
                    .id(format!("r{e}-{a}"))
                    .agent_type("receiver")
                    .transport(t.clone())
                    .on_request(
                        |_a, req| async move { Ok::<_, HandlerError>(req.decode::<Bytes>()?) },
                    )
                    .on_message(move |_a, env| {
                        let done = on_msg.clone();
                        async move {
                            std::hint::black_box(&env.payload);
                            done.add(1);
                        }
                    })
                    .on_stream(move |_a, mut stream| {
                        let done = on_stream.clone();
                        async move {
                            let mut bytes = 0;
                            while let Some(Ok(chunk)) = stream.next().await {
                                bytes += chunk.data.len();
                                if chunk.fin {
                                    break;
                                }
                            }
                            done.add(bytes);
                        }
                    });
                for c in channels() {
                    b = b.channel(c);
                }
                receivers.push(b.start().await.expect("receiver"));
            }
        }
        let mut b = Agent::builder()
            .id("sender")
            .agent_type("sender")
            .transport(hub.transport.clone());
        for c in channels() {
            b = b.channel(c);
        }
        let sender = b.start().await.expect("sender");
        discovered(&sender, endpoints * per_endpoint, None).await;
        Self {
            sender,
            receivers,
            tally,
            name: fleet,
            endpoints: (hub, receiving),
        }
    }

    fn first(&self) -> &aqe_core::AgentId {
        self.receivers[0].id()
    }

    /// `n` messages to the first receiver on `channel`, until its handler has them all.
    pub async fn send(&self, payload: &Bytes, channel: &str, n: usize) {
        for _ in 0..n {
            self.sender
                .send_to_agent(self.first(), payload, channel)
                .await
                .expect("send");
        }
        self.tally.wait(n).await;
    }

    /// `n` messages to the first receiver on `channel`, handed over in batches of `batch`
    /// (`send_many`), until its handler has them all.
    pub async fn send_batched(&self, payload: &Bytes, channel: &str, n: usize, batch: usize) {
        let mut left = n;
        while left > 0 {
            let k = left.min(batch);
            self.sender
                .send_many(self.first(), std::iter::repeat_n(payload, k), channel)
                .await
                .expect("send_many");
            left -= k;
        }
        self.tally.wait(n).await;
    }

    /// One request/response with the first receiver.
    pub async fn request(&self, payload: &Bytes) {
        let r: Bytes = self
            .sender
            .request_from_agent(self.first(), payload, RequestOptions::default())
            .await
            .expect("request");
        std::hint::black_box(r);
    }

    /// `n` concurrent request/responses; how long each took.
    pub async fn requests_concurrent(&self, payload: &Bytes, n: usize) -> Vec<Duration> {
        crate::record::concurrently(n, || self.request(payload)).await
    }

    /// One broadcast on `coordination`, until every receiver's handler has it.
    pub async fn broadcast(&self, payload: &Bytes) {
        let report = self
            .sender
            .broadcast_to_fleet(payload, BroadcastOptions::default())
            .await
            .expect("broadcast");
        std::hint::black_box(report);
        self.tally.wait(self.receivers.len()).await;
    }

    /// A stream to the first receiver: opened, `n` writes of `payload` (the last ending
    /// it), until the receiver's handler has read the end.
    pub async fn stream(&self, payload: &Bytes, n: usize) {
        let options = StreamOptions {
            channel: BULK.into(),
            ..StreamOptions::default()
        };
        let s = self
            .sender
            .open_stream(self.first(), options)
            .await
            .expect("open");
        for i in 0..n {
            self.sender
                .write_stream(s, payload.clone(), i + 1 == n)
                .await
                .expect("write");
        }
        self.tally.wait(n * payload.len()).await;
    }
}

/// Endpoint start to first response: a new endpoint of `net` and an agent on it, a request
/// answered by the fleet's first receiver; returns the time to the response (shutting both
/// down afterwards is not counted).
pub async fn setup(net: &Net, to: &Fleet, payload: &Bytes) -> Vec<Duration> {
    let started = Instant::now();
    let bus = Arc::new(EventBus::new());
    let ep = Endpoint::start(net, &to.name, &bus).await;
    ep.connect(&to.endpoints.1[0]).await;
    let agent = Agent::builder()
        .agent_type("client")
        .transport(ep.transport.clone())
        .start()
        .await
        .expect("agent");
    discovered(&agent, 1, Some(to.first())).await;
    let r: Bytes = agent
        .request_from_agent(to.first(), payload, RequestOptions::default())
        .await
        .expect("request");
    let took = started.elapsed();
    std::hint::black_box(r);
    agent.shutdown().await;
    ep.transport.shutdown().await;
    vec![took]
}

impl Fleet {
    /// Shuts every agent and endpoint down.
    pub async fn shutdown(self) {
        self.sender.shutdown().await;
        for r in &self.receivers {
            r.shutdown().await;
        }
        self.endpoints.0.transport.shutdown().await;
        for e in &self.endpoints.1 {
            e.transport.shutdown().await;
        }
    }
}
