//! The `card` target: a hostile guest drives a real [`CrashMonitorCard`] (real writer threads,
//! real files in a tmpfs folder), and a model of what the card accepted says what must be on
//! disk once the writers are joined.
//!
//! The input is a size byte then a list of operations ([`Op`]). Invariants, checked on every
//! input:
//! * nothing panics (a writer's panic is caught by the card, so its sidecar goes missing: that
//!   is caught below as a missing session);
//! * `COMPLETED` never runs ahead of the doorbells rung since the last reset, never goes back
//!   within one, and equals them once every slot is free again;
//! * every session the card opened that carried bytes ends as one dump and one sidecar (one
//!   that carried none leaves no file); every sidecar parses; the
//!   dump is complete exactly when its `Complete` doorbell was accepted;
//! * no file is larger than the maximum dump size, none is written outside the output folder,
//!   no `.partial` or temporary file is left once the writers are joined;
//! * every byte of every accepted chunk is in its dump at its offset (later chunks over earlier
//!   ones; bytes the guest changed while the writer still owned their slot may be either),
//!   bytes no chunk wrote are zero, and the sidecar's `size`, `bytes_received` and `chunks`
//!   agree with the model;
//! * DMA mode: a DMA probe reads exactly the guest memory the model holds, or is refused when
//!   that memory is not mapped; an accepted DMA chunk named only mapped guest memory, with
//!   lengths that add up to at most a slot, and its bytes in the file are guest memory as it
//!   was at the doorbell, whatever the guest does to its RAM afterwards (the card reads it
//!   into the slot as the doorbell rings; changes to the slot while it is owned may be either).

use crate::Input;
use crashmon_card_abi::{
    self as abi, chunk_flags, control, regs, DmaRange, DumpIoType, ErrorCode, SLOT_COUNT, SLOT_SIZE,
};
use crashmon_device_model::capture::{CaptureConfig, DumpState, Sidecar};
use crashmon_device_model::card::CrashMonitorCard;
use crashmon_device_model::data_window::DataWindow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the fuzzed guest's RAM sits (guest-physical), and how much of it there is: small, so
/// that offsets from the input reach past it.
const GUEST_BASE: u64 = 0x10_0000;
const GUEST_SIZE: usize = 0x10000;

/// Sessions per input at most: the card keeps what the last 16 writers left
/// (`FINISHED_KEPT`), which is how the model finds each session's files.
const MAX_SESSIONS: u64 = 16;
/// Operations per input at most.
const MAX_OPS: usize = 256;
/// The maximum dump sizes an input can pick: small, so a chunk can reach past them.
const MAX_SIZES: [u64; 4] = [4096, 16384, 65536, 1 << 20];
/// Widths of the generic accesses.
const WIDTHS: [usize; 8] = [4, 8, 0, 1, 2, 3, 5, 16];
/// Registers the `Reg` operation writes.
const REGS: [u32; 16] = [
    regs::CONTROL,
    regs::BUGCHECK_CODE,
    regs::BUGCHECK_PARAM1_LO,
    regs::BUGCHECK_PARAM1_HI,
    regs::BUGCHECK_PARAM2_LO,
    regs::BUGCHECK_PARAM4_HI,
    regs::CHUNK_OFFSET_LO,
    regs::CHUNK_OFFSET_HI,
    regs::CHUNK_LENGTH,
    regs::CHUNK_TYPE,
    regs::CHUNK_SLOT,
    regs::DOORBELL,
    regs::MAGIC,
    regs::STATUS,
    regs::COMPLETED,
    regs::BYTES_WRITTEN_LO,
];

