//! Bit scanning over the page bitmap, and the walk over the pages a dump holds as extents
//! (runs of consecutive PFNs that are consecutive in the file too), forwards or backwards.

use crate::{Run, PAGE_SIZE};

/// Bit `n` of the bitmap (bit `n % 8` of byte `n / 8`); bits past the slice read as 0.
pub(crate) fn bit(bitmap: &[u8], n: u64) -> bool {
    byte(bitmap, n / 8) >> (n % 8) & 1 == 1
}

fn byte(bitmap: &[u8], index: u64) -> u8 {
    usize::try_from(index).ok().and_then(|i| bitmap.get(i)).copied().unwrap_or(0)
}

/// Number of set bits in `[from, to)`.
pub(crate) fn count_ones(bitmap: &[u8], from: u64, to: u64) -> u64 {
    let mut n = 0u64;
    let mut i = from;
    while i < to && !i.is_multiple_of(8) {
        n += u64::from(bit(bitmap, i));
        i += 1;
    }
    while i + 8 <= to {
        n += u64::from(byte(bitmap, i / 8).count_ones());
        i += 8;
    }
    while i < to {
        n += u64::from(bit(bitmap, i));
        i += 1;
    }
    n
}

/// First set bit in `[from, to)`.
pub(crate) fn find_set(bitmap: &[u8], from: u64, to: u64) -> Option<u64> {
    let mut i = from;
    while i < to {
        let shift = i % 8;
        let b = byte(bitmap, i / 8) >> shift;
        if b == 0 {
            i = i - shift + 8;
            continue;
        }
        let found = i + u64::from(b.trailing_zeros());
        return (found < to).then_some(found);
    }
    None
}

/// First clear bit in `[from, to)`, or `to`.
fn find_clear(bitmap: &[u8], from: u64, to: u64) -> u64 {
    let mut i = from;
    while i < to {
        let shift = i % 8;
        let b = !byte(bitmap, i / 8) >> shift;
        if b == 0 {
            i = i - shift + 8;
            continue;
        }
        return (i + u64::from(b.trailing_zeros())).min(to);
    }
    to
}

/// Mask of bits 0..=`bit` of a byte.
fn low_mask(bit: u64) -> u8 {
    (((1u16) << (bit + 1)) - 1) as u8
}

/// Last set bit in `[from, to)`.
fn find_set_rev(bitmap: &[u8], from: u64, to: u64) -> Option<u64> {
    let mut end = to;
    while end > from {
        let last = end - 1;
        let b = byte(bitmap, last / 8) & low_mask(last % 8);
        if b == 0 {
            end = last - last % 8;
            continue;
        }
        let found = last - last % 8 + u64::from(7 - b.leading_zeros());
        return (found >= from).then_some(found);
    }
    None
}

/// Smallest `s` in `[from, to]` with every bit of `[s, to)` set.
fn find_clear_rev(bitmap: &[u8], from: u64, to: u64) -> u64 {
    let mut end = to;
    while end > from {
        let last = end - 1;
        let b = !byte(bitmap, last / 8) & low_mask(last % 8);
        if b == 0 {
            end = last - last % 8;
            continue;
        }
        let last_clear = last - last % 8 + u64::from(7 - b.leading_zeros());
        return (last_clear + 1).max(from);
    }
    from
}

/// Consecutive pages `pfn .. pfn + count`, stored at file offset `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub pfn: u64,
    pub count: u64,
    pub offset: u64,
}

/// Which pages of the runs the dump holds: all of them, or those whose bit is set.
#[derive(Clone, Copy)]
pub(crate) struct Selection<'a> {
    pub runs: &'a [Run],
    pub bitmap: Option<&'a [u8]>,
    /// Most pages in one extent.
    pub cap: u64,
}

/// Extents in increasing PFN (and file offset) order. The runs must be validated (sorted, no
/// overlap, no overflow).
pub(crate) struct Forward<'a> {
    sel: Selection<'a>,
    run: usize,
    pfn: u64,
    offset: u64,
}

impl<'a> Forward<'a> {
    pub fn new(sel: Selection<'a>, first_offset: u64) -> Self {
        Self { sel, run: 0, pfn: 0, offset: first_offset }
    }
}

impl Iterator for Forward<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        loop {
            let run = self.sel.runs.get(self.run)?;
            let end = run.base_page + run.page_count;
            self.pfn = self.pfn.max(run.base_page);
            let start = match self.sel.bitmap {
                None if self.pfn < end => Some(self.pfn),
                None => None,
                Some(bm) => find_set(bm, self.pfn, end),
            };
            let Some(start) = start else {
                self.run += 1;
                continue;
            };
            let limit = end.min(start + self.sel.cap);
            let stop = match self.sel.bitmap {
                None => limit,
                Some(bm) => find_clear(bm, start, limit),
            };
            let extent = Extent { pfn: start, count: stop - start, offset: self.offset };
            self.pfn = stop;
            self.offset += extent.count * PAGE_SIZE as u64;
            return Some(extent);
        }
    }
}

