//! Driving the card: probe, arm, announce, and stream `KBUGCHECK_DUMP_IO` buffers through the
//! data window's slots and the doorbell, either copying each buffer into a slot (copy mode) or,
//! once the card has proved it can read the driver's memory, describing it as physical ranges
//! that the card reads itself (DMA mode; see the datasheet's "DMA mode").

use crashmon_card_abi::{
    self as abi, cap, chunk_flags, control, regs, status, DmaRange, DumpIoType, ErrorCode,
    SessionState, DMA_PROBE_SIZE, OFFSET_SEQUENTIAL,
};

/// The page size physical ranges are built in: `MmGetPhysicalAddress` translates one page at a
/// time, so a buffer is walked page by page and physically contiguous pages are merged.
const PAGE_SIZE: usize = 0x1000;

/// How many polls in a row may read the same `HOST_CLOCK_MS` before the driver decides the
/// host's clock is frozen and gives up. The clock ticks every millisecond and a poll takes
/// microseconds, so a working host never gets near this; it only stops a card that answers with
/// constant values from hanging the bug check forever.
pub const FROZEN_CLOCK_POLLS: u32 = 1_000_000;

/// Access to one card's BAR0 registers and BAR2 data window.
///
/// Implementations use the platform's register routines: `READ_REGISTER_ULONG`,
/// `WRITE_REGISTER_ULONG` and `WRITE_REGISTER_BUFFER_UCHAR` on Windows, volatile accesses to the
/// mapped BARs in the test guest. All three must be callable at HIGH_LEVEL.
pub trait CardIo {
    /// Reads the 32-bit register at `offset` in BAR0.
    fn read_register(&self, offset: u32) -> u32;
    /// Writes the 32-bit register at `offset` in BAR0.
    fn write_register(&self, offset: u32, value: u32);
    /// Copies `data` into the data window (BAR2) at `offset`. The card guarantees
    /// `offset + data.len()` is within BAR2.
    fn write_window(&self, offset: usize, data: &[u8]);

    /// `MmGetPhysicalAddress`: the physical address of the resident byte at virtual address
    /// `va`, or 0 if it has none. Windows documents it as callable at any IRQL for a valid
    /// non-paged address; it is the one kernel routine the bug-check path may reach, and only
    /// in DMA mode. The default knows no physical address, which keeps the driver in copy mode.
    fn get_physical_address(&self, va: usize) -> u64 {
        let _ = va;
        0
    }
}

/// The driver's DMA probe buffer: [`DMA_PROBE_SIZE`] bytes aligned to their size, so that they
/// never cross a page. It must be resident (a non-paged static on Windows).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaProbeBuffer(pub [u8; DMA_PROBE_SIZE]);

impl DmaProbeBuffer {
    /// A zeroed buffer.
    pub const fn new() -> Self {
        Self([0; DMA_PROBE_SIZE])
    }
}

impl Default for DmaProbeBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// What went wrong talking to the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardError {
    /// BAR0 does not hold the card's magic value.
    NotACard {
        /// What the MAGIC register read.
        magic: u32,
    },
    /// The card speaks another major version of the ABI.
    UnsupportedVersion {
        /// What the VERSION register read.
        version: u32,
    },
    /// The card's slot geometry does not fit its data window.
    BadGeometry,
    /// The card refused a command; the code is the one it latched.
    Refused(ErrorCode),
    /// Nothing moved on the card (no slot freed, no state change, no byte written) for
    /// [`abi::NO_PROGRESS_TIMEOUT_MS`] of the host's clock, or the clock itself stopped.
    Timeout,
    /// The card reads all ones: its host side is gone.
    Gone,
}

/// A probed card and the driver's side of its flow control.
pub struct Card<Io: CardIo> {
    io: Io,
    slot_count: u32,
    slot_size: u32,
    /// Doorbells rung since the card was last reset (wrapping, like the card's COMPLETED).
    rung: u32,
    /// The last COMPLETED value read.
    completed: u32,
    /// DMA mode was proved by [`Card::prove_dma`].
    dma: bool,
    /// What `CHUNK_FLAGS` holds (written only when it changes: each write is an exit).
    flags: u32,
}

