//! # The crashmon crash-monitor card: datasheet
//!
//! This crate is the single source of truth for the card's register ABI. The host device model
//! (`device-model/`) and the guest driver (`guest-driver/`) both build against it, the way QEMU's
//! pvpanic device and the Linux pvpanic driver share one header. It is `#![no_std]` and holds no
//! code that runs on the bug-check path other than constant lookups.
//!
//! ## Why the card exists
//! When Windows bug checks it hands every piece of its crash dump to each registered
//! `KbCallbackDumpIo` callback as a `KBUGCHECK_DUMP_IO` (Offset, Buffer, BufferLength, Type), "to
//! allow system crash dump data to be written to devices other than the disk". The card is that
//! other device: the callback copies each buffer into the card's data window (or, in
//! [DMA mode](#dma-mode), describes where it lies in memory) and rings a doorbell, and the host
//! turns the stream back into the dump file Windows would have written.
//!
//! ## PCI identity
//! | field | value |
//! |---|---|
//! | vendor / device | [`PCI_VENDOR_ID`] / [`PCI_DEVICE_ID`] |
//! | subsystem vendor / subsystem | [`PCI_SUBSYSTEM_VENDOR_ID`] / [`PCI_SUBSYSTEM_ID`] |
//! | class / subclass / prog-if | [`PCI_CLASS_CODE`] / [`PCI_SUBCLASS`] / [`PCI_PROG_IF`] (base system peripheral, other: the class pvpanic uses, and "System" in an INF) |
//! | revision | [`PCI_REVISION`] |
//! | interrupts | none: the pin register reads 0. The card is driven during a bug check, with interrupts disabled, so the driver polls. |
//!
//! ## BARs
//! | BAR | type | size | contents |
//! |---|---|---|---|
//! | BAR0 | 32-bit memory, non-prefetchable | [`BAR0_SIZE`] | the register file below; every access traps to the host |
//! | BAR2 (+BAR3) | 64-bit memory, prefetchable | [`BAR2_SIZE`] | the data window: [`SLOT_COUNT`] slots of [`SLOT_SIZE`] bytes, plain shared memory (no trap) |
//!
//! The data window is host memory shared with the hypervisor and mapped straight into the guest,
//! so the guest's stores into a slot cost no exit; only the doorbell write traps. Several slots let
//! the guest fill one slot while the host drains another.
//!
//! ## Register file (BAR0)
//! Every register is 32 bits wide and little endian. Access them with aligned 32-bit reads and
//! writes (`READ_REGISTER_ULONG` / `WRITE_REGISTER_ULONG`). A 64-bit value is a `_LO`/`_HI` pair;
//! an aligned 64-bit access to the `_LO` register is also accepted and acts as `_LO` then `_HI`.
//! Any other access (wrong width, unaligned, a write to a read-only register, an offset that names
//! no register) is ignored, reads as 0, and latches [`ErrorCode::BadAccess`].
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | [`regs::MAGIC`] | RO | [`MAGIC_VALUE`], "CMON" |
//! | 0x04 | [`regs::VERSION`] | RO | ABI version, [`ABI_VERSION`] (major << 16 \| minor) |
//! | 0x08 | [`regs::CAPABILITIES`] | RO | [`cap`] bits |
//! | 0x0C | [`regs::SLOT_COUNT`] | RO | number of slots in the data window |
//! | 0x10 | [`regs::SLOT_SIZE`] | RO | bytes per slot, the largest chunk |
//! | 0x18 | [`regs::MAX_DUMP_SIZE_LO`] / `_HI` | RO | the host's limit on a dump's size; a chunk ending past it is refused |
//! | 0x20 | [`regs::CONTROL`] | WO | [`control`] commands, acted on in bit order |
//! | 0x24 | [`regs::STATUS`] | RO | [`status`]: session state in bits 0..3, `READY`, `ERROR` |
//! | 0x28 | [`regs::ERROR`] | RO | [`ErrorCode`] of the first refused command since the error was last cleared |
//! | 0x2C | [`regs::COMPLETED`] | RO | doorbells the card has finished with, in order, since reset (wrapping): an accepted chunk is finished once its bytes are in the dump file |
//! | 0x30 | [`regs::BUGCHECK_CODE`] | RW | bug-check code for `ANNOUNCE` |
//! | 0x38..0x58 | [`regs::BUGCHECK_PARAM1_LO`] ... `PARAM4_HI` | RW | the four bug-check parameters for `ANNOUNCE` |
//! | 0x60 | [`regs::CHUNK_OFFSET_LO`] / `_HI` | RW | file offset of the chunk; all ones ([`OFFSET_SEQUENTIAL`], Windows' -1) appends |
//! | 0x68 | [`regs::CHUNK_LENGTH`] | RW | bytes in the slot, 1..=`SLOT_SIZE` (0 for `KbDumpIoComplete`) |
//! | 0x6C | [`regs::CHUNK_TYPE`] | RW | a [`DumpIoType`] (`KBUGCHECK_DUMP_IO_TYPE`) |
//! | 0x70 | [`regs::CHUNK_SLOT`] | RW | which slot holds the bytes |
//! | 0x74 | [`regs::DOORBELL`] | WO | any write submits the chunk described above |
//! | 0x78 | [`regs::BYTES_WRITTEN_LO`] / `_HI` | RO | payload bytes of this session the host has written into the dump file |
//! | 0x80 | [`regs::HOST_CLOCK_MS`] | RO | the host's monotonic clock in milliseconds (wrapping): what the driver measures "no progress for a long time" with |
//! | 0x84 | [`regs::CHUNK_FLAGS`] | RW | [`chunk_flags`]: with `DMA`, the slot holds a scatter list, not the bytes (see [DMA mode](#dma-mode)) |
//! | 0x88 | [`regs::CHUNK_RANGES`] | RW | DMA mode: how many [`DmaRange`] entries the slot holds, 1..=[`MAX_DMA_RANGES`] |
//! | 0x90 | [`regs::DMA_PROBE_ADDR_LO`] / `_HI` | RW | guest-physical address `CONTROL.DMA_PROBE` reads [`DMA_PROBE_SIZE`] bytes from |
//! | 0x100..0x140 | [`regs::DMA_PROBE_DATA`] | RO | the bytes the last `DMA_PROBE` read (zeros if it failed), in memory order |
//!
//! ## Sessions
//! A session is one crash: one dump file and one sidecar on the host. Its state is in
//! `STATUS & STATE_MASK`, a [`SessionState`]:
//!
//! ```text
//!            RESET (from any state; an open session is kept on the host as incomplete)
//!              v
//!   +-------> IDLE --ARM--> ARMED --ANNOUNCE--> BUGCHECK_ANNOUNCED
//!   |                         |                        |
//!   |                      DOORBELL                 DOORBELL
//!   |                         v                        v
//!   |                      STREAMING <-----------------+
//!   |                       |     |
//!   |   DOORBELL(KbDumpIoComplete)  ABORT (or a reset, or the VM going away)
//!   |                       v     |
//!   |                   FINISHING |  (the host makes the file durable: fsync, rename)
//!   |                       v     v
//!   +--------ARM-------- COMPLETE  ABORTED ---ARM---> ARMED
//! ```
//!
//! * `ARM` readies the card for a crash: the driver does it when it starts. It is accepted in
//!   `IDLE`, `ARMED`, `FINISHING`, `COMPLETE` and `ABORTED` and clears a latched error (a
//!   finishing session goes on being made durable).
//! * `ANNOUNCE` tells the host of the crash before the first dump byte, with the code and
//!   parameters in `BUGCHECK_*`. It opens the session (the host creates the file and sidecar).
//!   It is optional: the first doorbell opens the session too, and the host then reads the code
//!   and parameters from the dump's own `DUMP_HEADER64` if the header is there.
//! * Each `DOORBELL` hands the host one chunk: `CHUNK_LENGTH` bytes from slot `CHUNK_SLOT`, to be
//!   placed at `CHUNK_OFFSET` in the dump file (or after the previous chunk when the offset is
//!   [`OFFSET_SEQUENTIAL`]). Chunks may arrive in any order and may overlap; the last write wins,
//!   as on a disk. A `KbDumpIoComplete` doorbell (length 0) closes the session: the card answers
//!   at once and shows `FINISHING` while the host writes what is still queued, fsyncs the file
//!   and gives it its final name; then `COMPLETE`. If the host cannot make the file durable the
//!   session ends `ABORTED` with [`ErrorCode::HostIo`] latched. A reset or the VM going away
//!   while `FINISHING` does not stop the host from finishing the dump as complete.
//! * `ABORT` closes an open session as incomplete and is a no-op otherwise. The driver's legacy
//!   BugCheckCallback uses it to leave the card in a known final state after the dump.
//!
//! ## Flow control
//! The card never waits for the host's disk: a doorbell hands its slot to the host's writer and
//! is answered at once (a DMA doorbell first reads its ranges of guest memory into the slot),
//! and every register read is answered from memory. The slot belongs to the
//! host until its bytes are in the dump file; then `COMPLETED` advances past that doorbell and
//! the guest may fill the slot again. `COMPLETED` counts doorbells finished *in order* (it never
//! passes a doorbell whose slot the host still owns), so with `n` doorbells rung, slot
//! `n % SLOT_COUNT` is free once `COMPLETED >= n + 1 - SLOT_COUNT`. A doorbell that names a slot
//! the host still owns is refused with [`ErrorCode::SlotBusy`] (a driver that follows this rule
//! never sees it). After a `RESET`, slots still owned by the previous session stay busy until
//! their bytes are written.
//!
//! A slow disk makes the guest wait, never lose the dump: the driver polls `COMPLETED` (and
//! `STATUS` while `FINISHING`) and gives up only when nothing has moved for
//! [`NO_PROGRESS_TIMEOUT_MS`] of [`regs::HOST_CLOCK_MS`] time, so that a host that is alive but
//! stuck still lets the guest reboot. A card whose host side is gone reads all ones
//! ([`status::GONE`]); the driver gives up at once.
//!
//! The host bounds its memory whatever the disk's speed: the slots, one queue entry per slot,
//! and at most [`MAX_FINISHING_SESSIONS`] sessions still being made durable; a session opened
//! beyond that is refused with [`ErrorCode::HostBusy`].
//!
//! ## DMA mode
//! A card with [`cap::DMA`] can read a chunk's bytes straight from guest memory, so the guest
//! need not copy them into the data window. The host reaches guest memory through the DMA
//! mappings its hypervisor gives it (vfio-user `DMA_MAP`; QEMU passes a file descriptor only
//! for RAM it can share, such as `memory-backend-memfd,share=on`), so DMA mode may be
//! unavailable even when the capability is set, and the addresses the card sees are
//! guest-physical only without a vIOMMU. A driver therefore **proves** DMA mode before using
//! it, at start (PASSIVE_LEVEL): it writes a pattern of [`DMA_PROBE_SIZE`] bytes in its own
//! non-paged memory (not crossing a page), puts the physical address in `DMA_PROBE_ADDR`,
//! writes `CONTROL.DMA_PROBE`, and compares `DMA_PROBE_DATA` with its pattern. Only if they
//! match does it use DMA mode; otherwise it stays in copy mode. A probe of an address the card
//! cannot read latches [`ErrorCode::BadDma`] and leaves `DMA_PROBE_DATA` zero.
//!
//! A DMA chunk is described as in copy mode except that `CHUNK_FLAGS` has
//! [`chunk_flags::DMA`], slot `CHUNK_SLOT` holds `CHUNK_RANGES` [`DmaRange`] entries (16 bytes
//! each: guest-physical address, length, zero), and `CHUNK_LENGTH` is the sum of their lengths
//! (1..=`SLOT_SIZE`, as in copy mode). The card checks the list when the doorbell rings: a count
//! out of range, an entry of length 0, nonzero reserved bits, lengths that do not add up to
//! `CHUNK_LENGTH`, or a range not wholly inside guest memory mapped for DMA refuses the doorbell
//! with `BAD_DMA` (`BAD_LENGTH` for the count and the sum). An accepted DMA doorbell reads the
//! ranges into the slot, over the list, before the card answers any later register access;
//! from then on the chunk is like a copy-mode one (the slot is the host's until `COMPLETED`
//! passes it). **The guest's buffer is the driver's again once a register read that follows
//! the doorbell has returned** (the doorbell write may be posted; the read waits for it): the
//! driver reads `STATUS` after each DMA doorbell, which also tells it of a refusal, before its
//! DumpIo callback returns and Windows reuses the buffer.
//!
//! ## Errors
//! A refused command changes nothing on the host except the refusal count in the sidecar, sets
//! `STATUS.ERROR` and, if no error is latched yet, latches its [`ErrorCode`] in `ERROR`. `ARM`,
//! `RESET` and `CLEAR_ERROR` clear it. Refusals never lose bytes the host already accepted and
//! never close a session.
#![no_std]
#![deny(missing_docs)]

