//! The in-process floors: what a raw tokio channel and a task cost for the same operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Mutex, Notify, broadcast, mpsc, oneshot};

/// Counts what receiving tasks got, and wakes the waiter once, when the count reaches what
/// it waits for: a wake-up per item (a channel of counts, as before) cost the waiting thread a
/// switch per item, which a broadcast to 100 agents paid 100 times and a floor reading many
/// messages in one chunk once.
pub(crate) struct Tally {
    counted: Arc<Counted>,
    /// What earlier waits took of the count.
    taken: Mutex<usize>,
}

struct Counted {
    got: AtomicUsize,
    /// What the waiter waits for (`usize::MAX` when nobody waits).
    goal: AtomicUsize,
    reached: Notify,
}

/// Where receiving tasks report what they got.
#[derive(Clone)]
pub(crate) struct Done(Arc<Counted>);

impl Done {
    pub(crate) fn add(&self, n: usize) {
        let now = self.0.got.fetch_add(n, Ordering::SeqCst) + n;
        if now >= self.0.goal.load(Ordering::SeqCst) {
            self.0.reached.notify_one();
        }
    }
}

impl Tally {
    pub(crate) fn new() -> (Done, Self) {
        let counted = Arc::new(Counted {
            got: AtomicUsize::new(0),
            goal: AtomicUsize::new(usize::MAX),
            reached: Notify::new(),
        });
        (
            Done(counted.clone()),
            Self {
                counted,
                taken: Mutex::new(0),
            },
        )
    }

    /// Waits until the receivers reported `n` items in all (beyond what earlier waits took).
    pub(crate) async fn wait(&self, n: usize) {
        let mut taken = self.taken.lock().await;
        let goal = *taken + n;
        self.counted.goal.store(goal, Ordering::SeqCst);
        loop {
            let reached = self.counted.reached.notified();
            tokio::pin!(reached);
            reached.as_mut().enable();
            if self.counted.got.load(Ordering::SeqCst) >= goal {
                break;
            }
            reached.await;
        }
        self.counted.goal.store(usize::MAX, Ordering::SeqCst);
        *taken = goal;
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
                done.add(1);
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
                    done.add(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tally_waits_for_its_count_and_carries_the_excess_over() {
        let (done, tally) = Tally::new();
        // Reported before anybody waits, and more than the first wait needs.
        done.add(3);
        tally.wait(2).await;
        // The third counts for the next wait, which needs two more from another task.
        let reporter = done.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reporter.add(1);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            reporter.add(1);
        });
        let t = std::time::Instant::now();
        tally.wait(3).await;
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(40),
            "waited for both"
        );
        late.await.expect("reporter");
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), tally.wait(1)).await;
        assert!(waited.is_err(), "nothing is left over");
    }
}
