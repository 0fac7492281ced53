//! Sequence numbers as inclusive ranges.

use crate::config::MAX_RANGE_SPAN;
use crate::frame::Ranges;

/// Numbers as sorted, merged inclusive ranges (`seqs` is sorted in place, and kept: the
/// caller reuses its room).
pub(crate) fn of(seqs: &mut Vec<u64>) -> Ranges {
    seqs.sort_unstable();
    seqs.dedup();
    of_sorted(seqs.iter().copied())
}

/// Ascending numbers (already sorted, no duplicates) as merged ranges.
pub(crate) fn of_sorted(seqs: impl IntoIterator<Item = u64>) -> Ranges {
    let mut out: Ranges = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(s) => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// Whether ranges are well formed: each `first <= last` and no wider than
/// [`MAX_RANGE_SPAN`], ascending and disjoint.
pub(crate) fn valid(r: &[(u64, u64)]) -> bool {
    let mut prev: Option<u64> = None;
    r.iter().all(|&(first, last)| {
        let ok = first <= last && last - first < MAX_RANGE_SPAN && prev.is_none_or(|p| first > p);
        prev = Some(last);
        ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_ranges_and_bad_ranges_are_told() {
        assert_eq!(of(&mut vec![5, 1, 2, 3, 9, 2]), [(1, 3), (5, 5), (9, 9)]);
        assert_eq!(
            of_sorted([1, 2, 4, u64::MAX]),
            [(1, 2), (4, 4), (u64::MAX, u64::MAX)]
        );
        assert!(valid(&[(1, 3), (5, 5)]));
        assert!(!valid(&[(3, 1)]));
        assert!(!valid(&[(1, 3), (2, 5)]));
        assert!(!valid(&[(0, MAX_RANGE_SPAN)]));
        assert!(valid(&[]));
    }
}