/// PCI vendor ID of the card.
///
/// An experimental ID for an emulated device, not one assigned by the PCI-SIG: the card only
/// exists inside a VM whose configuration names it explicitly.
pub const PCI_VENDOR_ID: u16 = 0xC4A5;
/// PCI device ID of the crash-monitor card.
pub const PCI_DEVICE_ID: u16 = 0x0D01;
/// PCI subsystem vendor ID.
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID;
/// PCI subsystem ID.
pub const PCI_SUBSYSTEM_ID: u16 = 0x0001;
/// PCI revision ID; it moves with the ABI's major version.
pub const PCI_REVISION: u8 = ABI_VERSION_MAJOR as u8;
/// PCI base class: base system peripheral (`PCI_CLASS_SYSTEM_PERIPHERAL`).
pub const PCI_CLASS_CODE: u8 = 0x08;
/// PCI subclass: other system peripheral (`PCI_SUBCLASS_SYS_OTHER`).
pub const PCI_SUBCLASS: u8 = 0x80;
/// PCI programming interface.
pub const PCI_PROG_IF: u8 = 0x00;

/// Index of the register BAR.
pub const BAR0_INDEX: usize = 0;
/// Size of BAR0, the register file, in bytes.
pub const BAR0_SIZE: u64 = 0x1000;
/// Index of the data-window BAR (a 64-bit BAR, so it also uses BAR3).
pub const BAR2_INDEX: usize = 2;
/// Number of slots in the data window.
pub const SLOT_COUNT: u32 = 4;
/// Size of one slot, and so the largest chunk one doorbell carries.
pub const SLOT_SIZE: u32 = 1 << 20;
/// Size of BAR2, the data window, in bytes.
pub const BAR2_SIZE: u64 = SLOT_COUNT as u64 * SLOT_SIZE as u64;

