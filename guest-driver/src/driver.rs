//! # The crashmon driver's bug-check callbacks
//!
//! Platform-independent: written against the [`crate::wdm`] types only, registered through a
//! [`BugCheckRegistry`] that the test guest implements today and the Windows build implements
//! with `KeRegisterBugCheckReasonCallback` and friends. The driver registers four callbacks:
//!
//! | callback | reason | what it does |
//! |---|---|---|
//! | `BugCheckAddPagesCallback` | `KbCallbackAddPages` | learns the bug-check code; adds the pages holding the driver's own state to the dump |
//! | `BugCheckSecondaryDumpDataCallback` | `KbCallbackSecondaryDumpData` | answers the size query, then supplies a [`SECONDARY_DATA_SIZE`]-byte block tagged [`CRASHMON_SECONDARY_GUID`] (see [`SecondaryData`]) |
//! | `BugCheckDumpIoCallback` | `KbCallbackDumpIo` | re-arms a card found `IDLE` (see [Live migration](#live-migration)), announces the bug check to the card before the first byte (code and parameters from the `DUMP_HEADER64` when the first buffer is the header), then streams every `KBUGCHECK_DUMP_IO` (header, body, secondary data, `KbDumpIoComplete`) through [`Card::dump_io`] |
//! | `BugCheckCallback` (legacy) | - | runs after the dump: [`Card::abort`] leaves the card in a known final state (closes an unfinished session; a no-op after completion) |
//!
//! ## State without locks
//! All state lives in one [`CrashmonDriver`] that the platform places in a `static` (Windows:
//! non-paged data; the records must stay resident while registered). The bug-check path mutates
//! it through an [`UnsafeCell`] with no lock, which is sound because of the bug-check contract
//! ("Writing a Bug Check Callback Routine"): the callbacks run on one processor, at HIGH_LEVEL,
//! with interrupts disabled and every other processor frozen, one after the other and never
//! reentrantly, so at most one `&mut` to the state exists at a time. The only other mutators are
//! [`CrashmonDriver::start`] and [`CrashmonDriver::stop`] (DriverEntry/AddDevice and Unload, at
//! PASSIVE_LEVEL), and they touch the state only while no callback is registered: `start` fills
//! it in before registering, `stop` deregisters before tearing it down. An [`AtomicU8`] lifecycle
//! flag (claimed with compare-exchange, never spun on) keeps two `start`/`stop` calls from
//! overlapping. Taking a lock on the bug-check path would be forbidden anyway (it deadlocks if
//! the crashed processor held it).
//!
//! ## Live migration
//! The driver arms the card once, at start. A card that lost that ARM since (found `IDLE` at
//! the first DumpIo) is reset and re-armed there, and [`Session::rearmed`] records it. That is
//! what a card served by a fresh device model looks like, such as the destination's after a
//! live migration whose stream carried the guest's PCI configuration but not the card's own
//! state. QEMU 11.1 carries neither: its `vfio-user-pci` (hw/vfio-user/pci.c,
//! `vfio_user_pci_realize`) never calls `vfio_migration_realize`, leaves `vfio_save_config` and
//! `vfio_load_config` NULL ("No live migration support yet") and has no `vmsd`, so it neither
//! migrates the device (no VFIO device-feature migration, `"vfio":{"transferred":0}`) nor adds
//! the migration blocker that `vfio_pci_realize` adds for devices that cannot migrate; nor does
//! the `vfio_user` 0.1.7 server crate implement `VFIO_USER_DEVICE_FEATURE` or the migration
//! data commands. On the destination the card's BARs are then unassigned and reads of them
//! return 0 (IDLE): the re-arm cannot reach the card, `rearmed` stays false, the first chunks
//! that do not fit the slots time out, and the dump is lost (harness/tests/migration.rs pins
//! this down). A VM with the card must not be live-migrated until QEMU migrates vfio-user
//! devices, and QEMU 11.1 will not refuse it.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::mem::{offset_of, size_of};
use core::ptr;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::abi::{dump_header64, regs, DumpIoType, SessionState};
use crate::card::{Card, CardError, CardIo, DmaProbeBuffer};
use crate::wdm::*;

/// The `Component` name the driver registers its callbacks under.
pub const CRASHMON_COMPONENT: &[u8] = b"crashmon\0";

/// Tag of the driver's secondary dump data block: {C4A50D01-6372-4D53-9D6D-6F6E64727631}.
pub const CRASHMON_SECONDARY_GUID: GUID = GUID {
    Data1: 0xC4A5_0D01,
    Data2: 0x6372,
    Data3: 0x4D53,
    Data4: [0x9D, 0x6D, 0x6F, 0x6E, 0x64, 0x72, 0x76, 0x31],
};

/// Size of the driver's secondary dump data block.
pub const SECONDARY_DATA_SIZE: usize = 0x40;

/// Page size the AddPages callback counts in.
pub const PAGE_SIZE: usize = 0x1000;

/// How a platform registers bug-check callbacks: the four `Ke*` routines of wdm.h.
///
/// The Windows build forwards to `KeRegisterBugCheckReasonCallback`,
/// `KeDeregisterBugCheckReasonCallback`, `KeRegisterBugCheckCallback` and
/// `KeDeregisterBugCheckCallback`; the test guest implements the same contract itself.
pub trait BugCheckRegistry {
    /// `KeRegisterBugCheckReasonCallback`: TRUE if registered.
    ///
    /// # Safety
    /// `record` must be valid, resident and not moved until deregistered; `component` must be a
    /// NUL-terminated string that lives as long.
    unsafe fn register_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        routine: KBUGCHECK_REASON_CALLBACK_ROUTINE,
        reason: KBUGCHECK_CALLBACK_REASON,
        component: PUCHAR,
    ) -> bool;

    /// `KeDeregisterBugCheckReasonCallback`: TRUE if the record was registered and now is not.
    ///
    /// # Safety
    /// `record` must be valid.
    unsafe fn deregister_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    ) -> bool;

    /// `KeRegisterBugCheckCallback`: TRUE if registered.
    ///
    /// # Safety
    /// As [`BugCheckRegistry::register_reason_callback`]; `buffer` must be valid for `length`
    /// bytes for as long as the record is registered.
    unsafe fn register_callback(
        &self,
        record: *mut KBUGCHECK_CALLBACK_RECORD,
        routine: KBUGCHECK_CALLBACK_ROUTINE,
        buffer: PVOID,
        length: ULONG,
        component: PUCHAR,
    ) -> bool;

    /// `KeDeregisterBugCheckCallback`: TRUE if the record was registered and now is not.
    ///
    /// # Safety
    /// `record` must be valid.
    unsafe fn deregister_callback(&self, record: *mut KBUGCHECK_CALLBACK_RECORD) -> bool;
}

