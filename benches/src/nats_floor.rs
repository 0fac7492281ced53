//! Raw NATS through a `nats-server` started on loopback for the run: the floor of aqe over
//! NATS, and a reference point for aqe over QUIC.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use crate::tokio_floor::Tally;

/// A responder echoing on `bench`, a subscriber on `oneway`, and a requesting client.
pub struct NatsFloor {
    requester: async_nats::Client,
    _responder: async_nats::Client,
    tally: Tally,
    /// The server, running as long as this.
    pub server: aqe_nats::testing::NatsServer,
}

impl NatsFloor {
    /// Starts `nats-server` on a free loopback port and the clients; `None` when no
    /// `nats-server` binary is installed.
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
            while let Some(msg) = requests.next().await {
                if let Some(reply) = msg.reply {
                    let _ = replier.publish(reply, msg.payload).await;
                }
            }
        });
        let (done, tally) = Tally::new();
        tokio::spawn(async move {
            while let Some(msg) = oneway.next().await {
                std::hint::black_box(&msg);
                done.add(1);
            }
        });
        responder.flush().await.ok()?;
        let requester = async_nats::connect(&url).await.ok()?;
        Some(Self {
            requester,
            _responder: responder,
            tally,
            server,
        })
    }

    /// One request/reply.
    pub async fn request(&self, payload: &Bytes) {
        let r = self
            .requester
            .request("bench", payload.clone())
            .await
            .expect("reply");
        std::hint::black_box(r);
    }

    /// `n` concurrent request/replies; how long each took.
    pub async fn requests_concurrent(&self, payload: &Bytes, n: usize) -> Vec<Duration> {
        crate::record::concurrently(n, || self.request(payload)).await
    }

    /// `n` publications, until the subscriber has them all.
    pub async fn publish(&self, payload: &Bytes, n: usize) {
        for _ in 0..n {
            self.requester
                .publish("oneway", payload.clone())
                .await
                .expect("publish");
        }
        self.tally.wait(n).await;
    }

    /// A new client: connect, one request/reply; returns the time to the reply (closing is
    /// not counted).
    pub async fn setup(&self, payload: &Bytes) -> Vec<Duration> {
        let started = Instant::now();
        let client = async_nats::connect(self.server.url())
            .await
            .expect("connect");
        let r = client
            .request("bench", payload.clone())
            .await
            .expect("reply");
        let took = started.elapsed();
        std::hint::black_box(r);
        drop(client);
        vec![took]
    }
}

/// `connections` clients each with `per_connection` subscriptions on one subject: one
/// publication reaches them all.
pub struct NatsFanout {
    publisher: async_nats::Client,
    subject: String,
    _clients: Vec<async_nats::Client>,
    tally: Tally,
    subscribers: usize,
}

impl NatsFanout {
    /// Connects the subscribers to the server at `url`.
    pub async fn start(url: &str, connections: usize, per_connection: usize) -> Self {
        let subject = format!("fan{}", aqe_core::MessageId::next());
        let (done, tally) = Tally::new();
        let mut clients = Vec::new();
        for _ in 0..connections {
            let client = async_nats::connect(url).await.expect("connect");
            for _ in 0..per_connection {
                let mut sub = client.subscribe(subject.clone()).await.expect("subscribe");
                let done = done.clone();
                tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        std::hint::black_box(&msg);
                        done.add(1);
                    }
                });
            }
            client.flush().await.expect("flush");
            clients.push(client);
        }
        Self {
            publisher: async_nats::connect(url).await.expect("connect"),
            subject,
            _clients: clients,
            tally,
            subscribers: connections * per_connection,
        }
    }

    /// One publication, until every subscriber has it.
    pub async fn publish(&self, payload: &Bytes) {
        self.publisher
            .publish(self.subject.clone(), payload.clone())
            .await
            .expect("publish");
        self.tally.wait(self.subscribers).await;
    }
}
