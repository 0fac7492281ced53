//! A map from sequence numbers to large values that keeps the values still: an ordered
//! index of small entries over a slab whose free slots are reused.
//!
//! An ordered map of large values (an unsettled message is a couple of hundred bytes) moves
//! its neighbours on every insertion and removal; with a message settled per
//! acknowledgement, those moves were the largest single cost of a message. Here only the
//! index's 16-byte entries move, and the slab allocates once for the most it held.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, RangeBounds};

/// An ordered map from sequence numbers, for numbers that mostly arrive in increasing order
/// and mostly leave from the front: a sorted ring of entries, removed ones left as holes
/// until they reach an end or outnumber the rest. Unlike a `BTreeMap`, inserting in order
/// allocates nothing once the ring has grown (a B-tree allocates a node every few
/// insertions, and frees one every few removals: a third of an allocation per message).
/// Anything else (a number below the last, a removal in the middle) stays correct, at the
/// cost of a search and a shift: it is for numbers this side gives out, never for numbers a
/// peer chooses (one inserted in the middle shifts up to half the entries).
pub(crate) struct SeqIndex<V> {
    /// Sorted by number; `None`: removed.
    entries: VecDeque<(u64, Option<V>)>,
    live: usize,
}

/// Whether `k` is below `end`.
fn within(k: u64, end: Bound<u64>) -> bool {
    match end {
        Bound::Included(e) => k <= e,
        Bound::Excluded(e) => k < e,
        Bound::Unbounded => true,
    }
}

impl<V> Default for SeqIndex<V> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            live: 0,
        }
    }
}

impl<V> SeqIndex<V> {
    /// Where `k` is, or would go.
    fn find(&self, k: u64) -> Result<usize, usize> {
        // The ends first: numbers arrive at the back and mostly leave from the front.
        match (self.entries.front(), self.entries.back()) {
            (None, _) | (_, None) => Err(0),
            (_, Some((last, _))) if *last < k => Err(self.entries.len()),
            (_, Some((last, _))) if *last == k => Ok(self.entries.len() - 1),
            (Some((first, _)), _) if *first == k => Ok(0),
            (Some((first, _)), _) if k < *first => Err(0),
            _ => self.entries.binary_search_by_key(&k, |(n, _)| *n),
        }
    }

    /// Keeps `v` under `k`; what was there.
    pub(crate) fn insert(&mut self, k: u64, v: V) -> Option<V> {
        match self.find(k) {
            Ok(i) => {
                let old = self.entries[i].1.replace(v);
                if old.is_none() {
                    self.live += 1;
                }
                old
            }
            Err(i) => {
                self.entries.insert(i, (k, Some(v)));
                self.live += 1;
                None
            }
        }
    }

    /// Keeps `v` under `k` if that moves at most `near` entries (what was there); else
    /// hands `v` back.
    fn insert_near(&mut self, k: u64, v: V, near: usize) -> Result<Option<V>, V> {
        match self.find(k) {
            Err(i) if i.min(self.entries.len() - i) > near => Err(v),
            Ok(i) => {
                let old = self.entries[i].1.replace(v);
                if old.is_none() {
                    self.live += 1;
                }
                Ok(old)
            }
            Err(i) => {
                self.entries.insert(i, (k, Some(v)));
                self.live += 1;
                Ok(None)
            }
        }
    }

    /// What is under `k`.
    pub(crate) fn get(&self, k: &u64) -> Option<&V> {
        self.find(*k).ok().and_then(|i| self.entries[i].1.as_ref())
    }

    /// What is under `k`, to change.
    fn get_mut(&mut self, k: &u64) -> Option<&mut V> {
        self.find(*k).ok().and_then(|i| self.entries[i].1.as_mut())
    }

    /// Takes out what is under `k`.
    pub(crate) fn remove(&mut self, k: &u64) -> Option<V> {
        let i = self.find(*k).ok()?;
        let v = self.entries[i].1.take()?;
        self.live -= 1;
        while self.entries.front().is_some_and(|(_, v)| v.is_none()) {
            self.entries.pop_front();
        }
        while self.entries.back().is_some_and(|(_, v)| v.is_none()) {
            self.entries.pop_back();
        }
        if self.entries.len() > 2 * self.live + 16 {
            // Holes outnumber the entries: closed up, in one pass.
            self.entries.retain(|(_, v)| v.is_some());
        }
        Some(v)
    }

