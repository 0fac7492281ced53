//! The in-process floors: what a raw tokio channel and a task cost for the same operation.

use bytes::Bytes;
use tokio::sync::{Mutex, broadcast, mpsc, oneshot};

/// Counts what a receiving task got and says so once it has `expected` items.
pub(crate) struct Tally {
    done: Mutex<mpsc::Receiver<usize>>,
}

impl Tally {
    pub(crate) fn new() -> (mpsc::Sender<usize>, Self) {
        let (tx, rx) = mpsc::channel(65_536);
        (
            tx,
            Self {
                done: Mutex::new(rx),
            },
        )
    }

    /// Waits until the receivers reported `n` items in all.
    pub(crate) async fn wait(&self, n: usize) {
        let mut rx = self.done.lock().await;
        let mut got = 0;
        while got < n {
            got += rx.recv().await.expect("receiver alive");
        }
    }
}

/// A raw tokio channel to one serving task: request/response (a oneshot back), and one-way
/// messages until that task has them.
pub struct MpscFloor {
    requests: mpsc::Sender<(Bytes, oneshot::Sender<Bytes>)>,
    oneway: mpsc::Sender<Bytes>,
    tally: Tally,
}

impl MpscFloor {
    /// Starts the serving tasks.
    pub fn start() -> Self {
        let (requests, mut rx) = mpsc::channel::<(Bytes, oneshot::Sender<Bytes>)>(1024);
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(req);
            }
        });
        let (oneway, mut rx) = mpsc::channel::<Bytes>(1024);
        let (done, tally) = Tally::new();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                std::hint::black_box(&msg);
                if done.send(1).await.is_err() {
                    return;
                }
            }
        });
        Self {
            requests,
            oneway,
            tally,
        }
    }

    /// One request/response.
    pub async fn request(&self, payload: Bytes) {
        let (reply, answer) = oneshot::channel();
        self.requests.send((payload, reply)).await.expect("alive");
        std::hint::black_box(answer.await.expect("answered"));
    }

    /// `n` concurrent request/responses; how long each took.
    pub async fn requests_concurrent(&self, payload: &Bytes, n: usize) -> Vec<std::time::Duration> {
        crate::record::concurrently(n, || self.request(payload.clone())).await
    }

    /// `n` one-way messages, until the serving task has had all of them.
    pub async fn send(&self, payload: &Bytes, n: usize) {
        for _ in 0..n {
            self.oneway.send(payload.clone()).await.expect("alive");
        }
        self.tally.wait(n).await;
    }
}

/// A tokio broadcast channel to `n` receiving tasks: one send, until all have it.
pub struct BroadcastFloor {
    tx: broadcast::Sender<Bytes>,
    receivers: usize,
    tally: Tally,
}

impl BroadcastFloor {
    /// Starts `receivers` tasks.
    pub fn start(receivers: usize) -> Self {
        let (tx, _) = broadcast::channel::<Bytes>(1024);
        let (done, tally) = Tally::new();
        for _ in 0..receivers {
            let mut rx = tx.subscribe();
            let done = done.clone();
            tokio::spawn(async move {
                while let Ok(msg) = rx.recv().await {
                    std::hint::black_box(&msg);
                    if done.send(1).await.is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            tx,
            receivers,
            tally,
        }
    }

    /// One message to every receiver, until all have it.
    pub async fn broadcast(&self, payload: &Bytes) {
        self.tx.send(payload.clone()).expect("receivers");
        self.tally.wait(self.receivers).await;
    }
}
