//! Driving the card: probe, arm, announce, and stream `KBUGCHECK_DUMP_IO` buffers through the
//! data window's slots and the doorbell.

use crashmon_card_abi::{
    self as abi, control, regs, status, DumpIoType, ErrorCode, SessionState, OFFSET_SEQUENTIAL,
};

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
        Ok(Self { io, slot_count, slot_size, rung: completed, completed })
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
            self.describe(0, 0, kind, 0);
            self.ring();
            return self.check_complete();
        }
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
