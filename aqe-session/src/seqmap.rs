//! A map from sequence numbers to large values that keeps the values still: an ordered
//! index of small entries over a slab whose free slots are reused.
//!
//! An ordered map of large values (an unsettled message is a couple of hundred bytes) moves
//! its neighbours on every insertion and removal; with a message settled per
//! acknowledgement, those moves were the largest single cost of a message. Here only the
//! index's 16-byte entries move, and the slab allocates once for the most it held.

use std::collections::BTreeMap;
use std::ops::RangeBounds;

/// Values by sequence number, in number order.
pub(crate) struct SeqMap<V> {
    index: BTreeMap<u64, usize>,
    slab: Vec<Option<V>>,
    free: Vec<usize>,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        Self {
            index: BTreeMap::new(),
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
        self.index.keys().next().copied()
    }

    /// The numbers held within `range`, in order.
    pub(crate) fn keys_in(&self, range: impl RangeBounds<u64>) -> impl Iterator<Item = u64> + '_ {
        self.index.range(range).map(|(k, _)| *k)
    }

    /// Every value, in number order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.index.values().filter_map(|&i| self.slab[i].as_ref())
    }

    /// Every number and value, in number order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.index
            .iter()
            .filter_map(|(k, &i)| self.slab[i].as_ref().map(|v| (*k, v)))
    }

    /// Calls `f` on each value within `range`, in number order.
    pub(crate) fn for_each_mut(
        &mut self,
        range: impl RangeBounds<u64>,
        mut f: impl FnMut(u64, &mut V),
    ) {
        for (k, &i) in self.index.range(range) {
            if let Some(v) = self.slab[i].as_mut() {
                f(*k, v);
            }
        }
    }

    /// How many values are held.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Everything, taken out in number order.
    pub(crate) fn take_all(&mut self) -> Vec<(u64, V)> {
        let index = std::mem::take(&mut self.index);
        let mut slab = std::mem::take(&mut self.slab);
        self.free.clear();
        index
            .into_iter()
            .filter_map(|(k, i)| slab[i].take().map(|v| (k, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SeqMap;

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