/// Value of the `MAGIC` register: the bytes "CMON" in memory order.
pub const MAGIC_VALUE: u32 = u32::from_le_bytes(*b"CMON");
/// ABI major version: a driver must refuse a card whose major version differs.
///
/// Version 2 made the card asynchronous: `COMPLETED` advances when a chunk's bytes are in the
/// file rather than when the doorbell is answered, and `FINISHING` sits between the complete
/// doorbell and `COMPLETE`. A version 1 driver would read `FINISHING` as an unknown state.
pub const ABI_VERSION_MAJOR: u16 = 2;
/// ABI minor version: additions that an older driver can ignore.
///
/// Minor 1 added DMA mode ([`cap::DMA`], `CHUNK_FLAGS`, `CHUNK_RANGES`, the DMA probe and
/// [`ErrorCode::BadDma`]); a driver that never sets `CHUNK_FLAGS` sees the card of 2.0.
pub const ABI_VERSION_MINOR: u16 = 1;
/// Value of the `VERSION` register.
pub const ABI_VERSION: u32 = (ABI_VERSION_MAJOR as u32) << 16 | ABI_VERSION_MINOR as u32;

/// How long the driver waits with no progress at all (`COMPLETED`, the session state and
/// `BYTES_WRITTEN` unchanged), measured on [`regs::HOST_CLOCK_MS`], before it gives up on the
/// card. Long enough for a big VM's final fsync on a slow disk; short enough that a host stuck
/// for good still lets the guest reboot.
pub const NO_PROGRESS_TIMEOUT_MS: u32 = 300_000;