impl<Io: CardIo> Card<Io> {
    /// Checks that `io` is a crash-monitor card of a supported version and reads its geometry.
    /// The card is left as it was; call [`Card::reset`] and [`Card::arm`] to use it.
    pub fn probe(io: Io) -> Result<Self, CardError> {
        let magic = io.read_register(regs::MAGIC);
        if magic != abi::MAGIC_VALUE {
            return Err(CardError::NotACard { magic });
        }
        let version = io.read_register(regs::VERSION);
        if version >> 16 != abi::ABI_VERSION_MAJOR as u32 {
            return Err(CardError::UnsupportedVersion { version });
        }
        let slot_count = io.read_register(regs::SLOT_COUNT);
        let slot_size = io.read_register(regs::SLOT_SIZE);
        let window = slot_count as u64 * slot_size as u64;
        if slot_count == 0 || slot_size == 0 || window > abi::BAR2_SIZE {
            return Err(CardError::BadGeometry);
        }
        let completed = io.read_register(regs::COMPLETED);
        Ok(Self { io, slot_count, slot_size, rung: completed, completed, dma: false, flags: 0 })
    }

    /// The register access this card was probed with.
    pub fn io(&self) -> &Io {
        &self.io
    }

    /// Puts the card in its known initial state (`IDLE`, no error, counters at zero).
    pub fn reset(&mut self) {
        self.io.write_register(regs::CONTROL, control::RESET);
        self.rung = 0;
        self.completed = 0;
        self.flags = 0; // RESET clears the chunk registers
    }

    /// Whether DMA mode is in use.
    pub fn dma(&self) -> bool {
        self.dma
    }

