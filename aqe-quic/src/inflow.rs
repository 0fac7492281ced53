//! Delivery accounting on the receiving side: what this endpoint's agents took, or will never
//! take, of what a connection brought, waiting to be told to the sender.
//!
//! Each reliable message put in an inbox carries a [`Receipt`](aqe_core::Receipt) on the
//! connection's [`Inflow`] under its sequence number. Settled receipts collect here; the
//! connection's control writer drains them into `Ack` and `Unprocessed` frames, as ranges, in
//! one write per wake-up however many messages were settled meanwhile.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use aqe_core::plumbing::AckSink;

use crate::wire::{Control, SeqRanges, Unprocessed};

/// Settled sequence numbers of one connection, not yet told to the sender.
#[derive(Default)]
pub(crate) struct Inflow {
    state: Mutex<Settled>,
    /// Wakes the control writer.
    pub(crate) wake: Notify,
    /// Messages put in inboxes and not settled yet.
    unsettled: AtomicUsize,
}

#[derive(Default)]
struct Settled {
    taken: Vec<u64>,
    stopped: Vec<u64>,
    not_here: Vec<u64>,
}

impl Inflow {
    fn record(&self, pick: impl FnOnce(&mut Settled) -> &mut Vec<u64>, seq: u64) {
        pick(&mut self.state.lock().unwrap_or_else(|p| p.into_inner())).push(seq);
        self.wake.notify_one();
    }

    /// Counts one more message in hand, unless that makes more than `allowed`.
    pub(crate) fn take_one(&self, allowed: usize) -> bool {
        self.unsettled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok()
    }

    fn settle_one(&self) {
        let _ = self
            .unsettled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The message was refused on arrival: its receiver is not here, or lacks the channel.
    pub(crate) fn refuse(&self, seq: u64) {
        self.record(|s| &mut s.not_here, seq);
    }

    /// The frames telling the sender what was settled since the last call: acknowledgements
    /// first.
    pub(crate) fn drain(&self) -> Vec<Control> {
        let s = std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = Vec::new();
        if !s.taken.is_empty() {
            out.push(Control::Ack(ranges(s.taken)));
        }
        if !s.stopped.is_empty() {
            out.push(Control::Unprocessed(
                ranges(s.stopped),
                Unprocessed::Stopped,
            ));
        }
        if !s.not_here.is_empty() {
            out.push(Control::Unprocessed(
                ranges(s.not_here),
                Unprocessed::NotHere,
            ));
        }
        out
    }
}

impl AckSink for Inflow {
    fn acknowledged(&self, token: u64) {
        self.settle_one();
        self.record(|s| &mut s.taken, token);
    }

    fn abandoned(&self, token: u64) {
        self.settle_one();
        self.record(|s| &mut s.stopped, token);
    }
}

/// Sequence numbers as sorted inclusive ranges.
pub(crate) fn ranges(mut seqs: Vec<u64>) -> SeqRanges {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: SeqRanges = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == s => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_numbers_become_ranges_acks_first() {
        let f = Inflow::default();
        for s in [5, 1, 2, 3, 9, 2] {
            f.acknowledged(s);
        }
        f.abandoned(7);
        f.refuse(8);
        let frames = f.drain();
        assert!(matches!(&frames[0], Control::Ack(r) if r == &[(1, 3), (5, 5), (9, 9)]));
        assert!(
            matches!(&frames[1], Control::Unprocessed(r, Unprocessed::Stopped) if r == &[(7, 7)])
        );
        assert!(
            matches!(&frames[2], Control::Unprocessed(r, Unprocessed::NotHere) if r == &[(8, 8)])
        );
        assert!(f.drain().is_empty());
    }
}