/// Sessions the host keeps being made durable (fsync, rename) at once; see
/// [`ErrorCode::HostBusy`].
pub const MAX_FINISHING_SESSIONS: usize = 4;

/// `CHUNK_OFFSET` value meaning "right after the previous chunk": `KBUGCHECK_DUMP_IO.Offset`
/// of -1, which Windows passes when it writes the dump sequentially.
pub const OFFSET_SEQUENTIAL: u64 = u64::MAX;

/// Register offsets in BAR0. See the crate documentation for the table.
pub mod regs {
    /// RO: [`crate::MAGIC_VALUE`].
    pub const MAGIC: u32 = 0x00;
    /// RO: [`crate::ABI_VERSION`].
    pub const VERSION: u32 = 0x04;
    /// RO: [`crate::cap`] bits.
    pub const CAPABILITIES: u32 = 0x08;
    /// RO: number of slots in the data window.
    pub const SLOT_COUNT: u32 = 0x0C;
    /// RO: bytes per slot.
    pub const SLOT_SIZE: u32 = 0x10;
    /// RO: low half of the host's maximum dump size.
    pub const MAX_DUMP_SIZE_LO: u32 = 0x18;
    /// RO: high half of the host's maximum dump size.
    pub const MAX_DUMP_SIZE_HI: u32 = 0x1C;
    /// WO: [`crate::control`] commands.
    pub const CONTROL: u32 = 0x20;
    /// RO: [`crate::status`] bits and the session state.
    pub const STATUS: u32 = 0x24;
    /// RO: latched [`crate::ErrorCode`].
    pub const ERROR: u32 = 0x28;
    /// RO: doorbells finished since reset (wrapping).
    pub const COMPLETED: u32 = 0x2C;
    /// RW: bug-check code for `ANNOUNCE`.
    pub const BUGCHECK_CODE: u32 = 0x30;
    /// RW: bug-check parameter 1, low half.
    pub const BUGCHECK_PARAM1_LO: u32 = 0x38;
    /// RW: bug-check parameter 1, high half.
    pub const BUGCHECK_PARAM1_HI: u32 = 0x3C;
    /// RW: bug-check parameter 2, low half.
    pub const BUGCHECK_PARAM2_LO: u32 = 0x40;
    /// RW: bug-check parameter 2, high half.
    pub const BUGCHECK_PARAM2_HI: u32 = 0x44;
    /// RW: bug-check parameter 3, low half.
    pub const BUGCHECK_PARAM3_LO: u32 = 0x48;
    /// RW: bug-check parameter 3, high half.
    pub const BUGCHECK_PARAM3_HI: u32 = 0x4C;
    /// RW: bug-check parameter 4, low half.
    pub const BUGCHECK_PARAM4_LO: u32 = 0x50;
    /// RW: bug-check parameter 4, high half.
    pub const BUGCHECK_PARAM4_HI: u32 = 0x54;
    /// RW: chunk file offset, low half.
    pub const CHUNK_OFFSET_LO: u32 = 0x60;
    /// RW: chunk file offset, high half.
    pub const CHUNK_OFFSET_HI: u32 = 0x64;
    /// RW: chunk length in bytes.
    pub const CHUNK_LENGTH: u32 = 0x68;
    /// RW: chunk [`crate::DumpIoType`].
    pub const CHUNK_TYPE: u32 = 0x6C;
    /// RW: slot holding the chunk.
    pub const CHUNK_SLOT: u32 = 0x70;
    /// WO: submit the chunk.
    pub const DOORBELL: u32 = 0x74;
    /// RO: payload bytes written into this session's file, low half.
    pub const BYTES_WRITTEN_LO: u32 = 0x78;
    /// RO: payload bytes written into this session's file, high half.
    pub const BYTES_WRITTEN_HI: u32 = 0x7C;
    /// RO: the host's monotonic clock in milliseconds, wrapping.
    pub const HOST_CLOCK_MS: u32 = 0x80;
    /// RW: [`crate::chunk_flags`] of the chunk.
    pub const CHUNK_FLAGS: u32 = 0x84;
    /// RW: DMA mode: [`crate::DmaRange`] entries in the slot.
    pub const CHUNK_RANGES: u32 = 0x88;
    /// RW: guest-physical address of the DMA probe, low half.
    pub const DMA_PROBE_ADDR_LO: u32 = 0x90;
    /// RW: guest-physical address of the DMA probe, high half.
    pub const DMA_PROBE_ADDR_HI: u32 = 0x94;
    /// RO: the first of [`crate::DMA_PROBE_SIZE`] / 4 registers holding what the last
    /// `DMA_PROBE` read, in memory order (register `DMA_PROBE_DATA + 4 * i` holds bytes
    /// `4 * i .. 4 * i + 4`, little endian).
    pub const DMA_PROBE_DATA: u32 = 0x100;
    /// The first offset past the `DMA_PROBE_DATA` registers.
    pub const DMA_PROBE_DATA_END: u32 = DMA_PROBE_DATA + crate::DMA_PROBE_SIZE as u32;

