//! Strict priority among one connection's writers. s2n-quic sends its streams round-robin and
//! has no stream priorities, so aqe decides what it hands s2n-quic and when: each lane's
//! writer takes a turn before every write of at most [`CHUNK`] bytes, and gets none while
//! frames of a higher priority are queued or being written on the same connection. A large
//! message is written a chunk at a time, so it holds a higher-priority frame back by one
//! chunk at most.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use aqe_core::Priority;
use tokio::sync::Notify;

/// The most a writer hands s2n-quic in one turn.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Priorities 0 to 9.
const LEVELS: usize = Priority::MAX.get() as usize + 1;

/// Frames queued or being written on a connection, by priority.
#[derive(Default)]
pub(crate) struct Gate {
    busy: [AtomicUsize; LEVELS],
    /// The connection is closing: nobody waits any more (writes fail by themselves).
    closed: AtomicBool,
    turns: Notify,
}

/// Frames counted per priority (a batch's worth, to touch the gate once per level).
#[derive(Default)]
pub(crate) struct Tally([usize; LEVELS]);

impl Tally {
    pub(crate) fn add(&mut self, p: Priority) {
        self.0[usize::from(p.get())] += 1;
    }

    /// The highest priority counted.
    pub(crate) fn top(&self) -> Priority {
        let top = self.0.iter().rposition(|&n| n > 0).unwrap_or(0);
        Priority::new(top as u8).unwrap_or(Priority::MAX)
    }
}

impl Gate {
    /// Frames were queued for a writer.
    pub(crate) fn queued(&self, t: &Tally) {
        for (busy, &n) in self.busy.iter().zip(&t.0) {
            if n > 0 {
                busy.fetch_add(n, Ordering::AcqRel);
            }
        }
    }

    /// Frames queued earlier were written (or will never be).
    pub(crate) fn done(&self, t: &mut Tally) {
        let mut freed = false;
        for (busy, n) in self.busy.iter().zip(&mut t.0) {
            if *n > 0 {
                freed |= busy.fetch_sub(*n, Ordering::AcqRel) == *n;
                *n = 0;
            }
        }
        if freed {
            self.turns.notify_waiters();
        }
    }

    fn held_back(&self, p: Priority) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.busy[usize::from(p.get()) + 1..]
                .iter()
                .any(|b| b.load(Ordering::Acquire) > 0)
    }

    /// Until nothing of a priority above `p` is queued or being written.
    pub(crate) async fn turn(&self, p: Priority) {
        if !self.held_back(p) {
            return;
        }
        loop {
            let freed = self.turns.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.held_back(p) {
                return;
            }
            freed.await;
        }
    }

    /// The connection is closing: whoever waits goes on (to find its writes refused).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.turns.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn tally(p: u8, n: usize) -> Tally {
        let mut t = Tally::default();
        for _ in 0..n {
            t.add(Priority::new(p).expect("priority"));
        }
        t
    }

    #[tokio::test]
    async fn a_lower_priority_waits_while_a_higher_one_is_queued_and_goes_when_it_is_written() {
        let gate = Arc::new(Gate::default());
        let mut high = tally(9, 2);
        gate.queued(&high);
        // The same or a higher priority is never held back.
        gate.turn(Priority::MAX).await;
        let low = tokio::spawn({
            let gate = gate.clone();
            async move { gate.turn(Priority::MIN).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !low.is_finished(),
            "priority 0 went while priority 9 was queued"
        );
        gate.done(&mut high);
        tokio::time::timeout(Duration::from_secs(5), low)
            .await
            .expect("priority 0 goes once priority 9 is written")
            .expect("join");
    }

    #[tokio::test]
    async fn closing_releases_every_waiter() {
        let gate = Arc::new(Gate::default());
        gate.queued(&tally(5, 1));
        let low = tokio::spawn({
            let gate = gate.clone();
            async move { gate.turn(Priority::new(4).expect("priority")).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!low.is_finished());
        gate.close();
        tokio::time::timeout(Duration::from_secs(5), low)
            .await
            .expect("released")
            .expect("join");
    }

    #[test]
    fn a_tally_knows_its_top_priority() {
        let mut t = tally(3, 2);
        assert_eq!(t.top(), Priority::new(3).expect("priority"));
        t.add(Priority::new(7).expect("priority"));
        assert_eq!(t.top(), Priority::new(7).expect("priority"));
        assert_eq!(Tally::default().top(), Priority::MIN);
    }
}