/// Why [`CrashmonDriver::start`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The driver is already started (or being started or stopped).
    AlreadyStarted,
    /// Probing or arming the card failed.
    Card(CardError),
    /// The platform refused a registration.
    RegistrationFailed,
}

/// What the driver saw during one bug check. Kept in the driver's state (and so in the pages its
/// AddPages callback adds to the dump) and summarised in its secondary data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// The code the AddPages callback was given, if it was called.
    pub add_pages_code: Option<u32>,
    /// The code and parameters announced to the card, if it was.
    pub announced: Option<(u32, [u64; 4])>,
    /// DumpIo calls received.
    pub dump_io_calls: u32,
    /// Payload bytes the card took.
    pub bytes: u64,
    /// `KbDumpIoComplete` was delivered and the card reported the session complete.
    pub complete: bool,
    /// The first thing the card refused or timed out on.
    pub first_error: Option<CardError>,
    /// The card stopped freeing slots; later buffers are dropped instead of waiting again.
    pub card_dead: bool,
    /// The card's state after the legacy callback's abort, once it ran.
    pub final_state: Option<SessionState>,
    /// The card was found `IDLE` at the first DumpIo (it lost the driver's ARM, e.g. a fresh
    /// device model after a live migration) and was reset and re-armed, which it confirmed.
    pub rearmed: bool,
}

/// The block the SecondaryDumpData callback supplies: [`SECONDARY_DATA_SIZE`] bytes, little
/// endian, tagged [`CRASHMON_SECONDARY_GUID`]. Offsets:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0x00 | 8 | magic `b"CMONDRV\0"` |
/// | 0x08 | 4 | layout version (1) |
/// | 0x0C | 4 | size of the block (0x40) |
/// | 0x10 | 4 | card `VERSION` register |
/// | 0x14 | 4 | card `STATUS` register when the block was made |
/// | 0x18 | 4 | card `SLOT_COUNT` |
/// | 0x1C | 4 | card `SLOT_SIZE` |
/// | 0x20 | 4 | DumpIo calls so far |
/// | 0x24 | 4 | flags: bit 0 announced, bit 1 complete, bit 2 card dead, bit 3 error seen, bit 4 AddPages called, bit 5 card re-armed at the first DumpIo, bit 6 DMA mode |
/// | 0x28 | 8 | payload bytes streamed so far |
/// | 0x30 | 4 | bug-check code from AddPages (0 if not called) |
/// | 0x34 | 4 | bug-check code announced (0 if none) |
/// | 0x38 | 8 | reserved, 0 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecondaryData(pub [u8; SECONDARY_DATA_SIZE]);

impl SecondaryData {
    /// The block's magic.
    pub const MAGIC: [u8; 8] = *b"CMONDRV\0";
    /// Layout version.
    pub const VERSION: u32 = 1;

    fn build(card: &Card<impl CardIo>, session: &Session) -> Self {
        let io = card.io();
        let mut b = [0u8; SECONDARY_DATA_SIZE];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &Self::MAGIC);
        put(0x08, &Self::VERSION.to_le_bytes());
        put(0x0C, &(SECONDARY_DATA_SIZE as u32).to_le_bytes());
        put(0x10, &io.read_register(regs::VERSION).to_le_bytes());
        put(0x14, &io.read_register(regs::STATUS).to_le_bytes());
        put(0x18, &io.read_register(regs::SLOT_COUNT).to_le_bytes());
        put(0x1C, &io.read_register(regs::SLOT_SIZE).to_le_bytes());
        put(0x20, &session.dump_io_calls.to_le_bytes());
        let flags = session.announced.is_some() as u32
            | (session.complete as u32) << 1
            | (session.card_dead as u32) << 2
            | (session.first_error.is_some() as u32) << 3
            | (session.add_pages_code.is_some() as u32) << 4
            | (session.rearmed as u32) << 5
            | (card.dma() as u32) << 6;
        put(0x24, &flags.to_le_bytes());
        put(0x28, &session.bytes.to_le_bytes());
        put(0x30, &session.add_pages_code.unwrap_or(0).to_le_bytes());
        put(0x34, &session.announced.map_or(0, |a| a.0).to_le_bytes());
        Self(b)
    }
}

/// The driver's mutable state; see the module documentation for why it needs no lock.
struct DriverState<Io: CardIo> {
    card: Option<Card<Io>>,
    session: Session,
    /// Resident buffer for the secondary data when the system's `InBuffer` is too small.
    secondary: SecondaryData,
    /// The pattern the card must read back by physical address before DMA mode is used.
    dma_probe: DmaProbeBuffer,
}

const STOPPED: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;
const STOPPING: u8 = 3;

/// The crashmon driver: its callback records and state. Place it in a `static` (it must not
/// move while its callbacks are registered) and call [`CrashmonDriver::start`].
///
/// `#[repr(C)]` so the records sit at fixed offsets: a reason callback finds the driver from its
/// record (Windows' `CONTAINING_RECORD`), the legacy callback from its `Buffer`.
#[repr(C)]
pub struct CrashmonDriver<Io: CardIo> {
    add_pages_record: UnsafeCell<KBUGCHECK_REASON_CALLBACK_RECORD>,
    secondary_record: UnsafeCell<KBUGCHECK_REASON_CALLBACK_RECORD>,
    dump_io_record: UnsafeCell<KBUGCHECK_REASON_CALLBACK_RECORD>,
    bugcheck_record: UnsafeCell<KBUGCHECK_CALLBACK_RECORD>,
    lifecycle: AtomicU8,
    state: UnsafeCell<DriverState<Io>>,
}

// SAFETY: the records and state are only mutated by the system's bug-check path (one processor,
// HIGH_LEVEL, no reentrancy) and by start/stop while no callback is registered, which the
// lifecycle flag serialises; see the module documentation. `Io: Send` because the card access
// moves into the static from the thread that calls `start`.
unsafe impl<Io: CardIo + Send> Sync for CrashmonDriver<Io> {}

