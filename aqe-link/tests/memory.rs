//! The conformance suite against hosts joined by an in-memory wire: frames encoded, carried
//! over channels in order, decoded, as a wire that loses nothing while its link lives. It
//! exercises the host alone; the QUIC and NATS crates run the same suite over their wires.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use aqe_core::conformance::Harness;
use aqe_core::plumbing::{LocalStreamLimits, StatsRecorder, stream};
use aqe_core::{
    Address, Error, Inbound, Result, StreamHeader, StreamSink, Transport, TransportKind,
};
use aqe_link::{Host, HostConfig, Link, Opening, SessionHandle, Wire};
use aqe_session::{Ended, EndpointId, Frame, Principal, Rank, Transmit, Trust};

struct MemWire {
    listen: SocketAddr,
}

#[async_trait]
impl Wire for MemWire {
    fn kind(&self) -> TransportKind {
        TransportKind::new("MEMORY")
    }

    fn dial(&self, _addr: SocketAddr, _endpoint: EndpointId) {}

    fn listen(&self) -> Option<SocketAddr> {
        Some(self.listen)
    }

    async fn shutdown(&self) {}
}

/// One direction of a link: encoded frames, in order.
struct MemLink {
    to: mpsc::UnboundedSender<Bytes>,
    address: Address,
    /// The host on the other side, for streams.
    peer: Host,
    closed: Mutex<bool>,
}

#[async_trait]
impl Link for MemLink {
    fn transmit(&self, frames: &mut Vec<Transmit>) -> usize {
        for t in frames.drain(..) {
            let mut buf = BytesMut::new();
            t.encode(&mut buf).expect("encode");
            let _ = self.to.send(buf.freeze());
        }
        0
    }

    fn close(&self, _why: Ended) {
        *self.closed.lock().expect("lock") = true;
    }

    fn address(&self) -> Address {
        self.address.clone()
    }

    async fn open_stream(
        &self,
        header: StreamHeader,
        _generation: u64,
        max_chunk: usize,
        stats: Arc<StatsRecorder>,
    ) -> Result<Box<dyn StreamSink>> {
        let local = self
            .peer
            .local(&header.to)
            .ok_or_else(|| Error::PeerNotFound {
                peer: header.to.clone(),
            })?;
        let limits = LocalStreamLimits {
            max_chunk,
            capacity: 64,
            send_timeout: std::time::Duration::from_secs(5),
        };
        let (sink, incoming) = stream(header, limits, stats, local.stats.clone());
        let _ = local
            .inbox
            .deliver_now(Inbound::Stream(incoming), || {})
            .map_err(|(e, _)| e)?;
        Ok(Box::new(sink))
    }
}

static PORT: AtomicU16 = AtomicU16::new(1000);
static NONCE: AtomicU64 = AtomicU64::new(1);

fn host() -> Host {
    host_with(HostConfig::default())
}

fn host_with(config: HostConfig) -> Host {
    let port = PORT.fetch_add(1, Ordering::Relaxed);
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let me = EndpointId::new(u64::from(port), 1);
    let h = Host::new(
        me,
        Address::from(listen),
        Arc::new(MemWire { listen }),
        config,
    );
    h.start();
    h
}

/// Joins two hosts with a link, as a dialer and a listener would after their hellos.
async fn join(a: &Host, b: &Host) {
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    let rank = Rank {
        initiator: a.me(),
        nonce,
    };
    let (to_b, from_a) = mpsc::unbounded_channel();
    let (to_a, from_b) = mpsc::unbounded_channel();
    let trust = |k: EndpointId| Trust {
        authenticated: true,
        principal: Principal::Key(k.key),
    };
    let hello_a = a.hello(nonce, None, None);
    let hello_b = b.hello(nonce, None, None);
    let sa = a
        .open(Opening {
            hello: hello_b,
            rank,
            trust: trust(b.me()),
            link: Arc::new(MemLink {
                to: to_b,
                address: Address::named(format!("mem:{}", b.me())),
                peer: b.clone(),
                closed: Mutex::new(false),
            }),
        })
        .await
        .expect("a opens");
    let sb = b
        .open(Opening {
            hello: hello_a,
            rank,
            trust: trust(a.me()),
            link: Arc::new(MemLink {
                to: to_a,
                address: Address::named(format!("mem:{}", a.me())),
                peer: a.clone(),
                closed: Mutex::new(false),
            }),
        })
        .await
        .expect("b opens");
    read(b.clone(), sb, from_a);
    read(a.clone(), sa, from_b);
}

fn read(host: Host, session: SessionHandle, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            let frame: Frame = postcard::from_bytes(&bytes).expect("a frame");
            if host.frames(&session, [frame]).is_err() {
                return;
            }
        }
    });
}

struct Memory;

#[async_trait]
impl Harness for Memory {
    async fn endpoints(&self, n: usize) -> Vec<Arc<dyn Transport>> {
        let hosts: Vec<Host> = (0..n).map(|_| host()).collect();
        for i in 0..n {
            for j in i + 1..n {
                join(&hosts[i], &hosts[j]).await;
            }
        }
        hosts
            .into_iter()
            .map(|h| Arc::new(h) as Arc<dyn Transport>)
            .collect()
    }
}

aqe_core::conformance_tests!(Memory);

/// A timer a frame makes due earlier than the session's driver sleeps (an acknowledgement
/// of receipt, batched for 20 ms on a lossy wire) fires on time: the driver is woken to
/// re-arm, not left asleep until its earlier deadline (the liveness timeout, here 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_made_due_by_a_frame_fires_on_time() {
    use aqe_core::plumbing::inbox;
    use aqe_core::{AgentId, Channel, Envelope, MessageKind, Recipient, Registration};
    let config = HostConfig {
        session: aqe_session::Config {
            liveness: Duration::from_secs(60),
            heartbeat: Duration::from_secs(20),
            wire: aqe_session::WirePolicy::LOSSY,
            ..aqe_session::Config::default()
        },
        ..HostConfig::default()
    };
    let (a, b) = (host_with(config.clone()), host_with(config));
    join(&a, &b).await;
    let channel = Channel::coordination();
    let mut inboxes = Vec::new();
    for (h, id) in [(&a, "a"), (&b, "b")] {
        let (tx, rx) = inbox(AgentId::from(id), 64);
        inboxes.push(rx);
        h.attach(Registration::new(id, "t").with_channel(channel.clone()), tx)
            .await
            .expect("attach");
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while !a.can_reach(&"b".into()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("b announced");
    let e = Envelope::new(
        "a".into(),
        Recipient::Agent("b".into()),
        channel.name.clone(),
        MessageKind::Direct,
        Bytes::from_static(b"x"),
    );
    a.send(e).await.expect("send");
    // Resolves once b acknowledges receipt, which it batches for 20 ms.
    tokio::time::timeout(
        Duration::from_secs(5),
        a.flush(&"a".into(), &"b".into(), &channel.name),
    )
    .await
    .expect("the acknowledgement of receipt comes within its batching delay, not at the next heartbeat or liveness check")
    .expect("flush");
}