    /// Offset of `BUGCHECK_PARAMn_LO` for n in 0..4 (parameter 1 is n = 0).
    pub const fn bugcheck_param_lo(n: usize) -> u32 {
        BUGCHECK_PARAM1_LO + 8 * n as u32
    }
}

/// Bits of the `CAPABILITIES` register.
pub mod cap {
    /// Chunks may carry an explicit offset (out-of-order writes).
    pub const EXPLICIT_OFFSET: u32 = 1 << 0;
    /// `CONTROL.ANNOUNCE` is supported.
    pub const ANNOUNCE: u32 = 1 << 1;
    /// 64-bit accesses to `_LO` registers are accepted.
    pub const WIDE_ACCESS: u32 = 1 << 2;
    /// DMA mode and `CONTROL.DMA_PROBE` are supported (whether DMA works in this VM is what the
    /// probe tells).
    pub const DMA: u32 = 1 << 3;
    /// Every capability this version of the card has.
    pub const ALL: u32 = EXPLICIT_OFFSET | ANNOUNCE | WIDE_ACCESS | DMA;
}

/// Bits of the `CHUNK_FLAGS` register.
pub mod chunk_flags {
    /// The slot holds `CHUNK_RANGES` [`crate::DmaRange`] entries; the card reads the bytes
    /// from guest memory.
    pub const DMA: u32 = 1 << 0;
    /// Every defined bit; a doorbell with any other bit set is refused with
    /// [`crate::ErrorCode::BadDma`].
    pub const ALL: u32 = DMA;
}