/// One thing the guest (or the bus) does.
#[derive(Clone, Debug)]
pub enum Op {
    /// A BAR0 read: `offset` (bit 15: far outside BAR0), width index into `WIDTHS`.
    Read { offset: u16, width: u8 },
    /// A BAR0 write of the low bytes of `value`.
    Write { offset: u16, width: u8, value: u64 },
    /// A 4-byte write of a register of `REGS`.
    Reg { reg: u8, value: u32 },
    /// The whole descriptor, then the doorbell. `flags`: 1 sequential offset, 2 offset near
    /// `u64::MAX`, 4 a length past the slot.
    Chunk { slot: u8, len: u16, kind: u8, flags: u8, offset: u16 },
    /// The guest stores `len` bytes of a pattern from `seed` at `at` in `slot`.
    Fill { slot: u8, at: u32, len: u16, seed: u8 },
    /// A CONTROL write of `value` (low 5 bits are commands, the rest invalid).
    Control { value: u8 },
    /// `DEVICE_RESET` from QEMU.
    BusReset,
    /// QEMU went away.
    Disconnect,
    /// The guest waits until every slot is free again.
    Wait,
    /// The complete doorbell.
    Complete,
    /// A DMA chunk: up to four ranges at `GUEST_BASE + at` (bit 15 of `at`: far outside guest
    /// memory), then the descriptor and the doorbell. `flags`: 1 sequential offset, 2 a length
    /// off by one, 4 a range count off by one, 8 a reserved bit set in the first entry, 16 an
    /// undefined `CHUNK_FLAGS` bit.
    DmaChunk { slot: u8, kind: u8, flags: u8, offset: u16, ranges: Vec<(u16, u16)> },
    /// The guest stores `len` bytes of a pattern at `GUEST_BASE + at` in its RAM.
    GuestWrite { at: u16, len: u16, seed: u8 },
    /// The driver's DMA probe at `GUEST_BASE + at` (bit 15: far outside guest memory).
    DmaProbe { at: u16 },
    /// QEMU unmaps all guest memory (`remap` false) or maps it again.
    DmaMap { remap: bool },
}

impl Op {
    const COUNT: u8 = 14;

    fn decode(i: &mut Input) -> Op {
        match i.u8() % Self::COUNT {
            0 => Op::Read { offset: i.u16(), width: i.u8() },
            1 => Op::Write { offset: i.u16(), width: i.u8(), value: i.u64() },
            2 => Op::Reg { reg: i.u8(), value: i.u32() },
            3 => Op::Chunk {
                slot: i.u8(),
                len: i.u16(),
                kind: i.u8(),
                flags: i.u8(),
                offset: i.u16(),
            },
            4 => Op::Fill { slot: i.u8(), at: i.u32(), len: i.u16(), seed: i.u8() },
            5 => Op::Control { value: i.u8() },
            6 => Op::BusReset,
            7 => Op::Disconnect,
            8 => Op::Wait,
            9 => Op::Complete,
            10 => {
                let (slot, kind, flags, offset) = (i.u8(), i.u8(), i.u8(), i.u16());
                let n = i.u8() % 5;
                let ranges = (0..n).map(|_| (i.u16(), i.u16())).collect();
                Op::DmaChunk { slot, kind, flags, offset, ranges }
            }
            11 => Op::GuestWrite { at: i.u16(), len: i.u16(), seed: i.u8() },
            12 => Op::DmaProbe { at: i.u16() },
            _ => Op::DmaMap { remap: i.u8() & 1 != 0 },
        }
    }

    /// The bytes that decode to this operation.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Read { offset, width } => {
                out.push(0);
                out.extend(offset.to_le_bytes());
                out.push(width);
            }
            Op::Write { offset, width, value } => {
                out.push(1);
                out.extend(offset.to_le_bytes());
                out.push(width);
                out.extend(value.to_le_bytes());
            }
            Op::Reg { reg, value } => {
                out.push(2);
                out.push(reg);
                out.extend(value.to_le_bytes());
            }
            Op::Chunk { slot, len, kind, flags, offset } => {
                out.extend([3, slot]);
                out.extend(len.to_le_bytes());
                out.extend([kind, flags]);
                out.extend(offset.to_le_bytes());
            }
            Op::Fill { slot, at, len, seed } => {
                out.extend([4, slot]);
                out.extend(at.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push(seed);
            }
            Op::Control { value } => out.extend([5, value]),
            Op::BusReset => out.push(6),
            Op::Disconnect => out.push(7),
            Op::Wait => out.push(8),
            Op::Complete => out.push(9),
            Op::DmaChunk { slot, kind, flags, offset, ref ranges } => {
                out.extend([10, slot, kind, flags]);
                out.extend(offset.to_le_bytes());
                out.push(ranges.len() as u8);
                for (at, len) in ranges {
                    out.extend(at.to_le_bytes());
                    out.extend(len.to_le_bytes());
                }
            }
            Op::GuestWrite { at, len, seed } => {
                out.push(11);
                out.extend(at.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push(seed);
            }
            Op::DmaProbe { at } => {
                out.push(12);
                out.extend(at.to_le_bytes());
            }
            Op::DmaMap { remap } => out.extend([13, remap as u8]),
        }
    }
}

