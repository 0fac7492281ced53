//! The QUIC floors: raw s2n-quic on loopback, with nothing of aqe, for each operation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use s2n_quic::client::Connect;
use s2n_quic::connection::Handle;
use s2n_quic::stream::{PeerStream, ReceiveStream, SendStream};
use tokio::sync::Mutex;

use crate::tokio_floor::Tally;

/// A CA, and a `localhost` certificate and key signed by it, in PEM.
pub(crate) struct Pems {
    ca: String,
    cert: String,
    key: String,
}

impl Pems {
    fn new() -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "aqe bench CA");
        let issuer =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("certificate");
        Self {
            ca: issuer.as_ref().pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Echoes a bidirectional stream chunk by chunk.
async fn echo(stream: s2n_quic::stream::BidirectionalStream) {
    let (mut recv, mut send) = stream.split();
    while let Ok(Some(chunk)) = recv.receive().await {
        if send.send(chunk).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Reports every chunk of a receive stream's length to the tally.
async fn count(mut recv: ReceiveStream, done: crate::tokio_floor::Done) {
    while let Ok(Some(chunk)) = recv.receive().await {
        done.add(chunk.len());
    }
}

/// Reads `len` bytes off `recv`.
async fn read(recv: &mut ReceiveStream, len: usize) {
    let mut got = 0;
    while got < len {
        got += recv.receive().await.expect("read").expect("open").len();
    }
}

/// A raw s2n-quic server on a port of its own, echoing bidirectional streams and reporting
/// what unidirectional streams carry to `done`.
fn serve(pems: &Pems, done: crate::tokio_floor::Done) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut server = s2n_quic::Server::builder()
        .with_tls((pems.cert.as_str(), pems.key.as_str()))
        .expect("tls")
        .with_io("127.0.0.1:0")
        .expect("io")
        .start()
        .expect("server");
    let addr = server.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            let done = done.clone();
            tokio::spawn(async move {
                let (_handle, mut acceptor) = conn.split();
                while let Ok(Some(stream)) = acceptor.accept().await {
                    match stream {
                        PeerStream::Bidirectional(s) => {
                            tokio::spawn(echo(s));
                        }
                        PeerStream::Receive(r) => {
                            tokio::spawn(count(r, done.clone()));
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Raw s2n-quic: a server that echoes bidirectional streams and counts what unidirectional
/// streams carry, a client endpoint connected to it, and `fanout` more servers the client
/// is connected to, for broadcasts.
pub struct S2nFloor {
    addr: SocketAddr,
    client: s2n_quic::Client,
    handle: Mutex<Handle>,
    long_lived: Mutex<(ReceiveStream, SendStream)>,
    oneway: Mutex<SendStream>,
    /// One long-lived unidirectional stream per fan-out connection, each to a server
    /// endpoint of its own.
    fanout: Mutex<Vec<SendStream>>,
    tally: Tally,
    _servers: Vec<tokio::task::JoinHandle<()>>,
    /// Keeps the connections open.
    _connections: (
        Vec<s2n_quic::Connection>,
        s2n_quic::connection::StreamAcceptor,
    ),
}

impl S2nFloor {
    /// Starts the server, and connects the client to it once; and starts `fanout` more
    /// servers, each an endpoint of its own as each receiver of a broadcast is, and
    /// connects the client to each.
    pub async fn start(fanout: usize) -> Self {
        let pems = Pems::new();
        let (done, tally) = Tally::new();
        let (addr, server) = serve(&pems, done.clone());
        let mut servers = vec![server];
        let client = s2n_quic::Client::builder()
            .with_tls(pems.ca.as_str())
            .expect("tls")
            .with_io("127.0.0.1:0")
            .expect("io")
            .start()
            .expect("client");
        let connect = |addr| {
            let client = &client;
            async move {
                let mut c = client
                    .connect(Connect::new(addr).with_server_name("localhost"))
                    .await
                    .expect("connect");
                c.keep_alive(true).expect("keep alive");
                c
            }
        };
        let mut connection = connect(addr).await;
        let long_lived = connection
            .open_bidirectional_stream()
            .await
            .expect("stream")
            .split();
        let oneway = connection.open_send_stream().await.expect("stream");
        let (mut fan, mut connections) = (Vec::new(), Vec::new());
        for _ in 0..fanout {
            let (addr, server) = serve(&pems, done.clone());
            servers.push(server);
            let mut c = connect(addr).await;
            fan.push(c.open_send_stream().await.expect("stream"));
            connections.push(c);
        }
        let (handle, acceptor) = connection.split();
        Self {
            _connections: (connections, acceptor),
            addr,
            client,
            handle: Mutex::new(handle),
            long_lived: Mutex::new(long_lived),
            oneway: Mutex::new(oneway),
            fanout: Mutex::new(fan),
            tally,
            _servers: servers,
        }
    }

    /// One request/response on the long-lived bidirectional stream.
    pub async fn request_same_stream(&self, payload: &Bytes) {
        let mut s = self.long_lived.lock().await;
        s.1.send(payload.clone()).await.expect("send");
        read(&mut s.0, payload.len()).await;
    }

    /// One request/response on a new bidirectional stream.
    pub async fn request_new_stream(&self, payload: &Bytes) {
        let stream = self
            .handle
            .lock()
            .await
            .open_bidirectional_stream()
            .await
            .expect("stream");
        let (mut recv, mut send) = stream.split();
        send.send(payload.clone()).await.expect("send");
        send.finish().expect("finish");
        read(&mut recv, payload.len()).await;
    }

    /// `n` concurrent request/responses, each on a new stream; how long each took.
    pub async fn requests_concurrent(&self, payload: &Bytes, n: usize) -> Vec<Duration> {
        let handle = self.handle.lock().await.clone();
        futures::future::join_all((0..n).map(|_| {
            let mut handle = handle.clone();
            async move {
                let t = Instant::now();
                let (mut recv, mut send) = handle
                    .open_bidirectional_stream()
                    .await
                    .expect("stream")
                    .split();
                send.send(payload.clone()).await.expect("send");
                send.finish().expect("finish");
                read(&mut recv, payload.len()).await;
                t.elapsed()
            }
        }))
        .await
    }

    /// `n` messages written one by one on the long-lived unidirectional stream, until the
    /// server has read them.
    pub async fn send(&self, payload: &Bytes, n: usize) {
        let mut s = self.oneway.lock().await;
        for _ in 0..n {
            s.send(payload.clone()).await.expect("send");
        }
        drop(s);
        self.tally.wait(n * payload.len()).await;
    }

    /// A new unidirectional stream carrying `n` messages, written one by one (`buffered`:
    /// in one vectored write), until the server has read all of it.
    pub async fn stream(&self, payload: &Bytes, n: usize, buffered: bool) {
        let mut s = self
            .handle
            .lock()
            .await
            .open_send_stream()
            .await
            .expect("stream");
        if buffered {
            let mut chunks = vec![payload.clone(); n];
            s.send_vectored(&mut chunks).await.expect("send");
        } else {
            for _ in 0..n {
                s.send(payload.clone()).await.expect("send");
            }
        }
        s.finish().expect("finish");
        self.tally.wait(n * payload.len()).await;
    }

    /// `per_connection` messages on each fan-out connection, until the server has them all.
    pub async fn fanout(&self, payload: &Bytes, per_connection: usize) {
        let mut fan = self.fanout.lock().await;
        for s in fan.iter_mut() {
            for _ in 0..per_connection {
                s.send(payload.clone()).await.expect("send");
            }
        }
        let n = fan.len() * per_connection;
        drop(fan);
        self.tally.wait(n * payload.len()).await;
    }

    /// A new connection from the client endpoint: handshake, one request/response on a new
    /// stream; returns the time to the response (closing is not counted).
    pub async fn handshake(&self, payload: &Bytes) -> Vec<Duration> {
        let started = Instant::now();
        let mut c = self
            .client
            .connect(Connect::new(self.addr).with_server_name("localhost"))
            .await
            .expect("connect");
        let (mut recv, mut send) = c.open_bidirectional_stream().await.expect("stream").split();
        send.send(payload.clone()).await.expect("send");
        send.finish().expect("finish");
        read(&mut recv, payload.len()).await;
        let took = started.elapsed();
        c.close(0u32.into());
        vec![took]
    }
}