/// One entry of a DMA chunk's scatter list, as it lies in the slot (16 bytes, little endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct DmaRange {
    /// Guest-physical address of the bytes.
    pub address: u64,
    /// How many bytes, at least 1.
    pub length: u32,
    /// Must be 0.
    pub reserved: u32,
}

impl DmaRange {
    /// Size of one entry in the slot.
    pub const SIZE: usize = 16;

    /// The entry's bytes, as the guest stores them in the slot.
    pub const fn to_bytes(&self) -> [u8; Self::SIZE] {
        let a = self.address.to_le_bytes();
        let l = self.length.to_le_bytes();
        let r = self.reserved.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], l[0], l[1], l[2], l[3], r[0], r[1],
            r[2], r[3],
        ]
    }

    /// Reads an entry from its 16 bytes.
    pub const fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        Self {
            address: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            length: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            reserved: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// Entries one DMA doorbell may carry: 64 KiB of list, at least 16 MiB of scattered pages.
pub const MAX_DMA_RANGES: u32 = 4096;

/// Bytes `CONTROL.DMA_PROBE` reads.
pub const DMA_PROBE_SIZE: usize = 64;

/// Bits written to the `CONTROL` register. Several may be set at once; they act in bit order.
pub mod control {
    /// Back to `IDLE`. An open session is closed as incomplete; `COMPLETED` and the error clear.
    pub const RESET: u32 = 1 << 0;
    /// Clear a latched error without touching the session.
    pub const CLEAR_ERROR: u32 = 1 << 1;
    /// Ready the card for a crash (`IDLE`/`FINISHING`/`COMPLETE`/`ABORTED` to `ARMED`).
    pub const ARM: u32 = 1 << 2;
    /// Announce the bug check held in `BUGCHECK_*` and open the session.
    pub const ANNOUNCE: u32 = 1 << 3;
    /// Close an open session as incomplete; no-op when none is open.
    pub const ABORT: u32 = 1 << 4;
    /// Read [`crate::DMA_PROBE_SIZE`] bytes at `DMA_PROBE_ADDR` into `DMA_PROBE_DATA`
    /// ([`crate::cap::DMA`]); refused with [`crate::ErrorCode::BadDma`] if the card cannot.
    pub const DMA_PROBE: u32 = 1 << 5;
    /// Every defined bit; writing any other bit is refused with [`crate::ErrorCode::BadCommand`].
    pub const ALL: u32 = RESET | CLEAR_ERROR | ARM | ANNOUNCE | ABORT | DMA_PROBE;
}

/// Bits of the `STATUS` register.
pub mod status {
    /// Bits 0..3: the [`crate::SessionState`].
    pub const STATE_MASK: u32 = 0xF;
    /// The card is present and its host side is attached and able to write dumps.
    pub const READY: u32 = 1 << 8;
    /// An error is latched in `ERROR`.
    pub const ERROR: u32 = 1 << 9;
    /// What a read returns when nothing answers (the host side is gone, or the BAR is not
    /// decoded): all ones, which no real `STATUS` value is.
    pub const GONE: u32 = u32::MAX;
}

/// Session state, `STATUS & STATE_MASK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SessionState {
    /// After reset: not expecting a crash; chunks are refused.
    Idle = 0,
    /// A driver is loaded and has armed the card; the next crash opens a session.
    Armed = 1,
    /// A bug check was announced; the session is open, no chunk has arrived yet.
    BugCheckAnnounced = 2,
    /// Chunks are arriving.
    Streaming = 3,
    /// `KbDumpIoComplete` arrived; the dump is on the host, durable, under its final name.
    Complete = 4,
    /// The session was closed before completion; the host kept every byte as an incomplete dump.
    Aborted = 5,
    /// `KbDumpIoComplete` arrived; the host is writing what is queued, fsyncing and renaming.
    Finishing = 6,
}