    /// The first position within `range`, and the end of the range (owned).
    fn span(&self, range: &impl RangeBounds<u64>) -> (usize, Bound<u64>) {
        let start = match range.start_bound() {
            Bound::Included(&s) => self.entries.partition_point(|(k, _)| *k < s),
            Bound::Excluded(&s) => self.entries.partition_point(|(k, _)| *k <= s),
            Bound::Unbounded => 0,
        };
        (start, range.end_bound().cloned())
    }

    /// The lowest number held.
    pub(crate) fn first_key(&self) -> Option<u64> {
        // Both ends are always entries, never holes.
        self.entries.front().map(|(k, _)| *k)
    }

    /// The numbers and values within `range`, in order.
    pub(crate) fn range(&self, range: impl RangeBounds<u64>) -> impl Iterator<Item = (u64, &V)> {
        let (start, end) = self.span(&range);
        self.entries
            .range(start..)
            .take_while(move |(k, _)| within(*k, end))
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
    }

    /// Calls `f` on each value within `range`, in number order.
    pub(crate) fn for_each_mut(
        &mut self,
        range: impl RangeBounds<u64>,
        mut f: impl FnMut(u64, &mut V),
    ) {
        let (start, end) = self.span(&range);
        for (k, v) in self.entries.range_mut(start..) {
            if !within(*k, end) {
                break;
            }
            if let Some(v) = v {
                f(*k, v);
            }
        }
    }

    /// Every number and value, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.range(..)
    }

    /// How many are held.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Everything, taken out in order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.live = 0;
        self.entries
            .drain(..)
            .filter_map(|(k, v)| v.map(|v| (k, v)))
    }
}

/// Values by sequence number, in number order.
pub(crate) struct SeqMap<V> {
    index: SeqIndex<usize>,
    slab: Vec<Option<V>>,
    free: Vec<usize>,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        Self {
            index: SeqIndex::default(),
            slab: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V> SeqMap<V> {
    /// Keeps `v` under `k` (replacing what was there).
    pub(crate) fn insert(&mut self, k: u64, v: V) {
        if let Some(&i) = self.index.get(&k) {
            self.slab[i] = Some(v);
            return;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(v);
                i
            }
            None => {
                self.slab.push(Some(v));
                self.slab.len() - 1
            }
        };
        self.index.insert(k, i);
    }

    /// Takes out what is under `k`.
    pub(crate) fn remove(&mut self, k: &u64) -> Option<V> {
        let i = self.index.remove(k)?;
        let v = self.slab[i].take();
        self.free.push(i);
        if self.index.is_empty() {
            // Empty again: the slab starts over, so that a burst does not keep its size.
            self.slab.clear();
            self.free.clear();
        }
        v
    }

    /// The lowest number held.
    pub(crate) fn first_key(&self) -> Option<u64> {
        self.index.first_key()
    }

    /// The numbers held within `range`, in order.
    pub(crate) fn keys_in(&self, range: impl RangeBounds<u64>) -> impl Iterator<Item = u64> + '_ {
        let owned = (range.start_bound().cloned(), range.end_bound().cloned());
        self.index.range(owned).map(|(k, _)| k)
    }

    /// Every value, in number order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.index
            .iter()
            .filter_map(|(_, &i)| self.slab[i].as_ref())
    }

    /// Every number and value, in number order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.index
            .iter()
            .filter_map(|(k, &i)| self.slab[i].as_ref().map(|v| (k, v)))
    }

    /// Calls `f` on each value within `range`, in number order.
    pub(crate) fn for_each_mut(
        &mut self,
        range: impl RangeBounds<u64>,
        mut f: impl FnMut(u64, &mut V),
    ) {
        let slab = &mut self.slab;
        self.index.for_each_mut(range, |k, &mut i| {
            if let Some(v) = slab[i].as_mut() {
                f(k, v);
            }
        });
    }

    /// How many values are held.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Everything, taken out in number order.
    pub(crate) fn take_all(&mut self) -> Vec<(u64, V)> {
        let mut slab = std::mem::take(&mut self.slab);
        self.free.clear();
        self.index
            .drain()
            .filter_map(|(k, i)| slab[i].take().map(|v| (k, v)))
            .collect()
    }
}

