//! BAR2, the data window: a memfd shared by the device model, QEMU and (through QEMU's
//! mapping) the guest.
//!
//! The guest stores a chunk's bytes straight into a slot; those stores are plain memory writes
//! with no exit. The device model only looks at a slot when the doorbell names it, and then
//! copies it out before using it (see [`DataWindow::copy_out`]).

use crashmon_card_abi::{BAR2_SIZE, SLOT_COUNT, SLOT_SIZE};
use memmap2::{MmapOptions, MmapRaw};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// The shared memory behind BAR2.
pub struct DataWindow {
    file: File,
    map: MmapRaw,
}

impl DataWindow {
    /// Creates the memfd and maps it.
    pub fn new() -> io::Result<Self> {
        let fd = memfd_create(c"crashmon-data-window", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len(BAR2_SIZE)?;
        let map = MmapOptions::new().len(BAR2_SIZE as usize).map_raw(&file)?;
        Ok(Self { file, map })
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