impl SessionState {
    /// Decodes the state bits of a `STATUS` value.
    pub const fn from_status(status: u32) -> Option<Self> {
        Some(match status & status::STATE_MASK {
            0 => Self::Idle,
            1 => Self::Armed,
            2 => Self::BugCheckAnnounced,
            3 => Self::Streaming,
            4 => Self::Complete,
            5 => Self::Aborted,
            6 => Self::Finishing,
            _ => return None,
        })
    }

    /// Whether a session (a file on the host) is open in this state.
    pub const fn is_open(self) -> bool {
        matches!(self, Self::BugCheckAnnounced | Self::Streaming)
    }
}

/// Error codes latched in the `ERROR` register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// The command is not valid in the current session state.
    BadState = 1,
    /// `CHUNK_SLOT` is not below `SLOT_COUNT`.
    BadSlot = 2,
    /// `CHUNK_LENGTH` is 0 or above `SLOT_SIZE` for a data chunk, or not 0 for `KbDumpIoComplete`.
    BadLength = 3,
    /// `CHUNK_TYPE` is not a data type or `KbDumpIoComplete`.
    BadType = 4,
    /// `CHUNK_OFFSET + CHUNK_LENGTH` overflows.
    BadOffset = 5,
    /// The chunk would end past the host's maximum dump size.
    TooLarge = 6,
    /// The host could not write the chunk (for example its disk is full).
    HostIo = 7,
    /// A register access of the wrong width or alignment, to no register, or to a read-only one.
    BadAccess = 8,
    /// `CONTROL` was written with an undefined bit.
    BadCommand = 9,
    /// The doorbell named a slot whose previous chunk the host has not written yet.
    SlotBusy = 10,
    /// The host is still making [`crate::MAX_FINISHING_SESSIONS`] earlier sessions durable; no
    /// session was opened.
    HostBusy = 11,
    /// A host limit refused the session (too many sessions recently, too little free disk) or
    /// stopped writing the dump (free disk, total size of the VM's dumps); the sidecar, if the
    /// session has one, says which. Bytes already written are kept.
    Quota = 12,
    /// A DMA probe or a DMA chunk named memory the card cannot read (not mapped for DMA, or no
    /// DMA in this VM), or its scatter list is malformed (undefined `CHUNK_FLAGS` bit, an entry
    /// of length 0 or with reserved bits set).
    BadDma = 13,
}

impl ErrorCode {
    /// Decodes an `ERROR` register value.
    pub const fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::BadState,
            2 => Self::BadSlot,
            3 => Self::BadLength,
            4 => Self::BadType,
            5 => Self::BadOffset,
            6 => Self::TooLarge,
            7 => Self::HostIo,
            8 => Self::BadAccess,
            9 => Self::BadCommand,
            10 => Self::SlotBusy,
            11 => Self::HostBusy,
            12 => Self::Quota,
            13 => Self::BadDma,
            _ => return None,
        })
    }

    /// A short name for logs and sidecars.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::BadState => "bad-state",
            Self::BadSlot => "bad-slot",
            Self::BadLength => "bad-length",
            Self::BadType => "bad-type",
            Self::BadOffset => "bad-offset",
            Self::TooLarge => "too-large",
            Self::HostIo => "host-io",
            Self::BadAccess => "bad-access",
            Self::BadCommand => "bad-command",
            Self::SlotBusy => "slot-busy",
            Self::HostBusy => "host-busy",
            Self::Quota => "quota",
            Self::BadDma => "bad-dma",
        }
    }
}

/// `KBUGCHECK_DUMP_IO_TYPE` from wdm.h, with Windows' own values: what a chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DumpIoType {
    /// `KbDumpIoInvalid`: never valid in `CHUNK_TYPE`.
    Invalid = 0,
    /// `KbDumpIoHeader`: the dump header.
    Header = 1,
    /// `KbDumpIoBody`: the main body (memory).
    Body = 2,
    /// `KbDumpIoSecondaryData`: secondary dump data from drivers' callbacks.
    SecondaryData = 3,
    /// `KbDumpIoComplete`: the dump is finished (Buffer NULL, BufferLength 0).
    Complete = 4,
}

impl DumpIoType {
    /// Decodes a `CHUNK_TYPE` value.
    pub const fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Invalid,
            1 => Self::Header,
            2 => Self::Body,
            3 => Self::SecondaryData,
            4 => Self::Complete,
            _ => return None,
        })
    }

    /// Whether a chunk of this type carries bytes.
    pub const fn carries_data(self) -> bool {
        matches!(self, Self::Header | Self::Body | Self::SecondaryData)
    }
}