impl<Io: CardIo> Default for CrashmonDriver<Io> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Io: CardIo> CrashmonDriver<Io> {
    /// A stopped driver with initialized (`BufferEmpty`) records.
    pub const fn new() -> Self {
        Self {
            add_pages_record: UnsafeCell::new(KBUGCHECK_REASON_CALLBACK_RECORD::new()),
            secondary_record: UnsafeCell::new(KBUGCHECK_REASON_CALLBACK_RECORD::new()),
            dump_io_record: UnsafeCell::new(KBUGCHECK_REASON_CALLBACK_RECORD::new()),
            bugcheck_record: UnsafeCell::new(KBUGCHECK_CALLBACK_RECORD::new()),
            lifecycle: AtomicU8::new(STOPPED),
            state: UnsafeCell::new(DriverState {
                card: None,
                session: Session {
                    add_pages_code: None,
                    announced: None,
                    dump_io_calls: 0,
                    bytes: 0,
                    complete: false,
                    first_error: None,
                    card_dead: false,
                    final_state: None,
                    rearmed: false,
                },
                secondary: SecondaryData([0; SECONDARY_DATA_SIZE]),
                dma_probe: DmaProbeBuffer::new(),
            }),
        }
    }

    /// Whether the card proved DMA mode at start (see [`Card::prove_dma`]).
    pub fn dma(&self) -> bool {
        // SAFETY: a read of Copy data; see `session`.
        unsafe { (*self.state.get()).card.as_ref().is_some_and(|c| c.dma()) }
    }

    /// Whether the driver is started (its callbacks registered).
    pub fn is_running(&self) -> bool {
        self.lifecycle.load(Ordering::Acquire) == RUNNING
    }

    /// What the driver has seen of the current bug check.
    ///
    /// For diagnostics (the test guest prints it after the dump, on the bug-check processor).
    /// Returns a copy; meaningful only when no callback can be running concurrently, which on
    /// the bug-check path is always.
    pub fn session(&self) -> Session {
        // SAFETY: a plain copy of Copy data; the only writers are the callbacks, which run on
        // this same processor and never concurrently with the caller (see module docs).
        unsafe { (*self.state.get()).session }
    }

    /// DriverEntry's part: probes the card behind `io`, resets and arms it, and registers the
    /// four callbacks with `registry`. On failure nothing stays registered.
    pub fn start(
        &'static self,
        io: Io,
        registry: &impl BugCheckRegistry,
    ) -> Result<(), StartError> {
        if self
            .lifecycle
            .compare_exchange(STOPPED, STARTING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(StartError::AlreadyStarted);
        }
        let mut card = match Card::probe(io) {
            Ok(card) => card,
            Err(e) => {
                self.lifecycle.store(STOPPED, Ordering::Release);
                return Err(StartError::Card(e));
            }
        };
        card.reset();
        // SAFETY: we hold the STARTING claim and no callback is registered yet, so nothing else
        // references the state; the probe buffer is in `self`, which is 'static and resident.
        let probe = unsafe { &mut (*self.state.get()).dma_probe };
        // PASSIVE_LEVEL: the one place DMA mode is decided. The seed only varies the pattern.
        let seed = card.io().read_register(regs::HOST_CLOCK_MS);
        card.prove_dma(probe, seed);
        if let Err(e) = card.arm() {
            self.lifecycle.store(STOPPED, Ordering::Release);
            return Err(StartError::Card(e));
        }
        // SAFETY: we hold the STARTING claim and no callback is registered yet, so nothing else
        // can reference the state.
        unsafe {
            let state = &mut *self.state.get();
            state.card = Some(card);
            state.session = Session::default();
        }
        // SAFETY: the records live in `self`, which is 'static and so never moves; the component
        // name is a 'static NUL-terminated string; the legacy buffer is `self` for its size.
        let registered = unsafe { self.register_all(registry) };
        if !registered {
            // SAFETY: as above; deregistering a record that was not registered is harmless.
            unsafe {
                self.deregister_all(registry);
                (*self.state.get()).card = None;
            }
            self.lifecycle.store(STOPPED, Ordering::Release);
            return Err(StartError::RegistrationFailed);
        }
        self.lifecycle.store(RUNNING, Ordering::Release);
        Ok(())
    }

