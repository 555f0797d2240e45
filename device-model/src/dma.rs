//! Guest memory the card may read: the DMA mappings QEMU hands over vfio-user.
//!
//! QEMU sends a `DMA_MAP` for each piece of guest RAM (IOVA = guest-physical address without a
//! vIOMMU), with a file descriptor when the RAM can be shared (`memory-backend-memfd,share=on`)
//! and none otherwise. The card keeps each mapping as that file and an offset, and reads guest
//! bytes with `pread` on it: nothing is mapped into the device model, so a dump does not grow
//! its resident memory, and a file that QEMU shrinks makes a read come up short (an error for
//! that chunk) instead of a `SIGBUS`.
//!
//! Everything here is QEMU's or the guest's word, so every value is checked: a mapping whose
//! ranges overflow or overlap another is refused; one without a file, without read access, or
//! whose file is shorter than it claims is kept but unreadable; a guest address is readable
//! only if a readable mapping holds every byte of it. The card reads through [`DmaPiece`]s it
//! resolved when the doorbell rang, each holding its own reference to the file, so a mapping
//! QEMU removes while a writer is still reading it stays valid for that read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use thiserror::Error;

/// Mappings kept at most: QEMU maps a handful (RAM below and above the PCI hole, ROMs); a
/// client that sends thousands is refused rather than let grow the device model's memory.
pub const MAX_DMA_REGIONS: usize = 1024;

