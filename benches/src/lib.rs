//! Set-ups for the latency benchmarks: the floors (a raw tokio channel, raw s2n-quic) and aqe
//! over each transport. Each returns something to call in the measured loop.
#![warn(missing_docs, unreachable_pub)]
#![allow(clippy::unwrap_used)] // benchmark set-up: a failure is a bug to see at once

use std::net::SocketAddr;
use std::sync::Arc;

use aqe_agent::{Agent, EventBus, HandlerError};
use aqe_core::RequestOptions;
use aqe_quic::QuicConfig;
use aqe_quic::QuicTransport;
use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use s2n_quic::client::Connect;
use tokio::sync::{mpsc, oneshot};

/// The payload size of every request and response.
pub const PAYLOAD: usize = 64;

/// A request/response round trip through a raw tokio channel and a serving task: the floor
/// for anything in-process.
pub struct MpscFloor {
    tx: mpsc::Sender<(Bytes, oneshot::Sender<Bytes>)>,
}

impl MpscFloor {
    /// Starts the echo task.
    pub fn start() -> Self {
        let (tx, mut rx) = mpsc::channel::<(Bytes, oneshot::Sender<Bytes>)>(1024);
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(req);
            }
        });
        Self { tx }
    }

    /// One round trip.
    pub async fn round_trip(&self, payload: Bytes) -> Bytes {
        let (reply, answer) = oneshot::channel();
        self.tx.send((payload, reply)).await.unwrap();
        answer.await.unwrap()
    }
}

fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "aqe bench CA");
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (issuer.as_ref().pem(), cert.pem(), key.serialize_pem())
}

/// Raw s2n-quic: an echo server and a connected client on loopback, with nothing of aqe.
pub struct S2nFloor {
    connection: s2n_quic::Connection,
    long_lived: (
        s2n_quic::stream::ReceiveStream,
        s2n_quic::stream::SendStream,
    ),
    _client: s2n_quic::Client,
}

async fn echo_stream(stream: s2n_quic::stream::BidirectionalStream) {
    let (mut recv, mut send) = stream.split();
    // Each request is exactly PAYLOAD bytes; echo it back as soon as it is complete.
    let mut buf = Vec::with_capacity(PAYLOAD);
    while let Ok(Some(chunk)) = recv.receive().await {
        buf.extend_from_slice(&chunk);
        while buf.len() >= PAYLOAD {
            let rest = buf.split_off(PAYLOAD);
            if send
                .send(Bytes::from(std::mem::replace(&mut buf, rest)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let _ = send.finish();
}

impl S2nFloor {
    /// Starts the server and connects the client.
    pub async fn start() -> Self {
        let (ca, cert, key) = certificates();
        let mut server = s2n_quic::Server::builder()
            .with_tls((cert.as_str(), key.as_str()))
            .unwrap()
            .with_io("127.0.0.1:0")
            .unwrap()
            .start()
            .unwrap();
        let addr: SocketAddr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(mut conn) = server.accept().await {
                tokio::spawn(async move {
                    while let Ok(Some(stream)) = conn.accept_bidirectional_stream().await {
                        tokio::spawn(echo_stream(stream));
                    }
                });
            }
        });
        let client = s2n_quic::Client::builder()
            .with_tls(ca.as_str())
            .unwrap()
            .with_io("0.0.0.0:0")
            .unwrap()
            .start()
            .unwrap();
        let mut connection = client
            .connect(Connect::new(addr).with_server_name("localhost"))
            .await
            .unwrap();
        connection.keep_alive(true).unwrap();
        let long_lived = connection
            .open_bidirectional_stream()
            .await
            .unwrap()
            .split();
        Self {
            connection,
            long_lived,
            _client: client,
        }
    }

    /// One round trip on a new bidirectional stream.
    pub async fn new_stream(&mut self, payload: Bytes) -> Bytes {
        let (mut recv, mut send) = self
            .connection
            .open_bidirectional_stream()
            .await
            .unwrap()
            .split();
        send.send(payload).await.unwrap();
        send.finish().unwrap();
        read_exact(&mut recv).await
    }

    /// One round trip on the long-lived stream.
    pub async fn same_stream(&mut self, payload: Bytes) -> Bytes {
        self.long_lived.1.send(payload).await.unwrap();
        read_exact(&mut self.long_lived.0).await
    }
}

async fn read_exact(recv: &mut s2n_quic::stream::ReceiveStream) -> Bytes {
    let first = recv.receive().await.unwrap().unwrap();
    if first.len() >= PAYLOAD {
        return first;
    }
    let mut buf = first.to_vec();
    while buf.len() < PAYLOAD {
        buf.extend_from_slice(&recv.receive().await.unwrap().unwrap());
    }
    Bytes::from(buf)
}

/// Two agents, the responder echoing its request: over the given transports.
pub struct AgentPair {
    /// The requesting agent.
    pub requester: Agent,
    /// The answering agent.
    pub responder: Agent,
}

impl AgentPair {
    async fn start(
        requester: Arc<dyn aqe_core::Transport>,
        responder: Arc<dyn aqe_core::Transport>,
    ) -> Self {
        let responder = Agent::builder()
            .id("responder")
            .agent_type("bench")
            .transport(responder)
            .on_request(|_a, req| async move { Ok::<_, HandlerError>(req.decode::<Bytes>()?) })
            .start()
            .await
            .unwrap();
        let requester = Agent::builder()
            .id("requester")
            .agent_type("bench")
            .transport(requester)
            .start()
            .await
            .unwrap();
        while requester.discover_peers(&Default::default()).is_empty() {
            tokio::task::yield_now().await;
        }
        Self {
            requester,
            responder,
        }
    }

    /// Both agents on one event bus.
    pub async fn bus() -> Self {
        let bus: Arc<dyn aqe_core::Transport> = Arc::new(EventBus::new());
        Self::start(bus.clone(), bus).await
    }

    /// Each agent on its own QUIC endpoint, connected over loopback.
    pub async fn quic() -> Self {
        let (a, b) = quic_pair().await;
        Self::start(Arc::new(a), Arc::new(b)).await
    }

    /// One request/response through the agent API.
    pub async fn request(&self, payload: &Bytes) -> Bytes {
        self.requester
            .request_from_agent(self.responder.id(), payload, RequestOptions::default())
            .await
            .unwrap()
    }
}

/// Two connected QUIC endpoints on loopback.
pub async fn quic_pair() -> (QuicTransport, QuicTransport) {
    let config = || QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    };
    let a = QuicTransport::bind(config()).await.unwrap();
    let b = QuicTransport::bind(config()).await.unwrap();
    a.connect(b.local_addr()).await.unwrap();
    (a, b)
}

/// Raw NATS through a `nats-server` started on loopback for the run: request/reply, and a
/// one-way publication until the subscriber has it. The floor of aqe over NATS, and a
/// reference point for aqe over QUIC. `None` when no `nats-server` binary is installed.
pub struct NatsFloor {
    requester: async_nats::Client,
    _responder: async_nats::Client,
    received: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    /// Keeps the server running.
    pub server: aqe_nats::testing::NatsServer,
}

impl NatsFloor {
    /// Starts `nats-server` on a free loopback port, a responder echoing on `bench` and a
    /// subscriber on `oneway` handing what it receives to the benchmark.
    pub async fn start() -> Option<Self> {
        let server =
            tokio::task::spawn_blocking(|| aqe_nats::testing::NatsServer::start_with(&[]).ok())
                .await
                .ok()??;
        let url = server.url();
        let responder = async_nats::connect(&url).await.ok()?;
        let mut requests = responder.subscribe("bench").await.ok()?;
        let mut oneway = responder.subscribe("oneway").await.ok()?;
        let replier = responder.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(msg) = requests.next().await {
                if let Some(reply) = msg.reply {
                    let _ = replier.publish(reply, msg.payload).await;
                }
            }
        });
        let (tx, received) = mpsc::channel(1024);
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(msg) = oneway.next().await {
                if tx.send(msg.payload).await.is_err() {
                    return;
                }
            }
        });
        responder.flush().await.ok()?;
        let requester = async_nats::connect(&url).await.ok()?;
        Some(Self {
            requester,
            _responder: responder,
            received: tokio::sync::Mutex::new(received),
            server,
        })
    }

    /// One request/reply.
    pub async fn request(&self, payload: Bytes) -> Bytes {
        self.requester
            .request("bench", payload)
            .await
            .unwrap()
            .payload
    }

    /// One publication, until the subscriber has it.
    pub async fn one_way(&self, payload: Bytes) -> Bytes {
        let mut received = self.received.lock().await;
        self.requester.publish("oneway", payload).await.unwrap();
        received.recv().await.unwrap()
    }
}

