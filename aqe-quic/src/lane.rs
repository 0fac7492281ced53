//! The queue between the session and one lane's writer task.
//!
//! A deque under a lock, taken a batch at a time, rather than a channel: it keeps its room
//! once grown (tokio's channels allocate a block every 32 items, a few times per batch of
//! messages), and it wakes its writer only when it goes from empty to not, not per frame.
//! What it holds is bounded by the session's windows, which admitted every frame in it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

struct Queue<T> {
    items: VecDeque<T>,
    /// Sending handles alive: at none, the writer ends once it has taken the rest.
    senders: usize,
    /// The writer is gone: nothing more is taken.
    closed: bool,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    ready: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending half, one per holder (cloned for each).
pub(crate) struct LaneTx<T>(Arc<Shared<T>>);

/// The writer's half.
pub(crate) struct LaneRx<T>(Arc<Shared<T>>);

/// A queue for one lane's writer.
pub(crate) fn lane<T>() -> (LaneTx<T>, LaneRx<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            senders: 1,
            closed: false,
        }),
        ready: Notify::new(),
    });
    (LaneTx(shared.clone()), LaneRx(shared))
}

impl<T> LaneTx<T> {
    /// Queues `item`; hands it back when the writer is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let mut q = self.0.lock();
        if q.closed {
            return Err(item);
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(item);
        drop(q);
        // A writer that found the queue empty waits for this; one that did not will look
        // again before it waits.
        if was_empty {
            self.0.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> Clone for LaneTx<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(self.0.clone())
    }
}

impl<T> Drop for LaneTx<T> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.senders -= 1;
        let last = q.senders == 0;
        drop(q);
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl<T> LaneRx<T> {
    /// Waits for items and moves up to `max` of them into `out`, in order; 0 once every
    /// sending half is gone and nothing is left.
    ///
    /// # Cancel safety
    /// Cancel safe: items are taken only when this returns.
    pub(crate) async fn recv_many(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        loop {
            {
                let mut q = self.0.lock();
                if !q.items.is_empty() {
                    let n = q.items.len().min(max.max(1));
                    out.extend(q.items.drain(..n));
                    return n;
                }
                if q.senders == 0 {
                    return 0;
                }
            }
            // A send between the look above and this wait left a permit: no wake-up is lost.
            self.0.ready.notified().await;
        }
    }
}

impl<T> Drop for LaneRx<T> {
    fn drop(&mut self) {
        let left = {
            let mut q = self.0.lock();
            q.closed = true;
            std::mem::take(&mut q.items)
        };
        // Dropped outside the lock (a frame may own a large payload).
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_come_in_order_in_batches_and_the_queue_keeps_its_room() {
        let (tx, mut rx) = lane();
        let mut out = Vec::new();
        for i in 0..300 {
            tx.send(i).expect("queued");
        }
        assert_eq!(rx.recv_many(&mut out, 256).await, 256);
        assert_eq!(rx.recv_many(&mut out, 256).await, 44);
        assert_eq!(out, (0..300).collect::<Vec<_>>());
        let room = rx.0.lock().items.capacity();
        for round in 0..100 {
            out.clear();
            for i in 0..300 {
                tx.send(round * 1000 + i).expect("queued");
            }
            while out.len() < 300 {
                rx.recv_many(&mut out, 256).await;
            }
            assert_eq!(out, (0..300).map(|i| round * 1000 + i).collect::<Vec<_>>());
        }
        assert_eq!(rx.0.lock().items.capacity(), room, "the queue grew again");
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_send_and_ends_after_the_last_sender() {
        let (tx, mut rx) = lane();
        let other = tx.clone();
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut got = Vec::new();
            while rx.recv_many(&mut out, 8).await > 0 {
                got.append(&mut out);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(1).expect("queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.send(2).expect("queued");
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reader.is_finished(), "a sender is left");
        other.send(3).expect("queued");
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the writer ended")
            .expect("the writer did not panic");
        assert_eq!(got, [1, 2, 3]);
    }

    #[tokio::test]
    async fn sends_fail_once_the_writer_is_gone_and_what_it_left_is_dropped() {
        let (tx, rx) = lane();
        let held = Arc::new(());
        tx.send(held.clone()).expect("queued");
        drop(rx);
        assert_eq!(Arc::strong_count(&held), 1, "what was queued is dropped");
        let back = tx.send(held.clone()).expect_err("the writer is gone");
        assert!(Arc::ptr_eq(&back, &held));
    }
}