/// Why a DMA message or a guest address was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DmaError {
    /// The mapping's size is 0, or its IOVA or file range overflows.
    #[error("bad DMA range: iova {iova:#x}, size {size:#x}, offset {offset:#x}")]
    BadRange {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
    },
    /// The mapping overlaps one already there.
    #[error("DMA mapping at {iova:#x} (size {size:#x}) overlaps an existing one")]
    Overlap {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// [`MAX_DMA_REGIONS`] mappings are there already.
    #[error("too many DMA mappings (at most {MAX_DMA_REGIONS})")]
    TooMany,
    /// An unmap cuts a mapping in two.
    #[error("DMA unmap at {iova:#x} (size {size:#x}) splits a mapping")]
    PartialUnmap {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// A guest address range is not wholly inside readable mappings.
    #[error("guest memory {address:#x}+{len:#x} is not mapped for DMA")]
    NotMapped {
        /// Guest-physical address.
        address: u64,
        /// Length.
        len: u64,
    },
}

/// One mapping, as QEMU described it.
#[derive(Debug)]
struct Region {
    iova: u64,
    size: u64,
    /// The file and the offset in it of `iova`; `None` when the card cannot read the mapping.
    source: Option<(Arc<File>, u64)>,
}

impl Region {
    fn end(&self) -> u64 {
        self.iova + self.size // checked when the region was made
    }
}

/// A run of guest bytes inside one mapping, resolved when the doorbell rang.
#[derive(Clone, Debug)]
pub struct DmaPiece {
    file: Arc<File>,
    offset: u64,
    len: u32,
}

impl DmaPiece {
    /// How many bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the piece is empty (never, for a resolved piece).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the piece's bytes into the data window's `slot` at `at`. An error if they do not
    /// fit the slot or the file is shorter than the mapping said.
    pub fn read_into(
        &self,
        window: &crate::data_window::DataWindow,
        slot: u32,
        at: usize,
    ) -> io::Result<()> {
        window.pread_into(slot, at, &self.file, self.offset, self.len())
    }

    /// Reads the piece's bytes from `at` into `buf` (`at + buf.len()` at most [`Self::len`]).
    /// An error if the file is shorter than the mapping said.
    pub fn read(&self, at: usize, buf: &mut [u8]) -> io::Result<()> {
        if at.checked_add(buf.len()).is_none_or(|end| end > self.len()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read past a DMA piece"));
        }
        self.file.read_exact_at(buf, self.offset + at as u64)
    }
}

/// The guest memory QEMU mapped for the card, sorted by IOVA, none overlapping.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    /// `DMA_MAP`: `size` bytes at `iova`, backed by `file` from `offset` when there is one.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        file: Option<File>,
        readable: bool,
    ) -> Result<(), DmaError> {
        let bad = DmaError::BadRange { iova, size, offset };
        if size == 0 || iova.checked_add(size).is_none() || offset.checked_add(size).is_none() {
            return Err(bad);
        }
        if self.regions.len() >= MAX_DMA_REGIONS {
            return Err(DmaError::TooMany);
        }
        let at = self.regions.partition_point(|r| r.iova < iova);
        let overlaps_prev = at > 0 && self.regions[at - 1].end() > iova;
        let overlaps_next = self.regions.get(at).is_some_and(|r| r.iova < iova + size);
        if overlaps_prev || overlaps_next {
            return Err(DmaError::Overlap { iova, size });
        }
        let source = match file {
            Some(f) if readable => {
                // A file shorter than the mapping would make reads come up short: say so now.
                match f.metadata() {
                    Ok(m) if m.len() >= offset + size => Some((Arc::new(f), offset)),
                    Ok(m) => {
                        log::warn!(
                            "DMA mapping {iova:#x}+{size:#x}: its file holds {} bytes, not \
                             {offset:#x}+{size:#x}; the card will not read it",
                            m.len()
                        );
                        None
                    }
                    Err(e) => {
                        log::warn!("DMA mapping {iova:#x}+{size:#x}: cannot stat its file: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        log::debug!(
            "DMA map iova {iova:#x} size {size:#x} offset {offset:#x}: {}",
            if source.is_some() { "readable" } else { "not readable (no shared file)" }
        );
        self.regions.insert(at, Region { iova, size, source });
        Ok(())
    }

    /// `DMA_UNMAP`: removes every mapping inside `size` bytes at `iova` (all of them when
    /// `all`). A range that cuts a mapping in two is refused and changes nothing.
    pub fn unmap(&mut self, iova: u64, size: u64, all: bool) -> Result<(), DmaError> {
        if all {
            self.regions.clear();
            return Ok(());
        }
        let Some(end) = iova.checked_add(size).filter(|_| size > 0) else {
            return Err(DmaError::BadRange { iova, size, offset: 0 });
        };
        if self
            .regions
            .iter()
            .any(|r| r.iova < end && r.end() > iova && (r.iova < iova || r.end() > end))
        {
            return Err(DmaError::PartialUnmap { iova, size });
        }
        self.regions.retain(|r| !(r.iova >= iova && r.end() <= end));
        Ok(())
    }

    /// Mappings kept.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Appends to `out` the pieces that hold `len` bytes of guest memory at `address`: one per
    /// mapping the range crosses. An error (and `out` as it was) unless readable mappings hold
    /// every byte.
    pub fn resolve(&self, address: u64, len: u32, out: &mut Vec<DmaPiece>) -> Result<(), DmaError> {
        let not_mapped = DmaError::NotMapped { address, len: len as u64 };
        let end = address.checked_add(len as u64).ok_or_else(|| not_mapped.clone())?;
        let kept = out.len();
        let mut at = address;
        while at < end {
            let i = self.regions.partition_point(|r| r.end() <= at);
            let piece = self.regions.get(i).filter(|r| r.iova <= at).and_then(|r| {
                let (file, offset) = r.source.as_ref()?;
                let n = (end.min(r.end()) - at) as u32;
                Some(DmaPiece { file: file.clone(), offset: offset + (at - r.iova), len: n })
            });
            let Some(piece) = piece else {
                out.truncate(kept);
                return Err(not_mapped);
            };
            at += piece.len as u64;
            out.push(piece);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of guest memory at `address` (the DMA probe).
    pub fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let mut pieces = Vec::new();
        self.resolve(address, len, &mut pieces)?;
        let mut done = 0;
        for p in &pieces {
            p.read(0, &mut buf[done..done + p.len()])
                .map_err(|_| DmaError::NotMapped { address, len: len as u64 })?;
            done += p.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` bytes, byte i = i % 251.
    fn file(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        f
    }

    #[test]
    fn reads_cross_adjacent_mappings_and_refuse_holes() {
        let mut m = GuestMemory::default();
        m.map(0x1000, 0x2000, 0, Some(file(0x4000)), true).unwrap();
        m.map(0x3000, 0x1000, 0x3000, Some(file(0x4000)), true).unwrap();
        m.map(0x8000, 0x1000, 0, None, true).unwrap(); // no file: unreadable
        let mut buf = [0u8; 0x20];
        m.read(0x2FF0, &mut buf).unwrap();
        let want: Vec<u8> = (0x1FF0..0x2010).map(|i: usize| (i % 251) as u8).collect();
        assert_eq!(&buf[..0x10], &want[..0x10]);
        // The second mapping's file offset 0x3000 holds 0x3000 % 251...
        let second: Vec<u8> = (0x3000..0x3010).map(|i: usize| (i % 251) as u8).collect();
        assert_eq!(&buf[0x10..], &second[..]);
        let mut pieces = Vec::new();
        m.resolve(0x2FF0, 0x20, &mut pieces).unwrap();
        assert_eq!(pieces.len(), 2);
        for (address, len) in [(0x0FFF, 2), (0x3FFF, 2), (0x8000, 1), (0x5000, 1), (u64::MAX, 1)] {
            assert!(m.resolve(address, len, &mut pieces).is_err(), "{address:#x}+{len}");
        }
        assert_eq!(pieces.len(), 2, "a refused range adds nothing");
    }

    #[test]
    fn bad_maps_and_unmaps_are_refused_and_change_nothing() {
        let mut m = GuestMemory::default();
        m.map(0x1000, 0x2000, 0, Some(file(0x2000)), true).unwrap();
        assert!(matches!(m.map(0, 0, 0, None, true), Err(DmaError::BadRange { .. })));
        assert!(matches!(m.map(u64::MAX, 2, 0, None, true), Err(DmaError::BadRange { .. })));
        assert!(matches!(m.map(0, 1, u64::MAX, None, true), Err(DmaError::BadRange { .. })));
        assert!(matches!(m.map(0x2000, 0x1000, 0, None, true), Err(DmaError::Overlap { .. })));
        assert!(matches!(m.map(0, 0x1001, 0, None, true), Err(DmaError::Overlap { .. })));
        assert!(matches!(m.unmap(0x1000, 0x1000, false), Err(DmaError::PartialUnmap { .. })));
        assert!(m.unmap(u64::MAX, 2, false).is_err());
        assert_eq!(m.len(), 1);
        // A file shorter than the mapping, or a write-only mapping: kept, not readable.
        m.map(0x10000, 0x2000, 0, Some(file(0x1000)), true).unwrap();
        m.map(0x20000, 0x1000, 0, Some(file(0x1000)), false).unwrap();
        assert!(m.read(0x10000, &mut [0; 4]).is_err());
        assert!(m.read(0x20000, &mut [0; 4]).is_err());
        m.unmap(0, 0x20000, false).unwrap();
        assert_eq!(m.len(), 1, "only the mapping wholly inside the range went");
        m.unmap(0, 0, true).unwrap();
        assert!(m.is_empty());
        for i in 0..MAX_DMA_REGIONS as u64 {
            m.map(i * 0x1000, 0x1000, 0, None, true).unwrap();
        }
        assert_eq!(m.map(1 << 40, 0x1000, 0, None, true), Err(DmaError::TooMany));
    }

    #[test]
    fn a_piece_outlives_its_unmapped_region_and_a_shrunk_file_reads_short() {
        let mut m = GuestMemory::default();
        let f = file(0x2000);
        let keep = f.try_clone().unwrap();
        m.map(0, 0x2000, 0, Some(f), true).unwrap();
        let mut pieces = Vec::new();
        m.resolve(0x1000, 0x1000, &mut pieces).unwrap();
        m.unmap(0, 0x2000, false).unwrap();
        let mut buf = [0u8; 8];
        pieces[0].read(0, &mut buf).unwrap();
        assert_eq!(buf[0], (0x1000 % 251) as u8);
        assert!(pieces[0].read(0xFFC, &mut buf).is_err(), "past the piece");
        keep.set_len(0x1008).unwrap();
        assert!(pieces[0].read(0, &mut buf).is_ok());
        assert!(pieces[0].read(8, &mut buf).is_err(), "the file shrank under the piece");
    }
}