/// An ordered map from numbers a peer chooses. Those that come in increasing order (nearly
/// all: a sender numbers its messages as it sends them) go to a [`SeqIndex`] ring, which
/// allocates nothing once it has grown (a `BTreeMap` allocates a node every few insertions:
/// a sixth of an allocation per message received). A number that would move more than
/// [`PeerSeqMap::NEAR`] of the ring's entries goes to a B-tree beside it instead, so that
/// no order a peer sends in makes an insertion cost more than that.
pub(crate) struct PeerSeqMap<V> {
    ring: SeqIndex<V>,
    /// Numbers that came too far out of order for the ring; none of them is in the ring.
    far: BTreeMap<u64, V>,
    /// Most ring entries one insertion may move ([`PeerSeqMap::NEAR`]; fewer in tests).
    near: usize,
}

impl<V> Default for PeerSeqMap<V> {
    fn default() -> Self {
        Self {
            ring: SeqIndex::default(),
            far: BTreeMap::new(),
            near: Self::NEAR,
        }
    }
}

impl<V> PeerSeqMap<V> {
    /// Most ring entries one insertion may move.
    const NEAR: usize = 64;

    /// Keeps `v` under `k`; what was there.
    pub(crate) fn insert(&mut self, k: u64, v: V) -> Option<V> {
        if let Some(slot) = self.far.get_mut(&k) {
            return Some(std::mem::replace(slot, v));
        }
        match self.ring.insert_near(k, v, self.near) {
            Ok(old) => old,
            Err(v) => self.far.insert(k, v),
        }
    }

    /// What is under `k`.
    pub(crate) fn get(&self, k: &u64) -> Option<&V> {
        self.ring.get(k).or_else(|| self.far.get(k))
    }

    /// What is under `k`, to change.
    pub(crate) fn get_mut(&mut self, k: &u64) -> Option<&mut V> {
        match self.ring.get_mut(k) {
            Some(v) => Some(v),
            None => self.far.get_mut(k),
        }
    }

    /// Takes out what is under `k`.
    pub(crate) fn remove(&mut self, k: &u64) -> Option<V> {
        self.ring.remove(k).or_else(|| self.far.remove(k))
    }