/// An input: the maximum-size index, then the operations.
pub fn encode(max_size: u8, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![max_size];
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// One session as the model sees it.
///
/// The model's bytes are plain bytes (a hole is a zero, as in the file) plus a list of ranges
/// whose value is unknown, so that recording a chunk and checking a file are `memcpy` and
/// `memcmp`: a byte-by-byte model spent most of the fuzzer's time in its own comparisons.
struct ModelSession {
    bytes: Vec<u8>,
    /// Ranges the guest changed while the writer still owned their slot: either value is right.
    unknown: Vec<(usize, usize)>,
    size: u64,
    /// Where a sequential chunk goes: the end of the last accepted one.
    cursor: u64,
    received: u64,
    chunks: u64,
    complete: bool,
}

/// An accepted chunk whose slot may still be owned by its writer.
#[derive(Clone, Copy)]
struct InFlight {
    session: usize,
    start: u64,
    len: usize,
}

impl ModelSession {
    /// A chunk just set `lo..hi`: no byte in it is unknown any more.
    fn known(&mut self, lo: usize, hi: usize) {
        let mut left = Vec::with_capacity(self.unknown.len());
        for &(a, b) in &self.unknown {
            if a < lo.min(b) {
                left.push((a, lo.min(b)));
            }
            if hi.max(a) < b {
                left.push((hi.max(a), b));
            }
        }
        self.unknown = left;
    }
}

struct Harness {
    card: CrashMonitorCard,
    max: u64,
    sessions: Vec<ModelSession>,
    /// Doorbells rung since the last reset, and the last COMPLETED read since then.
    rung: u32,
    completed: u32,
    /// The last accepted chunk of each slot.
    in_flight: [Option<InFlight>; SLOT_COUNT as usize],
    /// The guest's RAM: the file the card reads by DMA, and the model's copy of it.
    guest: File,
    guest_model: Vec<u8>,
    /// Whether QEMU has the guest's RAM mapped for the card.
    mapped: bool,
}

fn fill_pattern(seed: u8, i: usize) -> u8 {
    seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8
}

impl Harness {
    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.card.read(offset, &mut buf);
        buf
    }

    fn r(&mut self, reg: u32) -> u32 {
        let b = self.read(reg as u64, 4);
        u32::from_le_bytes(b.try_into().unwrap())
    }

    /// Every BAR0 write goes through here, so that the model sees resets and doorbells however
    /// the guest spells them.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 4 && offset == regs::DOORBELL as u64 {
            return self.ring();
        }
        self.card.write(offset, data);
        if data.len() == 4 && offset == regs::CONTROL as u64 {
            let v = u32::from_le_bytes(data.try_into().unwrap());
            if v & !control::ALL == 0 && v & control::RESET != 0 {
                self.reset_model();
            }
        }
        self.note_sessions();
    }

    fn reset_model(&mut self) {
        self.rung = 0;
        self.completed = 0;
    }

    /// Sessions the card opened since the last look.
    fn note_sessions(&mut self) {
        while (self.sessions.len() as u64) < self.card.sessions_opened() {
            self.sessions.push(ModelSession {
                // Grown as chunks land (a session at the 1 MiB maximum allocated up front
                // made page faults a sixth of the fuzzer's time).
                bytes: Vec::new(),
                unknown: Vec::new(),
                size: 0,
                cursor: 0,
                received: 0,
                chunks: 0,
                complete: false,
            });
        }
    }

    /// The doorbell, with the ERROR register cleared first so that its value afterwards says
    /// whether this doorbell was accepted (clearing has no other effect).
    fn ring(&mut self) {
        self.card.write(regs::CONTROL as u64, &control::CLEAR_ERROR.to_le_bytes());
        let offset =
            u64::from_le_bytes(self.read(regs::CHUNK_OFFSET_LO as u64, 8).try_into().unwrap());
        let len = self.r(regs::CHUNK_LENGTH) as usize;
        let kind = DumpIoType::from_u32(self.r(regs::CHUNK_TYPE));
        let slot = self.r(regs::CHUNK_SLOT);
        let flags = self.r(regs::CHUNK_FLAGS);
        let count = self.r(regs::CHUNK_RANGES);
        let dma = flags & chunk_flags::DMA != 0;
        // What the slot holds now: the writer copies it later, but a guest that keeps its hands
        // off an owned slot gets exactly these bytes (see `fill`). In DMA mode, the guest
        // memory the slot's list names, if the list is one the card may accept.
        let snapshot = if flags & !chunk_flags::ALL != 0 {
            None // an undefined flag: refused
        } else if dma {
            self.dma_snapshot(slot, len, count)
        } else {
            (slot < SLOT_COUNT && len <= SLOT_SIZE as usize).then(|| {
                let mut b = vec![0u8; len];
                self.card.window().read(slot as u64 * SLOT_SIZE as u64, &mut b).unwrap();
                b
            })
        };
        let before = self.card.sessions_opened();
        self.card.write(regs::DOORBELL as u64, &1u32.to_le_bytes());
        self.rung += 1;
        self.note_sessions();
        let error = self.r(regs::ERROR);
        assert_ne!(error, ErrorCode::HostIo as u32, "HOST_IO on tmpfs");
        if error != ErrorCode::None as u32 {
            assert_eq!(self.card.sessions_opened(), before, "a refused doorbell opened a session");
            return;
        }
        let session = self.sessions.len().checked_sub(1).expect("accepted with no session");
        match kind {
            Some(DumpIoType::Complete) => {
                assert_eq!(len, 0, "a complete doorbell with a length was accepted");
                self.sessions[session].complete = true;
            }
            Some(DumpIoType::Header | DumpIoType::Body | DumpIoType::SecondaryData) => {
                let data =
                    snapshot.expect("a chunk outside the window or guest memory was accepted");
                assert!(len > 0);
                let s = &mut self.sessions[session];
                let start = if offset == abi::OFFSET_SEQUENTIAL { s.cursor } else { offset };
                let end = start + len as u64;
                assert!(end <= self.max, "a chunk past the maximum size was accepted");
                let (lo, hi) = (start as usize, end as usize);
                if s.bytes.len() < hi {
                    s.bytes.resize(hi, 0);
                }
                s.bytes[lo..hi].copy_from_slice(&data);
                s.known(lo, hi);
                s.size = s.size.max(end);
                s.cursor = end;
                s.received += len as u64;
                s.chunks += 1;
                self.in_flight[slot as usize] = Some(InFlight { session, start, len });
            }
            _ => panic!("a doorbell of type {kind:?} was accepted"),
        }
    }

    /// The bytes a DMA chunk of `len` bytes described by slot `slot` would carry, if its list
    /// is valid: every entry non-empty with no reserved bit, inside mapped guest memory, the
    /// lengths adding up to `len`. `None` for a list the card must refuse.
    fn dma_snapshot(&self, slot: u32, len: usize, count: u32) -> Option<Vec<u8>> {
        if slot >= SLOT_COUNT
            || len > SLOT_SIZE as usize
            || count == 0
            || count > abi::MAX_DMA_RANGES
            || !self.mapped
        {
            return None;
        }
        let mut list = vec![0u8; count as usize * DmaRange::SIZE];
        self.card.window().read(slot as u64 * SLOT_SIZE as u64, &mut list)?;
        let mut bytes = Vec::new();
        for e in list.chunks_exact(DmaRange::SIZE) {
            let r = DmaRange::from_bytes(e.try_into().ok()?);
            let at = r.address.checked_sub(GUEST_BASE)? as usize;
            let end = at.checked_add(r.length as usize)?;
            if r.length == 0 || r.reserved != 0 || end > GUEST_SIZE {
                return None;
            }
            bytes.extend_from_slice(&self.guest_model[at..end]);
        }
        (bytes.len() == len).then_some(bytes)
    }

    fn fill(&mut self, slot: u8, at: u32, len: u16, seed: u8) {
        let slot = slot as u32 % SLOT_COUNT;
        let at = at % SLOT_SIZE;
        let len = (len as u32).min(SLOT_SIZE - at) as usize;
        let data: Vec<u8> = (0..len).map(|i| fill_pattern(seed, i)).collect();
        self.store_slot(slot, at, &data);
    }

    /// The guest stores `data` at `at` in `slot` (both in range).
    fn store_slot(&mut self, slot: u32, at: u32, data: &[u8]) {
        let len = data.len();
        if self.card.window().is_owned(slot) {
            // The writer may copy the old bytes or the new ones (or a mix): a guest that does
            // this only spoils its own dump. (A DMA chunk's bytes are in its slot too: the card
            // read them there as the doorbell rang.)
            if let Some(f) = self.in_flight[slot as usize] {
                let lo = f.start as usize + (at as usize).min(f.len);
                let hi = f.start as usize + (at as usize + len).min(f.len);
                if lo < hi {
                    self.sessions[f.session].unknown.push((lo, hi));
                }
            }
        }
        self.card.window().write(slot as u64 * SLOT_SIZE as u64 + at as u64, data).unwrap();
    }

    fn dma_chunk(&mut self, slot: u8, kind: u8, flags: u8, offset: u16, ranges: &[(u16, u16)]) {
        let slot = slot as u32 % 6;
        let mut list = Vec::new();
        let mut total = 0u32;
        for (i, &(at, len)) in ranges.iter().enumerate() {
            let address = if at & 0x8000 != 0 && flags & 32 != 0 {
                (at as u64) << 32
            } else {
                GUEST_BASE + at as u64
            };
            let reserved = u32::from(i == 0 && flags & 8 != 0);
            list.extend(DmaRange { address, length: len as u32, reserved }.to_bytes());
            total += len as u32;
        }
        if slot < SLOT_COUNT {
            self.store_slot(slot, 0, &list);
        }
        let offset = if flags & 1 != 0 { abi::OFFSET_SEQUENTIAL } else { offset as u64 };
        let chunk_flags = chunk_flags::DMA | if flags & 16 != 0 { 1 << 7 } else { 0 };
        self.write(regs::CHUNK_OFFSET_LO as u64, &offset.to_le_bytes());
        self.write(regs::CHUNK_LENGTH as u64, &(total + u32::from(flags & 2 != 0)).to_le_bytes());
        let count = ranges.len() as u32 + u32::from(flags & 4 != 0);
        self.write(regs::CHUNK_RANGES as u64, &count.to_le_bytes());
        self.write(regs::CHUNK_FLAGS as u64, &chunk_flags.to_le_bytes());
        self.write(regs::CHUNK_TYPE as u64, &(kind as u32 % 6).to_le_bytes());
        self.write(regs::CHUNK_SLOT as u64, &slot.to_le_bytes());
        self.ring();
    }

    /// The guest changes its own RAM: DMA chunks already accepted keep the bytes the card read
    /// at their doorbells.
    fn guest_write(&mut self, at: u16, len: u16, seed: u8) {
        let at = at as usize % GUEST_SIZE;
        let len = (len as usize).min(GUEST_SIZE - at);
        let data: Vec<u8> = (0..len).map(|i| fill_pattern(seed, i)).collect();
        self.guest.write_all_at(&data, at as u64).unwrap();
        self.guest_model[at..at + len].copy_from_slice(&data);
    }

    fn dma_probe(&mut self, at: u16) {
        let address = if at & 0x8000 != 0 { (at as u64) << 32 } else { GUEST_BASE + at as u64 };
        self.write(regs::DMA_PROBE_ADDR_LO as u64, &address.to_le_bytes());
        self.card.write(regs::CONTROL as u64, &control::CLEAR_ERROR.to_le_bytes());
        self.card.write(regs::CONTROL as u64, &control::DMA_PROBE.to_le_bytes());
        let error = self.r(regs::ERROR);
        let read: Vec<u8> = (0..abi::DMA_PROBE_SIZE as u32 / 4)
            .flat_map(|i| self.r(regs::DMA_PROBE_DATA + 4 * i).to_le_bytes())
            .collect();
        let at = address.wrapping_sub(GUEST_BASE) as usize;
        if self.mapped && address >= GUEST_BASE && at + abi::DMA_PROBE_SIZE <= GUEST_SIZE {
            assert_eq!(error, ErrorCode::None as u32, "a probe of mapped memory was refused");
            assert_eq!(read, self.guest_model[at..at + abi::DMA_PROBE_SIZE], "probe data");
        } else {
            assert_eq!(error, ErrorCode::BadDma as u32, "a probe of unmapped memory");
            assert!(read.iter().all(|b| *b == 0), "a refused probe left data");
        }
    }

    fn dma_map(&mut self, remap: bool) {
        if remap && !self.mapped {
            let file = self.guest.try_clone().unwrap();
            self.card.dma_map(GUEST_BASE, GUEST_SIZE as u64, 0, Some(file), true).unwrap();
            self.mapped = true;
        } else if !remap {
            self.card.dma_unmap(0, 0, true).unwrap();
            self.mapped = false;
        }
    }

    /// Waits until every writer has released its slot.
    fn wait_slots(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while (0..SLOT_COUNT).any(|s| self.card.window().is_owned(s)) {
            assert!(Instant::now() < deadline, "a writer never released its slot");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// COMPLETED against the doorbells rung.
    fn check_completed(&mut self, all_done: bool) {
        let completed = self.r(regs::COMPLETED);
        assert!(completed <= self.rung, "COMPLETED {completed} ahead of {} doorbells", self.rung);
        assert!(
            completed >= self.completed,
            "COMPLETED went back: {} then {completed}",
            self.completed
        );
        if all_done {
            assert_eq!(completed, self.rung, "every slot is free but COMPLETED lags");
        }
        self.completed = completed;
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Read { offset, width } => {
                let len = WIDTHS[width as usize % WIDTHS.len()];
                let _ = self.read(bar0_offset(offset), len);
            }
            Op::Write { offset, width, value } => {
                let len = WIDTHS[width as usize % WIDTHS.len()];
                let mut data = value.to_le_bytes().to_vec();
                data.resize(len, 0xA5);
                self.write(bar0_offset(offset), &data);
            }
            Op::Reg { reg, value } => {
                let reg = REGS[reg as usize % REGS.len()];
                self.write(reg as u64, &value.to_le_bytes());
            }
            Op::Chunk { slot, len, kind, flags, offset } => {
                let offset = match flags & 3 {
                    1 | 3 => abi::OFFSET_SEQUENTIAL,
                    2 => u64::MAX - 1 - offset as u64,
                    _ => offset as u64,
                };
                let len = len as u32 | if flags & 4 != 0 { SLOT_SIZE } else { 0 };
                self.write(regs::CHUNK_FLAGS as u64, &0u32.to_le_bytes());
                self.write(regs::CHUNK_OFFSET_LO as u64, &offset.to_le_bytes());
                self.write(regs::CHUNK_LENGTH as u64, &len.to_le_bytes());
                self.write(regs::CHUNK_TYPE as u64, &(kind as u32 % 6).to_le_bytes());
                self.write(regs::CHUNK_SLOT as u64, &(slot as u32 % 6).to_le_bytes());
                self.ring();
            }
            Op::Fill { slot, at, len, seed } => self.fill(slot, at, len, seed),
            Op::Control { value } => {
                self.write(regs::CONTROL as u64, &(value as u32).to_le_bytes())
            }
            Op::BusReset => {
                self.card.bus_reset();
                self.reset_model();
            }
            Op::Disconnect => {
                self.card.disconnect();
                self.reset_model();
                self.mapped = false; // the next client brings its own mappings
            }
            Op::DmaChunk { slot, kind, flags, offset, ref ranges } => {
                self.dma_chunk(slot, kind, flags, offset, ranges)
            }
            Op::GuestWrite { at, len, seed } => self.guest_write(at, len, seed),
            Op::DmaProbe { at } => self.dma_probe(at),
            Op::DmaMap { remap } => self.dma_map(remap),
            Op::Wait => self.wait_slots(),
            Op::Complete => {
                self.write(regs::CHUNK_LENGTH as u64, &0u32.to_le_bytes());
                self.write(regs::CHUNK_TYPE as u64, &(DumpIoType::Complete as u32).to_le_bytes());
                self.ring();
            }
        }
        self.check_completed(matches!(op, Op::Wait));
    }
}