    /// Unload's part: deregisters every callback (as Windows requires before unloading), then
    /// resets the card so the host sees no driver waiting for a crash. Returns false if the
    /// driver was not running.
    pub fn stop(&'static self, registry: &impl BugCheckRegistry) -> bool {
        if self
            .lifecycle
            .compare_exchange(RUNNING, STOPPING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // SAFETY: the records are ours and valid; after deregistration no callback can run, so
        // we are the only user of the state.
        unsafe {
            self.deregister_all(registry);
            let state = &mut *self.state.get();
            if let Some(card) = state.card.as_mut() {
                card.reset();
            }
            state.card = None;
        }
        self.lifecycle.store(STOPPED, Ordering::Release);
        true
    }

    /// # Safety
    /// `self` must be 'static (records must not move while registered).
    unsafe fn register_all(&'static self, registry: &impl BugCheckRegistry) -> bool {
        let component = CRASHMON_COMPONENT.as_ptr() as PUCHAR;
        // SAFETY: forwarded from the caller; the routines are this driver's and match the
        // records they are registered with.
        unsafe {
            registry.register_reason_callback(
                self.add_pages_record.get(),
                Self::add_pages_routine,
                KbCallbackAddPages,
                component,
            ) && registry.register_reason_callback(
                self.secondary_record.get(),
                Self::secondary_dump_data_routine,
                KbCallbackSecondaryDumpData,
                component,
            ) && registry.register_reason_callback(
                self.dump_io_record.get(),
                Self::dump_io_routine,
                KbCallbackDumpIo,
                component,
            ) && registry.register_callback(
                self.bugcheck_record.get(),
                Self::bugcheck_routine,
                self as *const Self as PVOID,
                size_of::<Self>() as ULONG,
                component,
            )
        }
    }

    /// # Safety
    /// The records must be valid (they are: they live in `self`).
    unsafe fn deregister_all(&self, registry: &impl BugCheckRegistry) {
        // SAFETY: the records are ours; deregistering one that is not registered returns FALSE
        // and changes nothing.
        unsafe {
            registry.deregister_callback(self.bugcheck_record.get());
            registry.deregister_reason_callback(self.dump_io_record.get());
            registry.deregister_reason_callback(self.secondary_record.get());
            registry.deregister_reason_callback(self.add_pages_record.get());
        }
    }

    /// The driver whose record at `offset` is `record` (`CONTAINING_RECORD`).
    ///
    /// # Safety
    /// `record` must point at the field at `offset` of a live `CrashmonDriver<Io>`.
    unsafe fn from_record<'a>(
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        offset: usize,
    ) -> &'a Self {
        // SAFETY: per the contract, stepping back `offset` bytes reaches the driver.
        unsafe { &*((record as *mut u8).sub(offset) as *const Self) }
    }

    /// The state, for the bug-check path.
    ///
    /// # Safety
    /// Only on the bug-check path (single processor, HIGH_LEVEL, not reentrant), so this is the
    /// only reference to the state while it lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state_mut(&self) -> &mut DriverState<Io> {
        // SAFETY: exclusivity per the function's contract and the module documentation.
        unsafe { &mut *self.state.get() }
    }

    /// `BugCheckAddPagesCallback` (`KBUGCHECK_REASON_CALLBACK_ROUTINE`).
    ///
    /// # Safety
    /// Called by the system with this driver's AddPages record and a `KBUGCHECK_ADD_PAGES`.
    pub unsafe extern "system" fn add_pages_routine(
        reason: KBUGCHECK_CALLBACK_REASON,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        data: PVOID,
        length: ULONG,
    ) {
        if reason != KbCallbackAddPages
            || data.is_null()
            || (length as usize) < size_of::<KBUGCHECK_ADD_PAGES>()
        {
            return;
        }
        // SAFETY: the system passes the record we registered, which is our add_pages_record.
        let this = unsafe { Self::from_record(record, offset_of!(Self, add_pages_record)) };
        // SAFETY: the system passes a valid KBUGCHECK_ADD_PAGES of `length` bytes, ours to fill.
        let pages = unsafe { &mut *(data as *mut KBUGCHECK_ADD_PAGES) };
        // SAFETY: bug-check path.
        let state = unsafe { this.state_mut() };
        state.session.add_pages_code = Some(pages.BugCheckCode);
        if !pages.Context.is_null() {
            // Already added our range on an earlier call; nothing more.
            pages.Count = 0;
            pages.Flags &= !KB_ADD_PAGES_FLAG_ADDITIONAL_RANGES_EXIST;
            return;
        }
        let (address, count) = page_span(this as *const Self as usize, size_of::<Self>());
        pages.Address = address;
        pages.Count = count;
        pages.Flags = KB_ADD_PAGES_FLAG_VIRTUAL_ADDRESS;
        pages.Context = this as *const Self as PVOID;
    }

    /// `BugCheckSecondaryDumpDataCallback` (`KBUGCHECK_REASON_CALLBACK_ROUTINE`).
    ///
    /// Size query (`OutBuffer` NULL): sets `Guid` and `OutBufferLength`, leaves `OutBuffer`
    /// NULL. Data request (`OutBuffer == InBuffer`): writes the block into `InBuffer` if it fits,
    /// otherwise points `OutBuffer` at the driver's own resident copy. A block larger than
    /// `MaximumAllowed` is not supplied (length 0).
    ///
    /// # Safety
    /// Called by the system with this driver's SecondaryDumpData record and a
    /// `KBUGCHECK_SECONDARY_DUMP_DATA` whose `InBuffer` is valid for `InBufferLength` bytes.
    pub unsafe extern "system" fn secondary_dump_data_routine(
        reason: KBUGCHECK_CALLBACK_REASON,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        data: PVOID,
        length: ULONG,
    ) {
        if reason != KbCallbackSecondaryDumpData
            || data.is_null()
            || (length as usize) < size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>()
        {
            return;
        }
        // SAFETY: the system passes the record we registered, our secondary_record.
        let this = unsafe { Self::from_record(record, offset_of!(Self, secondary_record)) };
        // SAFETY: the system passes a valid KBUGCHECK_SECONDARY_DUMP_DATA.
        let request = unsafe { &mut *(data as *mut KBUGCHECK_SECONDARY_DUMP_DATA) };
        // SAFETY: bug-check path.
        let state = unsafe { this.state_mut() };
        let Some(card) = state.card.as_ref() else { return };
        let allowed = SECONDARY_DATA_SIZE <= request.MaximumAllowed as usize;
        request.Guid = CRASHMON_SECONDARY_GUID;
        if request.OutBuffer.is_null() {
            request.OutBufferLength = if allowed { SECONDARY_DATA_SIZE as ULONG } else { 0 };
            return;
        }
        if request.OutBuffer != request.InBuffer || !allowed {
            request.OutBufferLength = 0;
            return;
        }
        state.secondary = SecondaryData::build(card, &state.session);
        if !request.InBuffer.is_null() && request.InBufferLength as usize >= SECONDARY_DATA_SIZE {
            // SAFETY: InBuffer is the system's buffer of InBufferLength bytes, which we checked
            // holds the whole block; it does not overlap our state.
            unsafe {
                ptr::copy_nonoverlapping(
                    state.secondary.0.as_ptr(),
                    request.InBuffer as *mut u8,
                    SECONDARY_DATA_SIZE,
                )
            };
        } else {
            request.OutBuffer = state.secondary.0.as_mut_ptr() as PVOID;
        }
        request.OutBufferLength = SECONDARY_DATA_SIZE as ULONG;
    }

    /// `BugCheckDumpIoCallback` (`KBUGCHECK_REASON_CALLBACK_ROUTINE`).
    ///
    /// # Safety
    /// Called by the system with this driver's DumpIo record and a `KBUGCHECK_DUMP_IO` whose
    /// `Buffer` is valid for `BufferLength` bytes (or NULL).
    pub unsafe extern "system" fn dump_io_routine(
        reason: KBUGCHECK_CALLBACK_REASON,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        data: PVOID,
        length: ULONG,
    ) {
        if reason != KbCallbackDumpIo
            || data.is_null()
            || (length as usize) < size_of::<KBUGCHECK_DUMP_IO>()
        {
            return;
        }
        // SAFETY: the system passes the record we registered, our dump_io_record.
        let this = unsafe { Self::from_record(record, offset_of!(Self, dump_io_record)) };
        // SAFETY: the system passes a valid KBUGCHECK_DUMP_IO.
        let io = unsafe { &*(data as *const KBUGCHECK_DUMP_IO) };
        let buffer: &[u8] = if io.Buffer.is_null() || io.BufferLength == 0 {
            &[]
        } else {
            // SAFETY: the system guarantees Buffer holds BufferLength readable bytes for the
            // duration of the call.
            unsafe { core::slice::from_raw_parts(io.Buffer as *const u8, io.BufferLength as usize) }
        };
        // SAFETY: bug-check path.
        let state = unsafe { this.state_mut() };
        state.dump_io(io.Offset, io.Type, buffer);
    }

    /// The legacy `BugCheckCallback` (`KBUGCHECK_CALLBACK_ROUTINE`), which runs after the dump:
    /// puts the card in its known final state.
    ///
    /// # Safety
    /// Called by the system with the `Buffer`/`Length` this driver registered (itself).
    pub unsafe extern "system" fn bugcheck_routine(buffer: PVOID, length: ULONG) {
        if buffer.is_null() || length as usize != size_of::<Self>() {
            return;
        }
        // SAFETY: we registered `self` as the buffer, with its size, which we just checked.
        let this = unsafe { &*(buffer as *const Self) };
        // SAFETY: bug-check path.
        let state = unsafe { this.state_mut() };
        if let Some(card) = state.card.as_mut() {
            card.abort();
            state.session.final_state = card.state();
        }
    }
}