/// Byte offsets in the 64-bit Windows dump header (`DUMP_HEADER64`) that the host reads to name
/// a crash when the driver did not announce it.
pub mod dump_header64 {
    /// "PAGE" then "DU64": the first 8 bytes of a 64-bit dump.
    pub const SIGNATURE: [u8; 8] = *b"PAGEDU64";
    /// `BugCheckCode` (ULONG).
    pub const BUGCHECK_CODE: usize = 0x38;
    /// `BugCheckParameter1` (ULONG64); parameters 2 to 4 follow.
    pub const BUGCHECK_PARAMETER1: usize = 0x40;
    /// Bytes needed to read the signature, code and parameters.
    pub const BUGCHECK_FIELDS_END: usize = BUGCHECK_PARAMETER1 + 4 * 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_cmon_in_memory_order() {
        assert_eq!(&MAGIC_VALUE.to_le_bytes(), b"CMON");
    }

    #[test]
    fn window_is_whole_slots_and_a_power_of_two() {
        assert_eq!(BAR2_SIZE % SLOT_SIZE as u64, 0);
        assert!(BAR2_SIZE.is_power_of_two() && BAR0_SIZE.is_power_of_two());
    }

    #[test]
    fn codes_round_trip() {
        for v in 0..16 {
            if let Some(e) = ErrorCode::from_u32(v) {
                assert_eq!(e as u32, v);
            }
            if let Some(t) = DumpIoType::from_u32(v) {
                assert_eq!(t as u32, v);
            }
            if let Some(s) = SessionState::from_status(v | status::READY) {
                assert_eq!(s as u32, v);
            }
        }
        assert_eq!(ErrorCode::from_u32(14), None);
        assert_eq!(SessionState::from_status(status::GONE), None);
        assert_eq!(DumpIoType::from_u32(5), None);
    }

    #[test]
    fn registers_are_aligned_and_distinct() {
        let all = [
            regs::MAGIC,
            regs::VERSION,
            regs::CAPABILITIES,
            regs::SLOT_COUNT,
            regs::SLOT_SIZE,
            regs::MAX_DUMP_SIZE_LO,
            regs::MAX_DUMP_SIZE_HI,
            regs::CONTROL,
            regs::STATUS,
            regs::ERROR,
            regs::COMPLETED,
            regs::BUGCHECK_CODE,
            regs::BUGCHECK_PARAM1_LO,
            regs::BUGCHECK_PARAM1_HI,
            regs::BUGCHECK_PARAM2_LO,
            regs::BUGCHECK_PARAM2_HI,
            regs::BUGCHECK_PARAM3_LO,
            regs::BUGCHECK_PARAM3_HI,
            regs::BUGCHECK_PARAM4_LO,
            regs::BUGCHECK_PARAM4_HI,
            regs::CHUNK_OFFSET_LO,
            regs::CHUNK_OFFSET_HI,
            regs::CHUNK_LENGTH,
            regs::CHUNK_TYPE,
            regs::CHUNK_SLOT,
            regs::DOORBELL,
            regs::BYTES_WRITTEN_LO,
            regs::BYTES_WRITTEN_HI,
            regs::HOST_CLOCK_MS,
            regs::CHUNK_FLAGS,
            regs::CHUNK_RANGES,
            regs::DMA_PROBE_ADDR_LO,
            regs::DMA_PROBE_ADDR_HI,
            regs::DMA_PROBE_DATA,
            regs::DMA_PROBE_DATA + DMA_PROBE_SIZE as u32 - 4,
        ];
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a % 4, 0);
            assert!((*a as u64) < BAR0_SIZE);
            assert!(all[i + 1..].iter().all(|b| b != a));
        }
        assert_eq!(regs::bugcheck_param_lo(3), regs::BUGCHECK_PARAM4_LO);
    }

    #[test]
    fn dma_ranges_round_trip_and_fill_the_slot_whole() {
        let r = DmaRange { address: 0x1234_5678_9ABC_DEF0, length: 0x1000, reserved: 0 };
        assert_eq!(DmaRange::from_bytes(&r.to_bytes()), r);
        assert_eq!(&r.to_bytes()[..8], &0x1234_5678_9ABC_DEF0u64.to_le_bytes());
        assert_eq!(core::mem::size_of::<DmaRange>(), DmaRange::SIZE);
        assert!(MAX_DMA_RANGES as usize * DmaRange::SIZE <= SLOT_SIZE as usize);
        assert_eq!(DMA_PROBE_SIZE % 4, 0);
    }
}
