//! BAR2, the data window: a memfd shared by the device model, QEMU and (through QEMU's
//! mapping) the guest.
//!
//! The guest stores a chunk's bytes straight into a slot; those stores are plain memory writes
//! with no exit. The device model only looks at a slot when the doorbell names it, and then
//! copies it out before using it (see [`DataWindow::copy_out`]).
//!
//! A doorbell hands its slot to the session's writer thread; the slot stays owned until the
//! writer has put its bytes in the dump file. Ownership is one atomic word per slot, shared by
//! the message loop (which claims) and the writers (which release), so neither ever waits for
//! the other: see [`DataWindow::claim`] and [`DataWindow::oldest_pending`].

use crashmon_card_abi::{BAR2_SIZE, SLOT_COUNT, SLOT_SIZE};
use memmap2::{MmapOptions, MmapRaw};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bit of a slot's owner word: the slot is owned by a writer.
const OWNED: u64 = 1 << 63;
/// Bits of the epoch (the card's reset count) in an owner word, above the sequence number.
const EPOCH_MASK: u32 = 0x7FFF_FFFF;

/// Who owns a slot: the doorbell that handed it to a writer, named by the card's reset epoch and
/// the doorbell's sequence number since that reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotOwner {
    /// The card's reset count when the doorbell rang (31 bits kept).
    pub epoch: u32,
    /// The doorbell's number since that reset (what `COMPLETED` counts).
    pub seq: u32,
}

impl SlotOwner {
    fn word(self) -> u64 {
        OWNED | ((self.epoch & EPOCH_MASK) as u64) << 32 | self.seq as u64
    }

    fn from_word(word: u64) -> Option<Self> {
        (word & OWNED != 0)
            .then_some(Self { epoch: (word >> 32) as u32 & EPOCH_MASK, seq: word as u32 })
    }
}

/// The shared memory behind BAR2.
pub struct DataWindow {
    file: File,
    map: MmapRaw,
    /// One owner word per slot; 0 when the slot is free.
    owners: [AtomicU64; SLOT_COUNT as usize],
}

impl DataWindow {
    /// Creates the memfd and maps it.
    pub fn new() -> io::Result<Self> {
        let fd = memfd_create(c"crashmon-data-window", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len(BAR2_SIZE)?;
        let map = MmapOptions::new().len(BAR2_SIZE as usize).map_raw(&file)?;
        Ok(Self { file, map, owners: std::array::from_fn(|_| AtomicU64::new(0)) })
    }

    /// Hands `slot` to a writer on behalf of `owner`. False (nothing changes) when the slot is
    /// out of range or still owned by an earlier doorbell.
    pub fn claim(&self, slot: u32, owner: SlotOwner) -> bool {
        self.owners.get(slot as usize).is_some_and(|w| {
            w.compare_exchange(0, owner.word(), Ordering::AcqRel, Ordering::Acquire).is_ok()
        })
    }

    /// The writer is done with `slot`: its bytes are in the file (or could not be written).
    pub fn release(&self, slot: u32) {
        if let Some(w) = self.owners.get(slot as usize) {
            w.store(0, Ordering::Release);
        }
    }

    /// Whether `slot` is owned by a writer.
    pub fn is_owned(&self, slot: u32) -> bool {
        self.owners.get(slot as usize).is_some_and(|w| w.load(Ordering::Acquire) != 0)
    }

    /// The sequence number of the oldest doorbell of `epoch` whose slot is still owned, with
    /// `rung` doorbells rung in that epoch so far; `None` when every one of them is done.
    /// `COMPLETED` is this value (or `rung`): it counts doorbells finished in order.
    pub fn oldest_pending(&self, epoch: u32, rung: u32) -> Option<u32> {
        self.owners
            .iter()
            .filter_map(|w| SlotOwner::from_word(w.load(Ordering::Acquire)))
            .filter(|o| o.epoch == epoch & EPOCH_MASK)
            // The oldest is the furthest behind `rung`, in wrapping arithmetic.
            .max_by_key(|o| rung.wrapping_sub(o.seq))
            .map(|o| o.seq)
    }

    /// The fd handed to the vfio-user client for mmap.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Copies `out.len()` bytes of `slot` into `out`. Returns `None` (copying nothing) when the
    /// slot or length is out of range.
    ///
    /// The memory is shared with a guest that may still be writing it, so no Rust reference to
    /// it is ever formed: the bytes are copied through a raw pointer into host-owned memory, and
    /// everything after (the file write, the hash) sees one consistent snapshot.
    pub fn copy_out(&self, slot: u32, out: &mut [u8]) -> Option<()> {
        if slot >= SLOT_COUNT || out.len() > SLOT_SIZE as usize {
            return None;
        }
        let start = slot as usize * SLOT_SIZE as usize;
        // SAFETY: `start + out.len()` is within the mapping (slot < SLOT_COUNT and the length is
        // at most SLOT_SIZE, and the map is SLOT_COUNT * SLOT_SIZE bytes); `out` is host memory
        // that cannot overlap the shared mapping; a concurrent writer can only change which bytes
        // are copied, never make the copy unsound, because both sides are plain bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), out.as_mut_ptr(), out.len())
        };
        Some(())
    }