impl<Io: CardIo> DriverState<Io> {
    /// One `KBUGCHECK_DUMP_IO`.
    fn dump_io(&mut self, offset: u64, kind: KBUGCHECK_DUMP_IO_TYPE, buffer: &[u8]) {
        let session = &mut self.session;
        session.dump_io_calls = session.dump_io_calls.wrapping_add(1);
        let Some(card) = self.card.as_mut() else { return };
        if session.card_dead {
            return;
        }
        let kind = match DumpIoType::from_u32(kind as u32) {
            Some(k) if k != DumpIoType::Invalid => k,
            _ => {
                session
                    .first_error
                    .get_or_insert(CardError::Refused(crate::abi::ErrorCode::BadType));
                return;
            }
        };
        if session.dump_io_calls == 1 && card.state() == Some(SessionState::Idle) {
            // The card lost the ARM the driver gave it at start (a fresh device model, e.g. the
            // destination's after a live migration): arm it again before the first byte, or it
            // refuses every chunk. Only Card's register writes and one STATUS read each: no
            // waits, allocation or locks on this HIGH_LEVEL path. `rearmed` is set only when
            // the card then reports ARMED, so a card that is not there at all (reads of an
            // unmapped BAR) is not mistaken for a re-armed one.
            card.reset();
            match card.arm() {
                Ok(()) => session.rearmed = card.state() == Some(SessionState::Armed),
                Err(e) => {
                    session.first_error.get_or_insert(e);
                }
            }
        }
        if session.dump_io_calls == 1 && kind != DumpIoType::Complete {
            // Announce before the first byte when the first buffer is the dump header, which
            // holds the code and all four parameters (Windows writes the header first). When it
            // is not (an out-of-order dump that starts with the body), the driver knows at most
            // the code (from AddPages), not the parameters, and the card would record whatever
            // is announced as the bug check; so it does not announce: the first doorbell opens
            // the session and the host reads code and parameters from the header when it
            // arrives.
            if let Some((code, parameters)) = bugcheck_of(kind, buffer) {
                session.announced = Some((code, parameters));
                if let Err(e) = card.announce(code, parameters) {
                    session.first_error.get_or_insert(e);
                }
            }
        }
        match card.dump_io(offset, kind, buffer) {
            Ok(()) if kind == DumpIoType::Complete => session.complete = true,
            Ok(()) => session.bytes += buffer.len() as u64,
            Err(e) => {
                session.first_error.get_or_insert(e);
                if matches!(e, CardError::Timeout | CardError::Gone) {
                    session.card_dead = true;
                }
            }
        }
    }
}

/// The bug-check code and parameters in a `DUMP_HEADER64` at the start of `buffer`, if it is
/// one.
pub fn bugcheck_of(kind: DumpIoType, buffer: &[u8]) -> Option<(u32, [u64; 4])> {
    // Runs inside the DumpIo callback: `get` instead of indexing, so nothing here can panic.
    let fields = buffer.get(..dump_header64::BUGCHECK_FIELDS_END)?;
    if kind != DumpIoType::Header || fields.get(..8)? != dump_header64::SIGNATURE {
        return None;
    }
    let u64_at = |at: usize| {
        let bytes = fields.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok());
        u64::from_le_bytes(bytes.unwrap_or([0; 8]))
    };
    let code_at = dump_header64::BUGCHECK_CODE;
    let code = fields.get(code_at..code_at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok())?;
    let p = dump_header64::BUGCHECK_PARAMETER1;
    Some((u32::from_le_bytes(code), [u64_at(p), u64_at(p + 8), u64_at(p + 16), u64_at(p + 24)]))
}