    /// Proves DMA mode (at start, PASSIVE_LEVEL, before [`Card::arm`], which clears the error a
    /// failed probe latches): writes a pattern into `buffer`, asks the card to read it by
    /// physical address, and turns DMA mode on only if the card read back exactly the pattern.
    /// A card without [`cap::DMA`], memory the host cannot read (no shared guest RAM), or a
    /// vIOMMU that makes the card's addresses differ from physical ones all leave copy mode.
    /// `seed` varies the pattern (the caller passes something that changes between boots).
    pub fn prove_dma(&mut self, buffer: &mut DmaProbeBuffer, seed: u32) -> bool {
        self.dma = false;
        if self.io.read_register(regs::CAPABILITIES) & cap::DMA == 0 {
            return false;
        }
        let mut x = seed ^ 0x9E37_79B9;
        for b in buffer.0.iter_mut() {
            // xorshift32: every byte differs from a zeroed or stale read.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let pa = self.io.get_physical_address(buffer.0.as_ptr() as usize);
        if pa == 0 {
            return false;
        }
        self.io.write_register(regs::DMA_PROBE_ADDR_LO, pa as u32);
        self.io.write_register(regs::DMA_PROBE_ADDR_HI, (pa >> 32) as u32);
        self.io.write_register(regs::CONTROL, control::DMA_PROBE);
        if self.check().is_err() {
            return false;
        }
        self.dma = buffer.0.chunks_exact(4).enumerate().all(|(i, want)| {
            let got = self.io.read_register(regs::DMA_PROBE_DATA + 4 * i as u32);
            got.to_le_bytes() == *want
        });
        self.dma
    }

    /// Readies the card for a crash.
    pub fn arm(&mut self) -> Result<(), CardError> {
        self.io.write_register(regs::CONTROL, control::ARM);
        self.check()
    }

    /// Tells the host of a bug check before the first dump byte, and opens the session.
    pub fn announce(&mut self, code: u32, parameters: [u64; 4]) -> Result<(), CardError> {
        self.io.write_register(regs::BUGCHECK_CODE, code);
        for (n, p) in parameters.iter().enumerate() {
            let lo = regs::bugcheck_param_lo(n);
            self.io.write_register(lo, *p as u32);
            self.io.write_register(lo + 4, (*p >> 32) as u32);
        }
        self.io.write_register(regs::CONTROL, control::ANNOUNCE);
        self.check()
    }

    /// Closes an open session as incomplete; a no-op on the card when none is open. This is the
    /// known final state the legacy BugCheckCallback leaves the card in.
    pub fn abort(&mut self) {
        self.io.write_register(regs::CONTROL, control::ABORT);
    }

    /// The card's session state, or `None` if STATUS holds an unknown state.
    pub fn state(&self) -> Option<SessionState> {
        SessionState::from_status(self.io.read_register(regs::STATUS))
    }

    /// Sends one `KBUGCHECK_DUMP_IO`: `offset` is its Offset (`u64::MAX`, Windows' -1, for a
    /// sequential write), `kind` its Type and `buffer` its Buffer/BufferLength. Buffers larger
    /// than a slot go out as several chunks; explicit offsets advance with them.
    /// `KbDumpIoComplete` (with an empty buffer) closes the session and reports whether the card
    /// refused anything during it.
    pub fn dump_io(
        &mut self,
        offset: u64,
        kind: DumpIoType,
        buffer: &[u8],
    ) -> Result<(), CardError> {
        if kind == DumpIoType::Complete {
            self.set_flags(0);
            self.describe(0, 0, kind, 0);
            self.ring();
            return self.check_complete();
        }
        if self.dma {
            return self.dump_io_dma(offset, kind, buffer);
        }
        self.dump_io_copy(offset, kind, buffer)
    }

    /// Copy mode: the buffer goes into the slots, a slot's worth per doorbell.
    fn dump_io_copy(
        &mut self,
        offset: u64,
        kind: DumpIoType,
        buffer: &[u8],
    ) -> Result<(), CardError> {
        self.set_flags(0);
        // No indexing that could panic: a panic here would itself bug check (KeBugCheckEx) in
        // the middle of the dump. `split_at_checked` cannot fail for `len <= rest.len()`.
        let mut done = 0usize;
        let mut rest = buffer;
        while !rest.is_empty() {
            let len = rest.len().min(self.slot_size as usize);
            let (chunk, tail) = rest.split_at_checked(len).unwrap_or((rest, &[]));
            let slot = self.free_slot()?;
            self.io.write_window(slot as usize * self.slot_size as usize, chunk);
            let chunk_offset = if offset == OFFSET_SEQUENTIAL {
                OFFSET_SEQUENTIAL
            } else {
                offset.wrapping_add(done as u64)
            };
            self.describe(chunk_offset, chunk.len() as u32, kind, slot);
            self.ring();
            done += chunk.len();
            rest = tail;
        }
        Ok(())
    }

    /// DMA mode: the buffer is described page by page as physical ranges (physically
    /// contiguous pages merged) in a slot's scatter list, and the card reads it from memory.
    /// Bug-check path: no allocation (the list is written entry by entry into the slot), and
    /// `MmGetPhysicalAddress` is the only kernel routine called. Windows may reuse the buffer as
    /// soon as this returns: the card reads the ranges when the doorbell rings, and the STATUS
    /// read after each doorbell returns only once it has (see the datasheet's "DMA mode"). A
    /// page with no physical address sends the rest of the buffer in copy mode; a doorbell the
    /// card refuses as `BAD_DMA` does too, and ends DMA mode.
    fn dump_io_dma(
        &mut self,
        offset: u64,
        kind: DumpIoType,
        buffer: &[u8],
    ) -> Result<(), CardError> {
        let max_entries = abi::MAX_DMA_RANGES.min(self.slot_size / DmaRange::SIZE as u32);
        let start = buffer.as_ptr() as usize;
        let mut done = 0usize;
        let mut fallback = false;
        while done < buffer.len() && !fallback {
            let slot = self.free_slot()?;
            let list = slot as usize * self.slot_size as usize;
            let chunk_start = done;
            let mut entries = 0u32;
            let mut pending: Option<DmaRange> = None;
            while done < buffer.len() {
                // A DMA chunk fills at most a slot, as a copied one does.
                let room = self.slot_size as usize - (done - chunk_start);
                if room == 0 {
                    break;
                }
                let va = start.wrapping_add(done);
                let n = (PAGE_SIZE - va % PAGE_SIZE).min(buffer.len() - done).min(room);
                let pa = self.io.get_physical_address(va);
                if pa == 0 {
                    fallback = true;
                    break;
                }
                match pending.as_mut() {
                    Some(r) if r.address.wrapping_add(r.length as u64) == pa => {
                        r.length += n as u32;
                    }
                    _ => {
                        if let Some(r) = pending.take() {
                            self.io.write_window(
                                list + entries as usize * DmaRange::SIZE,
                                &r.to_bytes(),
                            );
                            entries += 1;
                        }
                        if entries == max_entries {
                            break;
                        }
                        pending = Some(DmaRange { address: pa, length: n as u32, reserved: 0 });
                    }
                }
                done += n;
            }
            if let Some(r) = pending.take() {
                self.io.write_window(list + entries as usize * DmaRange::SIZE, &r.to_bytes());
                entries += 1;
            }
            if entries == 0 {
                break;
            }
            let chunk_offset = if offset == OFFSET_SEQUENTIAL {
                OFFSET_SEQUENTIAL
            } else {
                offset.wrapping_add(chunk_start as u64)
            };
            self.set_flags(chunk_flags::DMA);
            self.io.write_register(regs::CHUNK_RANGES, entries);
            self.describe(chunk_offset, (done - chunk_start) as u32, kind, slot);
            self.ring();
            // A range the card cannot read (memory it was not given) refuses the doorbell
            // before it takes any byte: this chunk and the rest go in copy mode, and so does
            // every later buffer. Reading STATUS also waits for the posted writes above.
            let status = self.io.read_register(regs::STATUS);
            if status != status::GONE
                && status & status::ERROR != 0
                && self.io.read_register(regs::ERROR) == ErrorCode::BadDma as u32
            {
                self.io.write_register(regs::CONTROL, control::CLEAR_ERROR);
                self.dma = false;
                done = chunk_start;
                fallback = true;
            }
        }
        // Every doorbell above was followed by a STATUS read, so the card has read every range
        // already: the buffer is the system's again.
        let rest = buffer.get(done..).unwrap_or(&[]);
        if rest.is_empty() {
            return Ok(());
        }
        let rest_offset =
            if offset == OFFSET_SEQUENTIAL { offset } else { offset.wrapping_add(done as u64) };
        self.dump_io_copy(rest_offset, kind, rest)
    }

    fn set_flags(&mut self, flags: u32) {
        if self.flags != flags {
            self.io.write_register(regs::CHUNK_FLAGS, flags);
            self.flags = flags;
        }
    }

    fn describe(&self, offset: u64, length: u32, kind: DumpIoType, slot: u32) {
        self.io.write_register(regs::CHUNK_OFFSET_LO, offset as u32);
        self.io.write_register(regs::CHUNK_OFFSET_HI, (offset >> 32) as u32);
        self.io.write_register(regs::CHUNK_LENGTH, length);
        self.io.write_register(regs::CHUNK_TYPE, kind as u32);
        self.io.write_register(regs::CHUNK_SLOT, slot);
    }

    fn ring(&mut self) {
        self.io.write_register(regs::DOORBELL, 1);
        self.rung = self.rung.wrapping_add(1);
    }

    /// The slot for the next doorbell, once the card has finished with its previous use (its
    /// bytes are in the host's file). A slow host disk makes this wait; see [`Card::wait`].
    fn free_slot(&mut self) -> Result<u32, CardError> {
        self.wait(|card| {
            // Doorbells in flight; negative when someone else rang the card since our count was
            // taken, in which case the card's count is the truth.
            let in_flight = card.rung.wrapping_sub(card.completed) as i32;
            if in_flight < 0 {
                card.rung = card.completed;
            }
            if (in_flight.max(0) as u32) < card.slot_count {
                return Ok(Some(card.rung % card.slot_count));
            }
            card.completed = card.io.read_register(regs::COMPLETED);
            Ok(None)
        })
    }

    /// Polls `done` until it yields, bounded by progress rather than by a fixed total: the wait
    /// goes on as long as something moves on the card (`COMPLETED`, the session state,
    /// `BYTES_WRITTEN`), and ends with [`CardError::Timeout`] only after
    /// [`abi::NO_PROGRESS_TIMEOUT_MS`] of the host's clock with nothing moving, so that a slow
    /// disk slows the dump down but never loses it, while a host stuck for good still lets the
    /// system reboot. A card that reads all ones is gone: [`CardError::Gone`] at once.
    ///
    /// Bug-check path: this busy-polls registers (no timer, no wait object, no kernel routine);
    /// the only clock is the card's own `HOST_CLOCK_MS`.
    fn wait<T>(
        &mut self,
        mut done: impl FnMut(&mut Self) -> Result<Option<T>, CardError>,
    ) -> Result<T, CardError> {
        let mut last: Option<(u32, u32, u32)> = None;
        let mut since = 0u32;
        let mut clock_seen = 0u32;
        let mut same_clock = 0u32;
        loop {
            if let Some(value) = done(self)? {
                return Ok(value);
            }
            let status = self.io.read_register(regs::STATUS);
            if status == status::GONE {
                return Err(CardError::Gone);
            }
            let marker = (self.completed, status, self.io.read_register(regs::BYTES_WRITTEN_LO));
            let clock = self.io.read_register(regs::HOST_CLOCK_MS);
            if last != Some(marker) {
                last = Some(marker);
                since = clock;
            } else if clock.wrapping_sub(since) >= abi::NO_PROGRESS_TIMEOUT_MS {
                return Err(CardError::Timeout);
            }
            if clock == clock_seen {
                same_clock += 1;
                if same_clock >= FROZEN_CLOCK_POLLS {
                    return Err(CardError::Timeout);
                }
            } else {
                clock_seen = clock;
                same_clock = 0;
            }
        }
    }

    fn check(&self) -> Result<(), CardError> {
        let status = self.io.read_register(regs::STATUS);
        if status == status::GONE {
            return Err(CardError::Gone);
        }
        if status & status::ERROR == 0 {
            return Ok(());
        }
        let code = ErrorCode::from_u32(self.io.read_register(regs::ERROR));
        Err(CardError::Refused(code.unwrap_or(ErrorCode::BadState)))
    }

    /// After the complete doorbell: waits (bounded by progress) while the host makes the dump
    /// durable (`FINISHING`), then reports whether it is `COMPLETE` and nothing was refused.
    fn check_complete(&mut self) -> Result<(), CardError> {
        let status = self.wait(|card| {
            let status = card.io.read_register(regs::STATUS);
            match SessionState::from_status(status) {
                Some(SessionState::Finishing) => Ok(None),
                _ => Ok(Some(status)),
            }
        })?;
        if status == status::GONE {
            return Err(CardError::Gone);
        }
        self.check()?;
        match SessionState::from_status(status) {
            Some(SessionState::Complete) => Ok(()),
            _ => Err(CardError::Refused(ErrorCode::BadState)),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// A recording stand-in for the card's register file, for checking the driver's own
    /// sequencing (the real card is exercised in device-model's integration tests).
    #[derive(Default)]
    struct Recorder {
        log: RefCell<Vec<(u32, u32)>>,
        completed_reads: RefCell<u32>,
        lag: u32,
        /// What HOST_CLOCK_MS reads advance by, per read.
        tick_ms: u32,
        clock: RefCell<u32>,
        /// COMPLETED advances by one doorbell every this many ms of host clock (0: see `lag`).
        ms_per_doorbell: u32,
        /// STATUS reads FINISHING this many times after the complete doorbell.
        finishing_reads: RefCell<u32>,
    }

    impl CardIo for &Recorder {
        fn read_register(&self, offset: u32) -> u32 {
            match offset {
                regs::MAGIC => abi::MAGIC_VALUE,
                regs::VERSION => abi::ABI_VERSION,
                regs::SLOT_COUNT => 2,
                regs::SLOT_SIZE => 4,
                regs::COMPLETED => {
                    // The card catches up with every doorbell, `lag` reads late, or one
                    // doorbell per `ms_per_doorbell` of host clock (a slow disk).
                    *self.completed_reads.borrow_mut() += 1;
                    let rung =
                        self.log.borrow().iter().filter(|(r, _)| *r == regs::DOORBELL).count()
                            as u32;
                    if let Some(done) = self.clock.borrow().checked_div(self.ms_per_doorbell) {
                        return rung.min(done);
                    }
                    if *self.completed_reads.borrow() > self.lag {
                        rung
                    } else {
                        0
                    }
                }
                regs::HOST_CLOCK_MS => {
                    let mut clock = self.clock.borrow_mut();
                    *clock = clock.wrapping_add(self.tick_ms);
                    *clock
                }
                regs::STATUS => {
                    let mut finishing = self.finishing_reads.borrow_mut();
                    if *finishing > 0 {
                        *finishing -= 1;
                        SessionState::Finishing as u32
                    } else {
                        SessionState::Complete as u32
                    }
                }
                _ => 0,
            }
        }
        fn write_register(&self, offset: u32, value: u32) {
            self.log.borrow_mut().push((offset, value));
        }
        fn write_window(&self, offset: usize, data: &[u8]) {
            self.log.borrow_mut().push((u32::MAX, (offset as u32) << 8 | data.len() as u32));
        }
    }

    #[test]
    fn large_buffers_split_across_slots_with_advancing_offsets() {
        let rec = Recorder { lag: 2, ..Default::default() };
        let mut card = Card::probe(&rec).unwrap();
        card.dump_io(100, DumpIoType::Body, &[0u8; 10]).unwrap();
        let log = rec.log.borrow();
        let offsets: Vec<u32> =
            log.iter().filter(|(r, _)| *r == regs::CHUNK_OFFSET_LO).map(|p| p.1).collect();
        let lengths: Vec<u32> =
            log.iter().filter(|(r, _)| *r == regs::CHUNK_LENGTH).map(|p| p.1).collect();
        let slots: Vec<u32> =
            log.iter().filter(|(r, _)| *r == regs::CHUNK_SLOT).map(|p| p.1).collect();
        assert_eq!(offsets, [100, 104, 108]);
        assert_eq!(lengths, [4, 4, 2]);
        assert_eq!(slots, [0, 1, 0]);
        assert!(*rec.completed_reads.borrow() >= 1, "the third chunk waited for slot 0");
    }

    #[test]
    fn sequential_stays_minus_one_and_complete_has_no_bytes() {
        let rec = Recorder::default();
        let mut card = Card::probe(&rec).unwrap();
        card.dump_io(u64::MAX, DumpIoType::Header, &[1u8; 6]).unwrap();
        card.dump_io(u64::MAX, DumpIoType::Complete, &[]).unwrap();
        let log = rec.log.borrow();
        let his: Vec<u32> =
            log.iter().filter(|(r, _)| *r == regs::CHUNK_OFFSET_HI).map(|p| p.1).collect();
        assert_eq!(his, [u32::MAX, u32::MAX, 0]);
        assert_eq!(log.iter().filter(|(r, _)| *r == regs::DOORBELL).count(), 3);
    }

    #[test]
    fn a_dead_card_times_out_instead_of_hanging() {
        let rec = Recorder { lag: u32::MAX, ..Default::default() };
        let mut card = Card::probe(&rec).unwrap();
        assert_eq!(card.dump_io(0, DumpIoType::Body, &[0u8; 12]), Err(CardError::Timeout));
    }

    #[test]
    fn a_slow_disk_slows_the_dump_but_never_times_it_out() {
        // One slot freed every 100 s of host clock: far slower than any real disk, but always
        // moving, so the wait never gives up.
        let rec = Recorder { tick_ms: 1000, ms_per_doorbell: 100_000, ..Default::default() };
        let mut card = Card::probe(&rec).unwrap();
        card.dump_io(0, DumpIoType::Body, &[0u8; 24]).unwrap();
        assert!(*rec.clock.borrow() > 3 * 100_000, "it did wait for the slow host");
    }

    #[test]
    fn no_progress_for_the_limit_times_out_by_the_host_clock() {
        let rec = Recorder { lag: u32::MAX, tick_ms: 1000, ..Default::default() };
        let mut card = Card::probe(&rec).unwrap();
        assert_eq!(card.dump_io(0, DumpIoType::Body, &[0u8; 12]), Err(CardError::Timeout));
        let waited = *rec.clock.borrow();
        assert!(
            (abi::NO_PROGRESS_TIMEOUT_MS..abi::NO_PROGRESS_TIMEOUT_MS + 10_000).contains(&waited)
        );
    }

    #[test]
    fn complete_waits_while_the_host_is_finishing() {
        let rec = Recorder { tick_ms: 1, finishing_reads: RefCell::new(50), ..Default::default() };
        let mut card = Card::probe(&rec).unwrap();
        card.dump_io(u64::MAX, DumpIoType::Body, &[1u8; 3]).unwrap();
        assert_eq!(card.dump_io(u64::MAX, DumpIoType::Complete, &[]), Ok(()));
        assert_eq!(*rec.finishing_reads.borrow(), 0, "it polled through FINISHING");
    }

    #[test]
    fn a_card_that_reads_all_ones_is_gone_at_once() {
        struct Gone;
        impl CardIo for Gone {
            fn read_register(&self, offset: u32) -> u32 {
                match offset {
                    regs::MAGIC => abi::MAGIC_VALUE,
                    regs::VERSION => abi::ABI_VERSION,
                    regs::SLOT_COUNT => 1,
                    regs::SLOT_SIZE => 4,
                    regs::COMPLETED => 0,
                    _ => u32::MAX,
                }
            }
            fn write_register(&self, _: u32, _: u32) {}
            fn write_window(&self, _: usize, _: &[u8]) {}
        }
        let mut card = Card::probe(Gone).unwrap();
        assert_eq!(card.dump_io(0, DumpIoType::Body, &[0u8; 8]), Err(CardError::Gone));
        assert_eq!(card.arm(), Err(CardError::Gone));
    }

    /// A card that can DMA: physical address = virtual + 1 GiB, except every third page from
    /// `origin`, which lies elsewhere (so ranges split there); pages in `no_pa` have none.
    #[derive(Default)]
    struct DmaCard {
        origin: usize,
        regs: RefCell<Vec<(u32, u32)>>,
        window: RefCell<Vec<(usize, Vec<u8>)>>,
        probe_addr: RefCell<u64>,
        /// Pages (by virtual page number) with no physical address.
        no_pa: core::ops::Range<usize>,
        translated: RefCell<Vec<(u64, usize)>>,
        /// The card refuses DMA doorbells as BAD_DMA.
        refuse_dma: bool,
        /// SLOT_SIZE (64 when 0).
        slot_size: u32,
        error: RefCell<u32>,
    }

    impl DmaCard {
        fn pa(&self, va: usize) -> u64 {
            let page = va.wrapping_sub(self.origin) / PAGE_SIZE;
            let base = if page % 3 == 2 { 0x50_0000_0000 } else { 0x4000_0000 };
            (va as u64).wrapping_add(base)
        }
        /// The virtual address the driver translated to `pa` (only the probe is read back).
        fn va(&self, pa: u64) -> usize {
            self.translated.borrow().iter().find(|(p, _)| *p == pa).map_or(0, |t| t.1)
        }
        fn writes(&self, reg: u32) -> Vec<u32> {
            self.regs.borrow().iter().filter(|(r, _)| *r == reg).map(|p| p.1).collect()
        }
    }

    impl CardIo for &DmaCard {
        fn read_register(&self, offset: u32) -> u32 {
            match offset {
                regs::MAGIC => abi::MAGIC_VALUE,
                regs::VERSION => abi::ABI_VERSION,
                regs::CAPABILITIES => cap::ALL,
                regs::SLOT_COUNT => 2,
                regs::SLOT_SIZE if self.slot_size == 0 => 64,
                regs::SLOT_SIZE => self.slot_size,
                regs::COMPLETED => self.writes(regs::DOORBELL).len() as u32,
                regs::STATUS => {
                    let e = *self.error.borrow();
                    let done = self.writes(regs::CHUNK_TYPE).last() == Some(&4);
                    let state = if done { SessionState::Complete } else { SessionState::Streaming };
                    state as u32 | if e != 0 { status::ERROR } else { 0 }
                }
                regs::ERROR => *self.error.borrow(),
                o if (regs::DMA_PROBE_DATA..regs::DMA_PROBE_DATA_END).contains(&o) => {
                    let va = self.va(*self.probe_addr.borrow());
                    assert_ne!(va, 0, "the probe address was not translated by the driver");
                    let va = va + (o - regs::DMA_PROBE_DATA) as usize;
                    // SAFETY: test only: `va` is inside the probe buffer the driver translated.
                    unsafe { core::ptr::read_unaligned(va as *const u32) }
                }
                _ => 0,
            }
        }
        fn write_register(&self, offset: u32, value: u32) {
            match offset {
                regs::DMA_PROBE_ADDR_LO => *self.probe_addr.borrow_mut() |= value as u64,
                regs::DMA_PROBE_ADDR_HI => *self.probe_addr.borrow_mut() |= (value as u64) << 32,
                regs::CONTROL if value == control::CLEAR_ERROR => *self.error.borrow_mut() = 0,
                regs::DOORBELL
                    if self.refuse_dma && self.writes(regs::CHUNK_FLAGS).last() == Some(&1) =>
                {
                    *self.error.borrow_mut() = ErrorCode::BadDma as u32
                }
                _ => {}
            }
            self.regs.borrow_mut().push((offset, value));
        }
        fn write_window(&self, offset: usize, data: &[u8]) {
            self.window.borrow_mut().push((offset, data.to_vec()));
        }
        fn get_physical_address(&self, va: usize) -> u64 {
            if self.no_pa.contains(&(va / PAGE_SIZE)) {
                return 0;
            }
            self.translated.borrow_mut().push((self.pa(va), va));
            self.pa(va)
        }
    }

    /// A page-aligned buffer of `pages` pages.
    #[repr(C, align(4096))]
    struct Pages([u8; 7 * PAGE_SIZE]);

    #[test]
    fn dma_mode_is_proved_then_buffers_go_as_merged_physical_ranges() {
        let buf = Pages([0; 7 * PAGE_SIZE]);
        let fake =
            DmaCard { origin: buf.0.as_ptr() as usize, slot_size: 0x4000, ..Default::default() };
        let mut card = Card::probe(&fake).unwrap();
        let mut probe = DmaProbeBuffer::new();
        assert!(card.prove_dma(&mut probe, 7));
        assert_ne!(probe.0, [0; DMA_PROBE_SIZE]);
        // From the middle of page 0 to the middle of page 6: pages 2 and 5 lie elsewhere.
        let b = &buf.0[0x800..6 * PAGE_SIZE + 0x100];
        card.dump_io(OFFSET_SEQUENTIAL, DumpIoType::Body, b).unwrap();
        let base = b.as_ptr() as usize;
        let ranges: Vec<DmaRange> = fake
            .window
            .borrow()
            .iter()
            .map(|(_, e)| DmaRange::from_bytes(e.as_slice().try_into().unwrap()))
            .collect();
        let lengths: Vec<u32> = ranges.iter().map(|r| r.length).collect();
        // A chunk fills at most a slot (0x4000 here): page 4 is split between two doorbells.
        assert_eq!(lengths, [0x1800, 0x1000, 0x1800, 0x800, 0x1000, 0x100]);
        let mut va = base;
        for r in &ranges {
            assert_eq!(r.address, fake.pa(va), "each range starts where its bytes are");
            va += r.length as usize;
        }
        assert_eq!(fake.writes(regs::CHUNK_RANGES), [3, 3]);
        assert_eq!(fake.writes(regs::CHUNK_LENGTH), [0x4000, 0x1900]);
        assert_eq!(fake.writes(regs::STATUS), [], "STATUS is read, never written");
        assert_eq!(fake.writes(regs::CHUNK_FLAGS), [chunk_flags::DMA]);
        // Copy mode again for a card without DMA... and a complete doorbell clears the flag.
        card.dump_io(OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
        assert_eq!(fake.writes(regs::CHUNK_FLAGS), [chunk_flags::DMA, 0]);
    }

    #[test]
    fn dma_falls_back_to_copy_for_pages_without_an_address_and_for_refusals() {
        let buf = Pages([0; 7 * PAGE_SIZE]);
        let first_page = buf.0.as_ptr() as usize / PAGE_SIZE;
        // Pages 3.. have no physical address: three pages by DMA, the rest copied.
        let fake = DmaCard {
            no_pa: first_page + 3..first_page + 7,
            slot_size: 0x4000,
            ..Default::default()
        };
        let mut card = Card::probe(&fake).unwrap();
        assert!(card.prove_dma(&mut DmaProbeBuffer::new(), 1));
        card.dump_io(0, DumpIoType::Body, &buf.0[..4 * PAGE_SIZE]).unwrap();
        assert_eq!(fake.writes(regs::CHUNK_LENGTH), [0x3000, 0x1000], "one DMA chunk, one copied");
        assert_eq!(fake.writes(regs::CHUNK_FLAGS), [chunk_flags::DMA, 0]);
        assert_eq!(fake.writes(regs::CHUNK_OFFSET_LO)[..2], [0, 0x3000]);
        assert!(card.dma(), "a page without an address does not end DMA mode");
        // A card that refuses DMA doorbells: the chunk is resent by copy, DMA mode ends.
        let fake = DmaCard { refuse_dma: true, ..Default::default() };
        let mut card = Card::probe(&fake).unwrap();
        assert!(card.prove_dma(&mut DmaProbeBuffer::new(), 1));
        card.dump_io(OFFSET_SEQUENTIAL, DumpIoType::Body, &buf.0[..100]).unwrap();
        assert!(!card.dma());
        assert_eq!(fake.writes(regs::CHUNK_LENGTH), [64, 64, 36], "refused by DMA, resent by copy");
        // A card without the capability, or memory with no address, never enters DMA mode.
        let fake = DmaCard { no_pa: 0..usize::MAX, ..Default::default() };
        let mut card = Card::probe(&fake).unwrap();
        assert!(!card.prove_dma(&mut DmaProbeBuffer::new(), 1));
        let rec = Recorder::default();
        assert!(!Card::probe(&rec).unwrap().prove_dma(&mut DmaProbeBuffer::new(), 1));
    }

    #[test]
    fn probe_rejects_other_devices() {
        struct Zero;
        impl CardIo for Zero {
            fn read_register(&self, _: u32) -> u32 {
                0xFFFF_FFFF
            }
            fn write_register(&self, _: u32, _: u32) {}
            fn write_window(&self, _: usize, _: &[u8]) {}
        }
        assert!(matches!(Card::probe(Zero), Err(CardError::NotACard { magic: 0xFFFF_FFFF })));
    }
}