/// Two agents, each on its own NATS endpoint of one server, the responder echoing requests
/// and handing messages to the benchmark: one-way sends are timed until its handler has them.
pub struct NatsAgents {
    pair: AgentPair,
    received: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

impl NatsAgents {
    /// Connects both agents to the server at `url`.
    pub async fn start(url: &str) -> Self {
        let fleet = format!("bench{}", aqe_core::MessageId::next());
        let config = || aqe_nats::NatsConfig {
            servers: vec![url.to_owned()],
            // A fleet of its own: several pairs may share the server.
            fleet: fleet.clone(),
            ..aqe_nats::NatsConfig::default()
        };
        let a = aqe_nats::NatsTransport::connect(config()).await.unwrap();
        let b = aqe_nats::NatsTransport::connect(config()).await.unwrap();
        let (tx, received) = mpsc::channel(1024);
        let responder = Agent::builder()
            .id("responder")
            .agent_type("bench")
            .transport(Arc::new(b))
            .on_request(|_a, req| async move { Ok::<_, HandlerError>(req.decode::<Bytes>()?) })
            .on_message(move |_a, env| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(env.payload).await;
                }
            })
            .start()
            .await
            .unwrap();
        let requester = Agent::builder()
            .id("requester")
            .agent_type("bench")
            .transport(Arc::new(a))
            .start()
            .await
            .unwrap();
        while !requester
            .discover_peers(&Default::default())
            .iter()
            .any(|p| &p.id == responder.id())
        {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Self {
            pair: AgentPair {
                requester,
                responder,
            },
            received: tokio::sync::Mutex::new(received),
        }
    }

    /// One request/response through the agent API.
    pub async fn request(&self, payload: &Bytes) -> Bytes {
        self.pair.request(payload).await
    }

    /// One message on the ordered reliable `coordination` channel, until the receiving
    /// agent's handler has it.
    pub async fn one_way(&self, payload: &Bytes) -> Bytes {
        let mut received = self.received.lock().await;
        self.pair
            .requester
            .send_to_agent(self.pair.responder.id(), payload, "coordination")
            .await
            .unwrap();
        received.recv().await.unwrap()
    }
}