fn bar0_offset(offset: u16) -> u64 {
    if offset & 0x8000 != 0 {
        (offset as u64) << 32
    } else {
        offset as u64 & 0xFFF
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let root = crate::scratch_root("card");
    let out = root.join("out");
    crate::fresh_dir(&out);
    let mut input = Input::new(data);
    let max = MAX_SIZES[input.u8() as usize % MAX_SIZES.len()];
    // No disk limits (each input is its own small folder); the card's own bounds still hold.
    let config =
        CaptureConfig { limits: crate::NO_LIMITS, ..CaptureConfig::new(&out, "fuzz", max) };
    let window = DataWindow::new().expect("memfd");
    // The guest's RAM, on tmpfs like QEMU's memfd, mapped for the card as QEMU would.
    let guest_model: Vec<u8> = (0..GUEST_SIZE).map(|i| fill_pattern(0x5A, i)).collect();
    let guest = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(root.join("guest-ram"))
        .expect("the guest's RAM file");
    guest.write_all_at(&guest_model, 0).unwrap();
    let mut h = Harness {
        card: CrashMonitorCard::new(config, window),
        max,
        sessions: Vec::new(),
        rung: 0,
        completed: 0,
        in_flight: [None; SLOT_COUNT as usize],
        guest,
        guest_model,
        mapped: false,
    };
    h.dma_map(true);
    for _ in 0..MAX_OPS {
        if input.is_empty() || h.card.sessions_opened() >= MAX_SESSIONS {
            break;
        }
        let op = Op::decode(&mut input);
        h.apply(&op);
    }
    // The VM goes away; every writer is joined.
    h.card.disconnect();
    let finished = h.card.wait_writers();
    h.wait_slots();
    check_disk(&root, &out, max, &h.sessions, &finished);
}

fn check_disk(
    root: &Path,
    out: &Path,
    max: u64,
    model: &[ModelSession],
    finished: &[crashmon_device_model::capture::Finished],
) {
    assert_eq!(crate::names(root), ["guest-ram", "out"], "a file outside the output folder");
    let names = crate::names(out);
    for name in &names {
        assert!(
            name.ends_with(".dmp") || name.ends_with(".json"),
            "{name} left once every writer ended"
        );
        let len = std::fs::metadata(out.join(name)).unwrap().len();
        if name.ends_with(".dmp") {
            assert!(len <= max, "{name}: {len} bytes, past the maximum {max}");
        } else {
            let sc: Sidecar = serde_json::from_slice(&std::fs::read(out.join(name)).unwrap())
                .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
            assert!(sc.state != DumpState::Streaming, "{name} still says streaming");
        }
    }
    // A session that carried no dump byte leaves no file at all.
    let kept: Vec<&ModelSession> = model.iter().filter(|m| m.received > 0).collect();
    assert_eq!(
        names.len(),
        2 * kept.len(),
        "one dump and one sidecar per session with bytes: {names:?}"
    );
    assert_eq!(finished.len(), kept.len(), "a session's writer left nothing");
    for (m, f) in kept.into_iter().zip(finished) {
        let on_disk: Sidecar =
            serde_json::from_slice(&std::fs::read(&f.sidecar_path).unwrap()).unwrap();
        assert_eq!(on_disk, f.sidecar, "the sidecar on disk is not the final one");
        let sc = &f.sidecar;
        assert_eq!(sc.state == DumpState::Complete, m.complete, "state of {}", sc.dump_file);
        assert_eq!(
            (sc.size, sc.bytes_received, sc.chunks, sc.write_errors),
            (m.size, m.received, m.chunks, 0),
            "sidecar of {} against the model",
            sc.dump_file
        );
        let file = std::fs::read(&f.dump_path).unwrap();
        assert_eq!(file.len() as u64, m.size, "{}: file length", sc.dump_file);
        assert_eq!(m.bytes.len() as u64, m.size, "the model's length");
        let mut want = m.bytes.clone();
        for &(lo, hi) in &m.unknown {
            want[lo..hi].copy_from_slice(&file[lo..hi]);
        }
        if file != want {
            let at = file.iter().zip(&want).position(|(a, b)| a != b).unwrap_or_default();
            panic!(
                "{}: byte {at:#x} is {:#x}, the model says {:#x}",
                sc.dump_file, file[at], want[at]
            );
        }
    }
}