/// Extents in decreasing PFN (and file offset) order: the same pages as [`Forward`], at the
/// same offsets, though not necessarily cut into the same extents.
pub(crate) struct Backward<'a> {
    sel: Selection<'a>,
    /// Runs not yet finished are `runs[..run]`.
    run: usize,
    pfn_end: u64,
    offset_end: u64,
}

impl<'a> Backward<'a> {
    pub fn new(sel: Selection<'a>, end_offset: u64) -> Self {
        Self { sel, run: sel.runs.len(), pfn_end: u64::MAX, offset_end: end_offset }
    }
}

impl Iterator for Backward<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        loop {
            let run = self.sel.runs.get(self.run.checked_sub(1)?)?;
            let base = run.base_page;
            self.pfn_end = self.pfn_end.min(base + run.page_count);
            let last = match self.sel.bitmap {
                None if self.pfn_end > base => Some(self.pfn_end - 1),
                None => None,
                Some(bm) => find_set_rev(bm, base, self.pfn_end),
            };
            let Some(last) = last else {
                self.run -= 1;
                self.pfn_end = u64::MAX;
                continue;
            };
            let stop = last + 1;
            let lower = base.max(stop.saturating_sub(self.sel.cap));
            let start = match self.sel.bitmap {
                None => lower,
                Some(bm) => find_clear_rev(bm, lower, stop),
            };
            let count = stop - start;
            self.offset_end -= count * PAGE_SIZE as u64;
            self.pfn_end = start;
            return Some(Extent { pfn: start, count, offset: self.offset_end });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bm: &[u8], from: u64, to: u64) -> (Option<u64>, u64, Option<u64>, u64, u64) {
        let set: [bool; 64] = core::array::from_fn(|i| bit(bm, i as u64));
        let fs = (from..to).find(|&i| set[i as usize]);
        let fc = (from..to).find(|&i| !set[i as usize]).unwrap_or(to);
        let fsr = (from..to).rev().find(|&i| set[i as usize]);
        let fcr = (from..to).rev().find(|&i| !set[i as usize]).map_or(from, |i| i + 1);
        let n = (from..to).filter(|&i| set[i as usize]).count() as u64;
        (fs, fc, fsr, fcr, n)
    }

    #[test]
    fn scans_agree_with_a_bit_by_bit_scan() {
        let patterns: [[u8; 8]; 5] = [
            [0; 8],
            [0xFF; 8],
            [0x00, 0x80, 0x01, 0x00, 0xF0, 0x0F, 0x00, 0x01],
            [0xA5, 0x5A, 0xFF, 0x00, 0x3C, 0xC3, 0xFE, 0x7F],
            [0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80],
        ];
        for bm in &patterns {
            for from in 0..64u64 {
                for to in from..=64u64 {
                    let (fs, fc, fsr, fcr, n) = naive(bm, from, to);
                    assert_eq!(find_set(bm, from, to), fs, "{bm:x?} {from} {to}");
                    assert_eq!(find_clear(bm, from, to), fc, "{bm:x?} {from} {to}");
                    assert_eq!(find_set_rev(bm, from, to), fsr, "{bm:x?} {from} {to}");
                    assert_eq!(find_clear_rev(bm, from, to), fcr, "{bm:x?} {from} {to}");
                    assert_eq!(count_ones(bm, from, to), n, "{bm:x?} {from} {to}");
                }
            }
        }
    }

    #[test]
    fn forward_and_backward_cover_the_same_pages_at_the_same_offsets() {
        let runs = [
            Run { base_page: 1, page_count: 9 },
            Run { base_page: 12, page_count: 20 },
            Run { base_page: 40, page_count: 24 },
        ];
        let bm = [0xF6u8, 0xFF, 0x3F, 0xE0, 0x00, 0x1B, 0xFF, 0x7F];
        for bitmap in [None, Some(&bm[..])] {
            for cap in [1, 2, 3, 7, 64] {
                let sel = Selection { runs: &runs, bitmap, cap };
                let mut fwd = std::vec::Vec::new();
                let mut end = 0x2000;
                for e in Forward::new(sel, 0x2000) {
                    assert!(e.count >= 1 && e.count <= cap);
                    assert_eq!(e.offset, end);
                    end += e.count * 0x1000;
                    fwd.extend((0..e.count).map(|i| (e.pfn + i, e.offset + i * 0x1000)));
                }
                let mut bwd = std::vec::Vec::new();
                for e in Backward::new(sel, end) {
                    assert!(e.count >= 1 && e.count <= cap);
                    bwd.extend((0..e.count).rev().map(|i| (e.pfn + i, e.offset + i * 0x1000)));
                }
                bwd.reverse();
                assert_eq!(fwd, bwd);
                let expected: std::vec::Vec<u64> = runs
                    .iter()
                    .flat_map(|r| r.base_page..r.base_page + r.page_count)
                    .filter(|&p| bitmap.is_none_or(|b| bit(b, p)))
                    .collect();
                assert_eq!(fwd.iter().map(|p| p.0).collect::<std::vec::Vec<_>>(), expected);
            }
        }
    }
}