/// The page-aligned start and page count of `[address, address + size)`.
pub fn page_span(address: usize, size: usize) -> (usize, usize) {
    let start = address & !(PAGE_SIZE - 1);
    let end = (address + size.max(1) + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    (start, (end - start) / PAGE_SIZE)
}

/// Pointer to `c_void` from a reference, for tests and platforms building requests.
pub fn as_pvoid<T>(value: &mut T) -> PVOID {
    value as *mut T as *mut c_void
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::abi::{self, control};
    use std::sync::Mutex;
    use std::vec::Vec;

    /// A small model of the card: enough state machine for the driver's sequencing.
    #[derive(Default)]
    struct FakeCard {
        inner: Mutex<FakeInner>,
    }
    impl FakeCard {
        /// A powered-off card: every register zero, nothing received. Const, so that each test
        /// can keep its own in a `static` (the driver holds `&'static` cards).
        const fn new() -> Self {
            FakeCard {
                inner: Mutex::new(FakeInner {
                    regs: [0; 32],
                    state: 0,
                    completed: 0,
                    announces: Vec::new(),
                    chunks: Vec::new(),
                    commands: Vec::new(),
                }),
            }
        }
    }
    #[derive(Default)]
    struct FakeInner {
        regs: [u32; 0x80 / 4],
        state: u32,
        completed: u32,
        announces: Vec<(u32, [u64; 4])>,
        chunks: Vec<(u64, u32, u32)>,
        commands: Vec<u32>,
    }

    impl CardIo for &'static FakeCard {
        fn read_register(&self, offset: u32) -> u32 {
            let g = self.inner.lock().unwrap();
            match offset {
                regs::MAGIC => abi::MAGIC_VALUE,
                regs::VERSION => abi::ABI_VERSION,
                regs::SLOT_COUNT => 2,
                regs::SLOT_SIZE => 16,
                regs::STATUS => g.state | abi::status::READY,
                regs::COMPLETED => g.completed,
                regs::ERROR => 0,
                regs::HOST_CLOCK_MS => 0,
                o => g.regs[o as usize / 4],
            }
        }
        fn write_register(&self, offset: u32, value: u32) {
            let mut g = self.inner.lock().unwrap();
            match offset {
                regs::CONTROL => {
                    g.commands.push(value);
                    if value & control::RESET != 0 {
                        g.state = 0;
                        g.completed = 0;
                    }
                    if value & control::ARM != 0 {
                        g.state = 1;
                    }
                    if value & control::ANNOUNCE != 0 {
                        let p = |n: usize| {
                            g.regs[(regs::bugcheck_param_lo(n) / 4) as usize] as u64
                                | (g.regs[(regs::bugcheck_param_lo(n) / 4 + 1) as usize] as u64)
                                    << 32
                        };
                        let a =
                            (g.regs[regs::BUGCHECK_CODE as usize / 4], [p(0), p(1), p(2), p(3)]);
                        g.announces.push(a);
                        g.state = 2;
                    }
                    if value & control::ABORT != 0 && (g.state == 2 || g.state == 3) {
                        g.state = 5;
                    }
                }
                regs::DOORBELL => {
                    let r = |o: u32| g.regs[o as usize / 4];
                    let off =
                        r(regs::CHUNK_OFFSET_LO) as u64 | (r(regs::CHUNK_OFFSET_HI) as u64) << 32;
                    let chunk = (off, r(regs::CHUNK_LENGTH), r(regs::CHUNK_TYPE));
                    g.chunks.push(chunk);
                    g.completed += 1;
                    g.state = if chunk.2 == DumpIoType::Complete as u32 { 4 } else { 3 };
                }
                o => g.regs[o as usize / 4] = value,
            }
        }
        fn write_window(&self, _: usize, _: &[u8]) {}
    }

    /// A registry that keeps lists of what is registered, the way the guest and Windows do.
    #[derive(Default)]
    struct FakeRegistry {
        reasons: Mutex<Vec<(usize, KBUGCHECK_REASON_CALLBACK_ROUTINE, i32)>>,
        legacy: Mutex<Vec<(usize, KBUGCHECK_CALLBACK_ROUTINE, usize, u32)>>,
        refuse_legacy: bool,
    }
    impl BugCheckRegistry for FakeRegistry {
        unsafe fn register_reason_callback(
            &self,
            record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
            routine: KBUGCHECK_REASON_CALLBACK_ROUTINE,
            reason: KBUGCHECK_CALLBACK_REASON,
            component: PUCHAR,
        ) -> bool {
            // SAFETY: test: the record is the driver's.
            let r = unsafe { &mut *record };
            assert_eq!(r.State as i32, BufferEmpty);
            // SAFETY: component is CRASHMON_COMPONENT, a 'static NUL-terminated string.
            let component = unsafe { core::ffi::CStr::from_ptr(component as *const _) };
            assert_eq!(component.to_bytes(), b"crashmon");
            r.State = BufferInserted as u8;
            r.Reason = reason;
            r.CallbackRoutine = Some(routine);
            self.reasons.lock().unwrap().push((record as usize, routine, reason));
            true
        }
        unsafe fn deregister_reason_callback(
            &self,
            record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        ) -> bool {
            let mut l = self.reasons.lock().unwrap();
            let before = l.len();
            l.retain(|e| e.0 != record as usize);
            // SAFETY: test: the record is the driver's.
            unsafe { (*record).State = BufferEmpty as u8 };
            l.len() != before
        }
        unsafe fn register_callback(
            &self,
            record: *mut KBUGCHECK_CALLBACK_RECORD,
            routine: KBUGCHECK_CALLBACK_ROUTINE,
            buffer: PVOID,
            length: ULONG,
            _component: PUCHAR,
        ) -> bool {
            if self.refuse_legacy {
                return false;
            }
            self.legacy.lock().unwrap().push((record as usize, routine, buffer as usize, length));
            true
        }
        unsafe fn deregister_callback(&self, record: *mut KBUGCHECK_CALLBACK_RECORD) -> bool {
            let mut l = self.legacy.lock().unwrap();
            let before = l.len();
            l.retain(|e| e.0 != record as usize);
            l.len() != before
        }
    }

    impl FakeRegistry {
        fn reason(
            &self,
            reason: i32,
        ) -> (*mut KBUGCHECK_REASON_CALLBACK_RECORD, KBUGCHECK_REASON_CALLBACK_ROUTINE) {
            let l = self.reasons.lock().unwrap();
            let e = l.iter().find(|e| e.2 == reason).expect("registered");
            (e.0 as *mut _, e.1)
        }
    }

    fn header(code: u32, params: [u64; 4]) -> Vec<u8> {
        let mut h = std::vec![0u8; 0x2000];
        h[..8].copy_from_slice(b"PAGEDU64");
        h[0x38..0x3C].copy_from_slice(&code.to_le_bytes());
        for (i, p) in params.iter().enumerate() {
            h[0x40 + 8 * i..0x48 + 8 * i].copy_from_slice(&p.to_le_bytes());
        }
        h
    }

    fn dump_io(reg: &FakeRegistry, offset: u64, kind: i32, buf: &mut [u8]) {
        let (record, routine) = reg.reason(KbCallbackDumpIo);
        let mut io = KBUGCHECK_DUMP_IO {
            Offset: offset,
            Buffer: if buf.is_empty() { ptr::null_mut() } else { buf.as_mut_ptr() as PVOID },
            BufferLength: buf.len() as u32,
            Type: kind,
        };
        // SAFETY: calling the registered routine as the system would.
        unsafe {
            routine(
                KbCallbackDumpIo,
                record,
                as_pvoid(&mut io),
                size_of::<KBUGCHECK_DUMP_IO>() as u32,
            )
        };
    }

    #[test]
    fn a_whole_bug_check_through_the_callbacks() {
        static CARD: FakeCard = FakeCard::new();
        static DRIVER: CrashmonDriver<&'static FakeCard> = CrashmonDriver::new();
        let reg = FakeRegistry::default();
        DRIVER.start(&CARD, &reg).unwrap();
        assert_eq!(DRIVER.start(&CARD, &reg), Err(StartError::AlreadyStarted));
        assert_eq!(reg.reasons.lock().unwrap().len(), 3);
        assert_eq!(reg.legacy.lock().unwrap().len(), 1);
        assert_eq!(CARD.inner.lock().unwrap().state, 1, "armed");

        // AddPages: learns the code, adds the driver's own pages.
        let (record, routine) = reg.reason(KbCallbackAddPages);
        let mut pages = KBUGCHECK_ADD_PAGES {
            Context: ptr::null_mut(),
            Flags: 0,
            BugCheckCode: 0x50,
            Address: 0,
            Count: 0,
        };
        // SAFETY: as the system calls it.
        unsafe {
            routine(
                KbCallbackAddPages,
                record,
                as_pvoid(&mut pages),
                size_of::<KBUGCHECK_ADD_PAGES>() as u32,
            )
        };
        assert_eq!(pages.Flags, KB_ADD_PAGES_FLAG_VIRTUAL_ADDRESS);
        let me = &DRIVER as *const _ as usize;
        assert!(
            pages.Address <= me
                && me + size_of::<CrashmonDriver<&FakeCard>>()
                    <= pages.Address + pages.Count * PAGE_SIZE
        );

        // SecondaryDumpData: size query, then data into InBuffer.
        let (record, routine) = reg.reason(KbCallbackSecondaryDumpData);
        let mut inbuf = [0u8; 0x100];
        let mut req = KBUGCHECK_SECONDARY_DUMP_DATA {
            InBuffer: inbuf.as_mut_ptr() as PVOID,
            InBufferLength: 0x100,
            MaximumAllowed: 0x1000,
            Guid: GUID::NULL,
            OutBuffer: ptr::null_mut(),
            OutBufferLength: 0,
        };
        let len = size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>() as u32;
        // SAFETY: as the system calls it.
        unsafe { routine(KbCallbackSecondaryDumpData, record, as_pvoid(&mut req), len) };
        assert_eq!(
            (req.Guid, req.OutBufferLength, req.OutBuffer),
            (CRASHMON_SECONDARY_GUID, 0x40, ptr::null_mut())
        );
        req.OutBuffer = req.InBuffer;
        // SAFETY: as the system calls it.
        unsafe { routine(KbCallbackSecondaryDumpData, record, as_pvoid(&mut req), len) };
        assert_eq!(req.OutBuffer, req.InBuffer);
        assert_eq!(&inbuf[..8], b"CMONDRV\0");
        assert_eq!(u32::from_le_bytes(inbuf[0x30..0x34].try_into().unwrap()), 0x50);

        // DumpIo: the header announces the header's code, then chunks stream, then completion.
        let mut h = header(0xDEAD_0001, [1, 2, 3, 4]);
        dump_io(&reg, 0, KbDumpIoHeader, &mut h[..0x1000]);
        dump_io(&reg, 0x1000, KbDumpIoHeader, &mut h[0x1000..]);
        dump_io(&reg, u64::MAX, KbDumpIoBody, &mut [7u8; 40]);
        dump_io(&reg, u64::MAX, KbDumpIoSecondaryData, &mut [9u8; 8]);
        dump_io(&reg, u64::MAX, KbDumpIoComplete, &mut []);
        {
            let g = CARD.inner.lock().unwrap();
            assert_eq!(g.announces, [(0xDEAD_0001, [1, 2, 3, 4])]);
            assert_eq!(g.state, 4);
            let lengths: Vec<u32> = g.chunks.iter().map(|c| c.1).collect();
            // 16-byte slots: 0x1000/16 chunks per header half, then 40 = 16+16+8, 8, complete.
            assert_eq!(lengths.len(), 0x2000 / 16 + 3 + 1 + 1);
            assert_eq!(g.chunks[1].0, 16, "explicit offsets advance");
            assert_eq!(*g.chunks.last().unwrap(), (0, 0, 4));
        }
        let s = DRIVER.session();
        assert!(s.complete && s.first_error.is_none());
        assert!(!s.rearmed, "an armed card is left as it is");
        assert_eq!(s.bytes, 0x2000 + 48);

        // Legacy callback after the dump: abort is a no-op on a complete session.
        let (_, routine, buffer, length) = reg.legacy.lock().unwrap()[0];
        // SAFETY: as the system calls it.
        unsafe { routine(buffer as PVOID, length) };
        assert_eq!(DRIVER.session().final_state, Some(SessionState::Complete));
        assert!(CARD.inner.lock().unwrap().commands.contains(&control::ABORT));

        // Unload.
        assert!(DRIVER.stop(&reg));
        assert!(reg.reasons.lock().unwrap().is_empty() && reg.legacy.lock().unwrap().is_empty());
        assert_eq!(CARD.inner.lock().unwrap().state, 0, "reset on unload");
        assert!(!DRIVER.stop(&reg));
    }

    #[test]
    fn a_card_that_lost_its_arm_is_rearmed_at_the_first_dump_io_and_takes_the_dump() {
        static CARD: FakeCard = FakeCard::new();
        static DRIVER: CrashmonDriver<&'static FakeCard> = CrashmonDriver::new();
        let reg = FakeRegistry::default();
        DRIVER.start(&CARD, &reg).unwrap();
        {
            // A fresh device model behind the same BARs (the destination of a live
            // migration): IDLE, and it never saw the driver's ARM.
            let mut g = CARD.inner.lock().unwrap();
            g.state = 0;
            g.commands.clear();
        }
        let mut h = header(0x80, [0x4F4454, 0, 0, 0]);
        dump_io(&reg, u64::MAX, KbDumpIoHeader, &mut h);
        {
            let g = CARD.inner.lock().unwrap();
            assert_eq!(g.commands[..2], [control::RESET, control::ARM], "reset and re-armed first");
            assert_eq!(g.announces, [(0x80, [0x4F4454, 0, 0, 0])], "then announced");
            assert_eq!(g.chunks.len(), 0x2000 / 16, "and the header streamed");
        }
        dump_io(&reg, u64::MAX, KbDumpIoBody, &mut [7u8; 40]);
        dump_io(&reg, u64::MAX, KbDumpIoComplete, &mut []);
        assert_eq!(CARD.inner.lock().unwrap().state, 4, "complete");
        let s = DRIVER.session();
        assert!(s.rearmed && s.complete && s.first_error.is_none(), "{s:?}");
        assert_eq!(s.bytes, 0x2000 + 40);
        let resets =
            CARD.inner.lock().unwrap().commands.iter().filter(|&&c| c == control::RESET).count();
        assert_eq!(resets, 1, "re-armed once, at the first DumpIo only");

        // The secondary data says so: flags bit 5.
        let (record, routine) = reg.reason(KbCallbackSecondaryDumpData);
        let mut block = [0u8; SECONDARY_DATA_SIZE];
        let mut req = KBUGCHECK_SECONDARY_DUMP_DATA {
            InBuffer: block.as_mut_ptr() as PVOID,
            InBufferLength: SECONDARY_DATA_SIZE as u32,
            MaximumAllowed: 0x1000,
            Guid: GUID::NULL,
            OutBuffer: block.as_mut_ptr() as PVOID,
            OutBufferLength: 0,
        };
        let len = size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>() as u32;
        // SAFETY: as the system calls it.
        unsafe { routine(KbCallbackSecondaryDumpData, record, as_pvoid(&mut req), len) };
        let flags = u32::from_le_bytes(block[0x24..0x28].try_into().unwrap());
        assert_eq!(flags & (1 << 5), 1 << 5, "flags {flags:#x}");
        DRIVER.stop(&reg);
    }

    #[test]
    fn a_card_that_is_not_there_is_not_counted_as_rearmed() {
        /// A card whose BARs stop decoding (the destination of a live migration when QEMU did
        /// not carry the PCI configuration): reads then return zeros, which STATUS decodes as
        /// IDLE, and writes go nowhere.
        struct Vanishing(core::sync::atomic::AtomicBool);
        impl CardIo for &'static Vanishing {
            fn read_register(&self, offset: u32) -> u32 {
                if self.0.load(Ordering::Relaxed) {
                    return 0;
                }
                match offset {
                    regs::MAGIC => abi::MAGIC_VALUE,
                    regs::VERSION => abi::ABI_VERSION,
                    regs::SLOT_COUNT => 2,
                    regs::SLOT_SIZE => 16,
                    _ => 0,
                }
            }
            fn write_register(&self, _: u32, _: u32) {}
            fn write_window(&self, _: usize, _: &[u8]) {}
        }
        static CARD: Vanishing = Vanishing(core::sync::atomic::AtomicBool::new(false));
        let mut state = DriverState {
            card: Some(Card::probe(&CARD).unwrap()),
            session: Session::default(),
            secondary: SecondaryData([0; SECONDARY_DATA_SIZE]),
            dma_probe: DmaProbeBuffer::new(),
        };
        CARD.0.store(true, Ordering::Relaxed);
        state.dump_io(u64::MAX, KbDumpIoBody, &[1u8; 4]);
        assert!(!state.session.rearmed, "{:?}", state.session);
    }

    #[test]
    fn out_of_order_dump_is_not_announced_with_guessed_parameters_and_unfinished_is_aborted() {
        static CARD: FakeCard = FakeCard::new();
        static DRIVER: CrashmonDriver<&'static FakeCard> = CrashmonDriver::new();
        let reg = FakeRegistry::default();
        DRIVER.start(&CARD, &reg).unwrap();
        let (record, routine) = reg.reason(KbCallbackAddPages);
        let mut pages = KBUGCHECK_ADD_PAGES {
            Context: ptr::null_mut(),
            Flags: 0,
            BugCheckCode: 0x8E,
            Address: 0,
            Count: 0,
        };
        // SAFETY: as the system calls it.
        unsafe {
            routine(
                KbCallbackAddPages,
                record,
                as_pvoid(&mut pages),
                size_of::<KBUGCHECK_ADD_PAGES>() as u32,
            )
        };
        // A body chunk first (out of order): the parameters are unknown, so no announce; the
        // header that comes later is streamed like any chunk and the host reads it.
        dump_io(&reg, 0x2000, KbDumpIoBody, &mut [1u8; 4]);
        dump_io(&reg, 0, KbDumpIoHeader, &mut header(0x8E, [0xC000_0094, 1, 2, 0])[..0x1000]);
        assert!(CARD.inner.lock().unwrap().announces.is_empty());
        assert_eq!(CARD.inner.lock().unwrap().chunks.len(), 1 + 0x1000 / 16);
        assert_eq!(DRIVER.session().add_pages_code, Some(0x8E));
        let (_, routine, buffer, length) = reg.legacy.lock().unwrap()[0];
        // SAFETY: as the system calls it.
        unsafe { routine(buffer as PVOID, length) };
        assert_eq!(DRIVER.session().final_state, Some(SessionState::Aborted));
        DRIVER.stop(&reg);
    }

    #[test]
    fn refused_registration_leaves_nothing_registered() {
        static CARD: FakeCard = FakeCard::new();
        static DRIVER: CrashmonDriver<&'static FakeCard> = CrashmonDriver::new();
        let reg = FakeRegistry { refuse_legacy: true, ..Default::default() };
        assert_eq!(DRIVER.start(&CARD, &reg), Err(StartError::RegistrationFailed));
        assert!(reg.reasons.lock().unwrap().is_empty());
        assert!(!DRIVER.is_running());
        // And it can be started again once the platform agrees.
        let ok = FakeRegistry::default();
        DRIVER.start(&CARD, &ok).unwrap();
        assert!(DRIVER.stop(&ok));
    }

    #[test]
    fn secondary_data_respects_maximum_and_small_in_buffers() {
        static CARD: FakeCard = FakeCard::new();
        static DRIVER: CrashmonDriver<&'static FakeCard> = CrashmonDriver::new();
        let reg = FakeRegistry::default();
        DRIVER.start(&CARD, &reg).unwrap();
        let (record, routine) = reg.reason(KbCallbackSecondaryDumpData);
        let len = size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>() as u32;
        let mut small = [0u8; 8];
        let mut req = KBUGCHECK_SECONDARY_DUMP_DATA {
            InBuffer: small.as_mut_ptr() as PVOID,
            InBufferLength: 8,
            MaximumAllowed: 0x1000,
            Guid: GUID::NULL,
            OutBuffer: small.as_mut_ptr() as PVOID,
            OutBufferLength: 0,
        };
        // SAFETY: as the system calls it.
        unsafe { routine(KbCallbackSecondaryDumpData, record, as_pvoid(&mut req), len) };
        assert_ne!(req.OutBuffer, req.InBuffer, "the driver's own resident buffer");
        assert_eq!(req.OutBufferLength, 0x40);
        // SAFETY: the driver points OutBuffer at its resident block of OutBufferLength bytes.
        let block = unsafe { core::slice::from_raw_parts(req.OutBuffer as *const u8, 0x40) };
        assert_eq!(&block[..8], b"CMONDRV\0");
        assert_eq!(small, [0; 8]);

        req.MaximumAllowed = 0x20;
        req.OutBuffer = ptr::null_mut();
        // SAFETY: as the system calls it.
        unsafe { routine(KbCallbackSecondaryDumpData, record, as_pvoid(&mut req), len) };
        assert_eq!(req.OutBufferLength, 0);
        DRIVER.stop(&reg);
    }

    #[test]
    fn header_parsing_and_page_span() {
        let h = header(0x80, [0x4F4454, 0, 0, 0]);
        assert_eq!(bugcheck_of(DumpIoType::Header, &h), Some((0x80, [0x4F4454, 0, 0, 0])));
        assert_eq!(bugcheck_of(DumpIoType::Body, &h), None);
        assert_eq!(bugcheck_of(DumpIoType::Header, &h[..0x40]), None);
        assert_eq!(page_span(0x1ff8, 0x10), (0x1000, 2));
        assert_eq!(page_span(0x2000, 0x1000), (0x2000, 1));
    }
}