    /// DMA into the window: reads `len` bytes of `file` at `offset` into `slot` at `at`, with
    /// `pread` straight into the shared mapping. An error if the range is not inside the slot
    /// or the file ends first.
    pub fn pread_into(
        &self,
        slot: u32,
        at: usize,
        file: &File,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let end = at.checked_add(len).filter(|&e| e <= SLOT_SIZE as usize);
        if slot >= SLOT_COUNT || end.is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "DMA past the slot"));
        }
        let mut done = 0usize;
        while done < len {
            let start = slot as usize * SLOT_SIZE as usize + at + done;
            let file_offset = offset.checked_add(done as u64).and_then(|o| i64::try_from(o).ok());
            let Some(file_offset) = file_offset else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "DMA file offset"));
            };
            // SAFETY: `start .. start + (len - done)` is inside the mapping (slot < SLOT_COUNT,
            // at + len <= SLOT_SIZE); the kernel writes plain bytes there, which the guest may
            // change at any time anyway (see `copy_out`).
            let n = unsafe {
                nix::libc::pread(
                    file.as_raw_fd(),
                    self.map.as_mut_ptr().add(start).cast(),
                    len - done,
                    file_offset,
                )
            };
            match n {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "DMA past the file")),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Region read of BAR2, for a client that does not mmap it. `None` when out of range.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Option<()> {
        offset.checked_add(out.len() as u64).filter(|&e| e <= BAR2_SIZE)?;
        // SAFETY: offset..end is inside the mapping (checked above); see `copy_out`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Some(())
    }

    /// Region write of BAR2, for a client that does not mmap it. `None` when out of range.
    pub fn write(&self, offset: u64, data: &[u8]) -> Option<()> {
        offset.checked_add(data.len() as u64).filter(|&e| e <= BAR2_SIZE)?;
        // SAFETY: offset..offset+len is inside the mapping (checked above) and the mapping is
        // writable shared memory; `data` is host memory that cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset as usize),
                data.len(),
            )
        };
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_counts_in_order_and_slots_are_owned_until_released() {
        let w = DataWindow::new().unwrap();
        let at = |seq| SlotOwner { epoch: 7, seq };
        assert!(w.claim(0, at(0)));
        assert!(w.claim(1, at(1)));
        assert!(!w.claim(1, at(2)), "a busy slot cannot be claimed again");
        assert!(!w.claim(SLOT_COUNT, at(2)), "no such slot");
        assert_eq!(w.oldest_pending(7, 3), Some(0));
        w.release(1);
        assert_eq!(w.oldest_pending(7, 3), Some(0), "doorbell 1 is done, but 0 is not");
        w.release(0);
        assert_eq!(w.oldest_pending(7, 3), None);
        // A slot owned by an earlier epoch (before a reset) stays busy but does not hold back
        // the new epoch's count.
        assert!(w.claim(2, at(u32::MAX)));
        assert!(w.is_owned(2));
        assert_eq!(w.oldest_pending(8, 0), None);
        assert!(!w.claim(2, SlotOwner { epoch: 8, seq: 0 }));
    }

    #[test]
    fn oldest_pending_survives_sequence_wrap() {
        let w = DataWindow::new().unwrap();
        assert!(w.claim(0, SlotOwner { epoch: 1, seq: u32::MAX }));
        assert!(w.claim(1, SlotOwner { epoch: 1, seq: 0 }));
        assert_eq!(w.oldest_pending(1, 1), Some(u32::MAX));
    }
}
