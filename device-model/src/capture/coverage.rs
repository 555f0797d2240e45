//! Which byte ranges of a dump file the guest has written: the reassembly bookkeeping.
//!
//! Memory grows with the number of disjoint ranges, never with the dump's size: a sequential
//! dump is one range however large it gets. A guest that scatters more than [`MAX_RANGES`]
//! disjoint ranges stops being tracked (the bytes are still written; only the hole report is
//! given up), so a hostile guest cannot make the host's memory grow without bound.

use std::collections::BTreeMap;

/// Disjoint ranges kept before tracking is given up.
pub const MAX_RANGES: usize = 1 << 16;

/// A set of half-open byte ranges, merged when they touch or overlap.
#[derive(Debug, Default)]
pub struct Coverage {
    /// start -> end, disjoint and not touching.
    ranges: BTreeMap<u64, u64>,
    overflowed: bool,
}

impl Coverage {
    /// Records that `[start, end)` was written.
    pub fn insert(&mut self, start: u64, end: u64) {
        if self.overflowed || start >= end {
            return;
        }
        let (mut new_start, mut new_end) = (start, end);
        // The range that begins at or before `start` may touch it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                new_start = s;
                new_end = new_end.max(e);
            }
        }
        // Every range beginning inside [new_start, new_end] merges.
        let merged: Vec<u64> = self.ranges.range(new_start..=new_end).map(|(&s, _)| s).collect();
        for s in merged {
            if let Some(e) = self.ranges.remove(&s) {
                new_end = new_end.max(e);
            }
        }
        self.ranges.insert(new_start, new_end);
        if self.ranges.len() > MAX_RANGES {
            self.overflowed = true;
            self.ranges.clear();
        }
    }

    /// Whether any byte of `[start, end)` was written; `true` when tracking was given up (the
    /// caller must then assume the worst).
    pub fn touches(&self, start: u64, end: u64) -> bool {
        if self.overflowed {
            return true;
        }
        start < end && self.ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start)
    }

    /// Whether tracking was given up.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes written at least once, or `None` when tracking was given up.
    pub fn covered(&self) -> Option<u64> {
        (!self.overflowed).then(|| self.ranges.iter().map(|(s, e)| e - s).sum())
    }

    /// The holes in `[0, size)`, at most `limit` of them, or `None` when tracking was given up.
    pub fn holes(&self, size: u64, limit: usize) -> Option<Vec<[u64; 2]>> {
        if self.overflowed {
            return None;
        }
        let mut holes = Vec::new();
        let mut at = 0;
        for (&s, &e) in &self.ranges {
            if s > at {
                holes.push([at, s.min(size)]);
            }
            at = e;
        }
        if at < size {
            holes.push([at, size]);
        }
        holes.truncate(limit);
        Some(holes)
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(c: &Coverage) -> Vec<(u64, u64)> {
        c.ranges.iter().map(|(&s, &e)| (s, e)).collect()
    }

    #[test]
    fn sequential_writes_stay_one_range() {
        let mut c = Coverage::default();
        for i in 0..1000 {
            c.insert(i * 10, i * 10 + 10);
        }
        assert_eq!(ranges(&c), vec![(0, 10_000)]);
        assert_eq!(c.covered(), Some(10_000));
        assert_eq!(c.holes(10_000, 10), Some(vec![]));
    }

    #[test]
    fn out_of_order_gaps_then_fill() {
        let mut c = Coverage::default();
        c.insert(100, 200);
        c.insert(300, 400);
        assert_eq!(c.holes(500, 10), Some(vec![[0, 100], [200, 300], [400, 500]]));
        c.insert(0, 100);
        c.insert(200, 300);
        assert_eq!(ranges(&c), vec![(0, 400)]);
        assert_eq!(c.covered(), Some(400));
    }

    #[test]
    fn overlaps_merge_and_spanning_range_swallows() {
        let mut c = Coverage::default();
        c.insert(10, 20);
        c.insert(30, 40);
        c.insert(50, 60);
        c.insert(15, 55);
        assert_eq!(ranges(&c), vec![(10, 60)]);
        c.insert(0, 100);
        assert_eq!(ranges(&c), vec![(0, 100)]);
        c.insert(5, 6);
        assert_eq!(ranges(&c), vec![(0, 100)]);
    }

    #[test]
    fn empty_range_is_ignored() {
        let mut c = Coverage::default();
        c.insert(5, 5);
        assert!(c.is_empty());
    }

    #[test]
    fn too_many_ranges_gives_up_tracking_only() {
        let mut c = Coverage::default();
        for i in 0..=MAX_RANGES as u64 {
            c.insert(i * 2, i * 2 + 1);
        }
        assert!(c.overflowed());
        assert_eq!(c.covered(), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn touches_is_any_overlap() {
        let mut c = Coverage::default();
        c.insert(100, 200);
        c.insert(300, 400);
        for (s, e, want) in [
            (0, 100, false),
            (0, 101, true),
            (199, 300, true),
            (200, 300, false),
            (250, 260, false),
            (399, 1000, true),
            (400, 1000, false),
            (150, 150, false),
        ] {
            assert_eq!(c.touches(s, e), want, "[{s}, {e})");
        }
    }
}