    /// The numbers held below `end`, in no particular order.
    pub(crate) fn keys_below(&self, end: u64) -> impl Iterator<Item = u64> + '_ {
        let ring = self.ring.range(..end).map(|(k, _)| k);
        ring.chain(self.far.range(..end).map(|(k, _)| *k))
    }

    /// Every number held, ascending.
    pub(crate) fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        let mut ring = self.ring.iter().map(|(k, _)| k).peekable();
        let mut far = self.far.keys().copied().peekable();
        std::iter::from_fn(move || match (ring.peek(), far.peek()) {
            (Some(a), Some(b)) if b < a => far.next(),
            (Some(_), _) => ring.next(),
            (None, _) => far.next(),
        })
    }

    /// Every value, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.ring.iter().map(|(_, v)| v).chain(self.far.values())
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.ring.drain().for_each(drop);
        self.far.clear();
    }

    /// How many are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len() + self.far.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{PeerSeqMap, SeqIndex, SeqMap};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert a number a little above the highest so far (in order), or anywhere.
        Next(u64),
        Insert(u64),
        Remove(u64),
        /// Remove the lowest: an acknowledgement in order.
        RemoveFirst,
        Get(u64),
        Range(u64, u64),
        Bump(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..4).prop_map(Op::Next),
            1 => (0u64..300).prop_map(Op::Insert),
            3 => (0u64..300).prop_map(Op::Remove),
            3 => Just(Op::RemoveFirst),
            1 => (0u64..300).prop_map(Op::Get),
            1 => (0u64..300, 0u64..300).prop_map(|(a, b)| Op::Range(a.min(b), a.max(b))),
            1 => (0u64..300, 0u64..300).prop_map(|(a, b)| Op::Bump(a.min(b), a.max(b))),
        ]
    }

    /// What both maps answer alike: insertions and removals.
    trait Keyed {
        fn put(&mut self, k: u64, v: usize) -> Option<usize>;
        fn take(&mut self, k: u64) -> Option<usize>;
    }

    impl Keyed for SeqIndex<usize> {
        fn put(&mut self, k: u64, v: usize) -> Option<usize> {
            self.insert(k, v)
        }
        fn take(&mut self, k: u64) -> Option<usize> {
            self.remove(&k)
        }
    }

    impl Keyed for PeerSeqMap<usize> {
        fn put(&mut self, k: u64, v: usize) -> Option<usize> {
            self.insert(k, v)
        }
        fn take(&mut self, k: u64) -> Option<usize> {
            self.remove(&k)
        }
    }

    /// Runs `ops` on both maps: insertions and removals here, checked to answer alike;
    /// every operation then goes to `rest`, which applies the others and checks what it
    /// will after each.
    fn drive<M: Keyed>(
        ops: Vec<Op>,
        ours: &mut M,
        model: &mut BTreeMap<u64, usize>,
        mut rest: impl FnMut(&mut M, &mut BTreeMap<u64, usize>, Op) -> Result<(), TestCaseError>,
    ) -> Result<(), TestCaseError> {
        let mut top = 0u64;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Next(step) => {
                    top += step;
                    prop_assert_eq!(ours.put(top, i), model.insert(top, i));
                }
                Op::Insert(k) => prop_assert_eq!(ours.put(k, i), model.insert(k, i)),
                Op::Remove(k) => prop_assert_eq!(ours.take(k), model.remove(&k)),
                _ => {}
            }
            rest(ours, model, op)?;
        }
        Ok(())
    }

    proptest! {
        /// Whatever the order of operations, it answers as a `BTreeMap` does, holds no more
        /// than three times its entries (plus a few), and both its ends are entries.
        #[test]
        fn a_seq_index_answers_as_an_ordered_map(ops in proptest::collection::vec(op(), 1..400)) {
            let (mut ours, mut model) = (SeqIndex::default(), BTreeMap::new());
            drive(ops, &mut ours, &mut model, |ours, model, op| {
                match op {
                    Op::RemoveFirst => {
                        let first = model.keys().next().copied();
                        prop_assert_eq!(ours.first_key(), first);
                        if let Some(k) = first {
                            prop_assert_eq!(ours.remove(&k), model.remove(&k));
                        }
                    }
                    Op::Get(k) => prop_assert_eq!(ours.get(&k), model.get(&k)),
                    Op::Range(a, b) => {
                        let got: Vec<_> = ours.range(a..b).map(|(k, v)| (k, *v)).collect();
                        let want: Vec<_> = model.range(a..b).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(got, want);
                        let got: Vec<_> = ours.range(..=a).map(|(k, _)| k).collect();
                        let want: Vec<_> = model.range(..=a).map(|(k, _)| *k).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Bump(a, b) => {
                        ours.for_each_mut(a..=b, |_, v| *v += 7);
                        for (_, v) in model.range_mut(a..=b) {
                            *v += 7;
                        }
                    }
                    // Applied by `drive`.
                    Op::Next(_) | Op::Insert(_) | Op::Remove(_) => {}
                }
                prop_assert_eq!(ours.len(), model.len());
                prop_assert_eq!(ours.is_empty(), model.is_empty());
                prop_assert!(ours.entries.len() <= 3 * ours.len() + 16);
                prop_assert!(ours.entries.front().is_none_or(|(_, v)| v.is_some()));
                prop_assert!(ours.entries.back().is_none_or(|(_, v)| v.is_some()));
                Ok(())
            })?;
            let all: Vec<_> = ours.iter().map(|(k, v)| (k, *v)).collect();
            prop_assert_eq!(all, model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
            let drained: Vec<_> = ours.drain().collect();
            prop_assert_eq!(drained, model.into_iter().collect::<Vec<_>>());
            prop_assert!(ours.is_empty());
        }
    }

    proptest! {
        /// A peer's numbers, in whatever order: answered as a `BTreeMap` would, the ring
        /// within three times its entries (plus a few), no number in both halves.
        #[test]
        fn a_peer_seq_map_answers_as_an_ordered_map(ops in proptest::collection::vec(op(), 1..400)) {
            // Two entries moved at most: both halves get numbers.
            let (mut ours, mut model) = (PeerSeqMap { near: 2, ..PeerSeqMap::default() }, BTreeMap::new());
            drive(ops, &mut ours, &mut model, |ours, model, op| {
                match op {
                    Op::RemoveFirst => {
                        if let Some(k) = model.keys().next().copied() {
                            prop_assert_eq!(ours.remove(&k), model.remove(&k));
                        }
                    }
                    Op::Get(k) => prop_assert_eq!(ours.get(&k), model.get(&k)),
                    Op::Range(a, _) => {
                        let mut got: Vec<_> = ours.keys_below(a).collect();
                        got.sort_unstable();
                        let want: Vec<_> = model.range(..a).map(|(k, _)| *k).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Bump(a, b) => {
                        for k in a..=b {
                            if let Some(v) = ours.get_mut(&k) {
                                *v += 7;
                            }
                        }
                        for (_, v) in model.range_mut(a..=b) {
                            *v += 7;
                        }
                    }
                    // Applied by `drive`.
                    Op::Next(_) | Op::Insert(_) | Op::Remove(_) => {}
                }
                prop_assert_eq!(ours.len(), model.len());
                prop_assert!(ours.ring.entries.len() <= 3 * ours.ring.len() + 16);
                prop_assert!(ours.far.keys().all(|k| ours.ring.get(k).is_none()));
                Ok(())
            })?;
            prop_assert_eq!(ours.keys().collect::<Vec<_>>(), model.keys().copied().collect::<Vec<_>>());
            let mut values: Vec<_> = ours.values().copied().collect();
            values.sort_unstable();
            let mut want: Vec<_> = model.values().copied().collect();
            want.sort_unstable();
            prop_assert_eq!(values, want);
            ours.clear();
            prop_assert_eq!(ours.len(), 0);
            prop_assert!(ours.keys().next().is_none());
        }
    }

    #[test]
    fn a_peers_numbers_in_order_allocate_nothing_and_out_of_order_move_few_entries() {
        // Even numbers in order, 200 held at a time.
        let mut m = PeerSeqMap::default();
        for k in (2..=400u64).step_by(2) {
            m.insert(k, k);
        }
        let room = m.ring.entries.capacity();
        for k in (402..=200_000u64).step_by(2) {
            m.insert(k, k);
            assert_eq!(m.remove(&(k - 400)), Some(k - 400));
        }
        assert_eq!(m.ring.entries.capacity(), room, "the ring grew or moved");
        assert!(m.far.is_empty());
        // A little out of order (messages of parallel streams), or near the front, moves
        // few entries: the ring keeps it.
        for k in [199_999, 200_000 - 99, 200_000 - 397] {
            assert_eq!(m.insert(k, 1), None);
        }
        assert!(m.far.is_empty());
        // In the middle it goes beside the ring.
        assert_eq!(m.insert(200_000 - 199, 2), None);
        assert_eq!(m.far.keys().copied().collect::<Vec<_>>(), [200_000 - 199]);
        assert_eq!(m.insert(200_000 - 199, 3), Some(2), "replaced where it is");
        assert_eq!(m.get(&(200_000 - 199)), Some(&3));
        let keys: Vec<u64> = m.keys().collect();
        assert!(keys.is_sorted() && keys.len() == 204, "{}", keys.len());
        assert_eq!(m.remove(&(200_000 - 199)), Some(3));
        assert!(m.far.is_empty());
    }

    #[test]
    fn numbers_in_order_allocate_nothing_once_the_ring_has_grown() {
        let mut m = SeqIndex::default();
        for k in 1..=65u64 {
            m.insert(k, k);
        }
        assert_eq!(m.remove(&1), Some(1));
        let room = m.entries.capacity();
        for k in 66..=100_000u64 {
            m.insert(k, k);
            assert_eq!(m.remove(&(k - 64)), Some(k - 64));
        }
        assert_eq!(m.entries.capacity(), room, "the ring grew or moved");
        assert_eq!(m.first_key(), Some(100_000 - 63));
    }

    #[test]
    fn behaves_as_an_ordered_map_and_reuses_its_slots() {
        let mut m = SeqMap::default();
        for k in [5u64, 1, 9, 3] {
            m.insert(k, k * 10);
        }
        assert_eq!(m.first_key(), Some(1));
        assert_eq!(m.keys_in(2..=9).collect::<Vec<_>>(), vec![3, 5, 9]);
        assert_eq!(m.remove(&3), Some(30));
        assert_eq!(m.remove(&3), None);
        m.insert(7, 70);
        assert_eq!(m.slab.len(), 4, "the freed slot was reused");
        m.for_each_mut(6.., |_, v| *v += 1);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(1, &10), (5, &50), (7, &71), (9, &91)]
        );
        assert_eq!(
            m.values().copied().collect::<Vec<_>>(),
            vec![10, 50, 71, 91]
        );
        assert_eq!(m.len(), 4);
        m.insert(5, 55);
        assert_eq!(m.len(), 4, "replaced, not added");
        let all = m.take_all();
        assert_eq!(all, vec![(1, 10), (5, 55), (7, 71), (9, 91)]);
        assert_eq!(m.len(), 0);
        m.insert(2, 20);
        assert_eq!(m.remove(&2), Some(20));
        assert!(m.slab.is_empty(), "empty again: the slab starts over");
    }
}
