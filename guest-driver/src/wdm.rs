//! # wdm.h, the bug-check callback part
//!
//! Windows' own types for bug-check callbacks, with wdm.h's names and the exact x64 layouts, so
//! the same driver code runs against the real `ntoskrnl` and against the test guest's
//! implementation of the contract (`harness/guest`). Every structure is `#[repr(C)]`, its field
//! offsets are written beside the field, and a compile-time assertion checks size and offsets on
//! 64-bit targets.
//!
//! C enums are `int`-sized and a callee must not trust that a caller passes a known value, so the
//! enums are `i32` type aliases with one constant per enumerator (as `windows-sys` does), not
//! Rust enums: an unknown value from the OS is representable, never undefined behaviour.
//!
//! Calling convention: the routines are `extern "system"`, which is the Microsoft x64 convention
//! (`win64`) on x86_64 Windows. On other targets Rust's `"system"` is `"C"`; the test guest calls
//! through these types with the same ABI it compiled the driver with, so the types stay
//! consistent on every platform.
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]

use core::ffi::c_void;

/// `UCHAR`.
pub type UCHAR = u8;
/// `ULONG`: 32 bits on Windows, also on x64.
pub type ULONG = u32;
/// `ULONG64`.
pub type ULONG64 = u64;
/// `ULONG_PTR`: pointer-sized unsigned integer.
pub type ULONG_PTR = usize;
/// `PVOID`.
pub type PVOID = *mut c_void;
/// `PUCHAR`, used for the `Component` name (a NUL-terminated ANSI string).
pub type PUCHAR = *mut UCHAR;
/// `BOOLEAN`: a byte, `TRUE` (1) or `FALSE` (0).
pub type BOOLEAN = u8;
/// `TRUE` as a `BOOLEAN`.
pub const TRUE: BOOLEAN = 1;
/// `FALSE` as a `BOOLEAN`.
pub const FALSE: BOOLEAN = 0;

/// `KIRQL`: interrupt request level.
pub type KIRQL = u8;
/// `PASSIVE_LEVEL` (0).
pub const PASSIVE_LEVEL: KIRQL = 0;
/// `APC_LEVEL` (1).
pub const APC_LEVEL: KIRQL = 1;
/// `DISPATCH_LEVEL` (2): the highest level at which a thread may wait on a dispatcher object
/// with a zero timeout or acquire a spin lock.
pub const DISPATCH_LEVEL: KIRQL = 2;
/// `HIGH_LEVEL` (15 on x64): the level bug-check callbacks run at.
pub const HIGH_LEVEL: KIRQL = 15;

/// `LIST_ENTRY`: a node of a doubly linked circular list. Size 0x10.
#[repr(C)]
#[derive(Debug)]
pub struct LIST_ENTRY {
    /// 0x00: next entry (the head when this is the last).
    pub Flink: *mut LIST_ENTRY,
    /// 0x08: previous entry (the head when this is the first).
    pub Blink: *mut LIST_ENTRY,
}

impl LIST_ENTRY {
    /// An entry that is in no list (both links NULL), as a zeroed record has.
    pub const fn zeroed() -> Self {
        Self { Flink: core::ptr::null_mut(), Blink: core::ptr::null_mut() }
    }
}

/// `GUID`. Size 0x10.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GUID {
    /// 0x00.
    pub Data1: u32,
    /// 0x04.
    pub Data2: u16,
    /// 0x06.
    pub Data3: u16,
    /// 0x08.
    pub Data4: [u8; 8],
}

impl GUID {
    /// The all-zero GUID (`GUID_NULL`).
    pub const NULL: GUID = GUID { Data1: 0, Data2: 0, Data3: 0, Data4: [0; 8] };

    /// The GUID's 16 bytes as Windows stores them in memory (and in a dump file): `Data1`,
    /// `Data2` and `Data3` little endian, then `Data4`.
    pub const fn to_bytes(&self) -> [u8; 16] {
        let a = self.Data1.to_le_bytes();
        let b = self.Data2.to_le_bytes();
        let c = self.Data3.to_le_bytes();
        let d = self.Data4;
        [
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ]
    }
}

/// `KBUGCHECK_CALLBACK_REASON`: why a reason callback is called, and what its
/// `ReasonSpecificData` points to.
pub type KBUGCHECK_CALLBACK_REASON = i32;
/// Not a valid reason.
pub const KbCallbackInvalid: KBUGCHECK_CALLBACK_REASON = 0;
/// Reserved.
pub const KbCallbackReserved1: KBUGCHECK_CALLBACK_REASON = 1;
/// `BugCheckSecondaryDumpDataCallback`: data is a [`KBUGCHECK_SECONDARY_DUMP_DATA`].
pub const KbCallbackSecondaryDumpData: KBUGCHECK_CALLBACK_REASON = 2;
/// `BugCheckDumpIoCallback`: data is a [`KBUGCHECK_DUMP_IO`].
pub const KbCallbackDumpIo: KBUGCHECK_CALLBACK_REASON = 3;
/// `BugCheckAddPagesCallback`: data is a [`KBUGCHECK_ADD_PAGES`].
pub const KbCallbackAddPages: KBUGCHECK_CALLBACK_REASON = 4;
/// `BugCheckSecondaryMultiPartDumpData` (Windows 10 1507+); not used by crashmon.
pub const KbCallbackSecondaryMultiPartDumpData: KBUGCHECK_CALLBACK_REASON = 5;
/// `BugCheckRemovePagesCallback` (Windows 10 1703+); not used by crashmon.
pub const KbCallbackRemovePages: KBUGCHECK_CALLBACK_REASON = 6;
/// `BugCheckTriageDumpDataCallback` (Windows 10 1809+); not used by crashmon.
pub const KbCallbackTriageDumpData: KBUGCHECK_CALLBACK_REASON = 7;
/// Reserved.
pub const KbCallbackReserved2: KBUGCHECK_CALLBACK_REASON = 8;

/// `KBUGCHECK_DUMP_IO_TYPE`: what a [`KBUGCHECK_DUMP_IO`] buffer holds. Same values as the
/// card's `CHUNK_TYPE` ([`crate::abi::DumpIoType`]).
pub type KBUGCHECK_DUMP_IO_TYPE = i32;
/// Not a valid type.
pub const KbDumpIoInvalid: KBUGCHECK_DUMP_IO_TYPE = 0;
/// Dump file header.
pub const KbDumpIoHeader: KBUGCHECK_DUMP_IO_TYPE = 1;
/// Main body: the memory pages.
pub const KbDumpIoBody: KBUGCHECK_DUMP_IO_TYPE = 2;
/// Secondary dump data from `BugCheckSecondaryDumpDataCallback`s.
pub const KbDumpIoSecondaryData: KBUGCHECK_DUMP_IO_TYPE = 3;
/// The dump is finished: `Buffer` NULL, `BufferLength` 0.
pub const KbDumpIoComplete: KBUGCHECK_DUMP_IO_TYPE = 4;

/// `KBUGCHECK_BUFFER_DUMP_STATE` (wdm.h): the values of the `State` byte of a callback record
/// (`KBUGCHECK_CALLBACK_RECORD` and `KBUGCHECK_REASON_CALLBACK_RECORD` declare `State` as a
/// `UCHAR`). wdm.h defines no `KBUGCHECK_CALLBACK_STATE`: this enum is the callback's state.
pub type KBUGCHECK_BUFFER_DUMP_STATE = i32;
/// Not registered; what `KeInitializeCallbackRecord` sets. Registration requires it.
pub const BufferEmpty: KBUGCHECK_BUFFER_DUMP_STATE = 0;
/// Registered, not yet called.
pub const BufferInserted: KBUGCHECK_BUFFER_DUMP_STATE = 1;
/// The system is calling the routine.
pub const BufferStarted: KBUGCHECK_BUFFER_DUMP_STATE = 2;
/// The routine returned.
pub const BufferFinished: KBUGCHECK_BUFFER_DUMP_STATE = 3;
/// The routine did not finish (the system found the record or its buffer invalid).
pub const BufferIncomplete: KBUGCHECK_BUFFER_DUMP_STATE = 4;

/// `KBUGCHECK_DUMP_IO`: one write of the crash dump, given to `KbCallbackDumpIo`. Size 0x18.
#[repr(C)]
#[derive(Debug)]
pub struct KBUGCHECK_DUMP_IO {
    /// 0x00: byte offset in the dump file, or `u64::MAX` (-1) when the system writes
    /// sequentially.
    pub Offset: ULONG64,
    /// 0x08: the data (NULL for `KbDumpIoComplete`).
    pub Buffer: PVOID,
    /// 0x10: bytes at `Buffer`.
    pub BufferLength: ULONG,
    /// 0x14: a `KBUGCHECK_DUMP_IO_TYPE`.
    pub Type: KBUGCHECK_DUMP_IO_TYPE,
}

/// `KBUGCHECK_SECONDARY_DUMP_DATA`, given to `KbCallbackSecondaryDumpData`. Size 0x30.
#[repr(C)]
#[derive(Debug)]
pub struct KBUGCHECK_SECONDARY_DUMP_DATA {
    /// 0x00 (in): a small system buffer the routine may fill.
    pub InBuffer: PVOID,
    /// 0x08 (in): bytes at `InBuffer`.
    pub InBufferLength: ULONG,
    /// 0x0C (in): the most data the routine may supply.
    pub MaximumAllowed: ULONG,
    /// 0x10 (out): tag of the block; unique to the driver.
    pub Guid: GUID,
    /// 0x20 (in/out): NULL on the size query; `InBuffer` when the system asks for the data. The
    /// routine leaves it at `InBuffer` or points it at its own resident buffer.
    pub OutBuffer: PVOID,
    /// 0x28 (out): bytes of data at `OutBuffer`.
    pub OutBufferLength: ULONG,
}

/// `KBUGCHECK_ADD_PAGES`, given to `KbCallbackAddPages`. Size 0x20.
#[repr(C)]
#[derive(Debug)]
pub struct KBUGCHECK_ADD_PAGES {
    /// 0x00 (in/out): NULL before the first call, then whatever the routine left there.
    pub Context: PVOID,
    /// 0x08 (in/out): `KB_ADD_PAGES_FLAG_*`.
    pub Flags: ULONG,
    /// 0x0C (in): the bug-check code.
    pub BugCheckCode: ULONG,
    /// 0x10 (out): first page's virtual or physical address (per `Flags`).
    pub Address: ULONG_PTR,
    /// 0x18 (out): number of contiguous pages from `Address`.
    pub Count: ULONG_PTR,
}

/// `Address` is a virtual address.
pub const KB_ADD_PAGES_FLAG_VIRTUAL_ADDRESS: ULONG = 0x0000_0001;
/// `Address` is a physical address.
pub const KB_ADD_PAGES_FLAG_PHYSICAL_ADDRESS: ULONG = 0x0000_0002;
/// The routine has more ranges: call it again.
pub const KB_ADD_PAGES_FLAG_ADDITIONAL_RANGES_EXIST: ULONG = 0x8000_0000;

/// `KBUGCHECK_REASON_CALLBACK_ROUTINE`.
pub type KBUGCHECK_REASON_CALLBACK_ROUTINE = unsafe extern "system" fn(
    Reason: KBUGCHECK_CALLBACK_REASON,
    Record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    ReasonSpecificData: PVOID,
    ReasonSpecificDataLength: ULONG,
);
/// `PKBUGCHECK_REASON_CALLBACK_ROUTINE` (nullable).
pub type PKBUGCHECK_REASON_CALLBACK_ROUTINE = Option<KBUGCHECK_REASON_CALLBACK_ROUTINE>;

/// `KBUGCHECK_CALLBACK_ROUTINE`, the legacy `BugCheckCallback`.
pub type KBUGCHECK_CALLBACK_ROUTINE = unsafe extern "system" fn(Buffer: PVOID, Length: ULONG);
/// `PKBUGCHECK_CALLBACK_ROUTINE` (nullable).
pub type PKBUGCHECK_CALLBACK_ROUTINE = Option<KBUGCHECK_CALLBACK_ROUTINE>;

/// `KBUGCHECK_REASON_CALLBACK_RECORD`: owned by the driver, in resident memory, for as long as it
/// is registered; the system fills it in. Size 0x30.
#[repr(C)]
#[derive(Debug)]
pub struct KBUGCHECK_REASON_CALLBACK_RECORD {
    /// 0x00: link in the system's list.
    pub Entry: LIST_ENTRY,
    /// 0x10.
    pub CallbackRoutine: PKBUGCHECK_REASON_CALLBACK_ROUTINE,
    /// 0x18: the driver's name, NUL-terminated.
    pub Component: PUCHAR,
    /// 0x20: the system's integrity check of the record.
    pub Checksum: ULONG_PTR,
    /// 0x28.
    pub Reason: KBUGCHECK_CALLBACK_REASON,
    /// 0x2C: a `KBUGCHECK_BUFFER_DUMP_STATE`.
    pub State: UCHAR,
}

impl KBUGCHECK_REASON_CALLBACK_RECORD {
    /// A record as `KeInitializeCallbackRecord` leaves it: zeroed, `State` = `BufferEmpty`.
    pub const fn new() -> Self {
        Self {
            Entry: LIST_ENTRY::zeroed(),
            CallbackRoutine: None,
            Component: core::ptr::null_mut(),
            Checksum: 0,
            Reason: KbCallbackInvalid,
            State: BufferEmpty as UCHAR,
        }
    }
}

impl Default for KBUGCHECK_REASON_CALLBACK_RECORD {
    fn default() -> Self {
        Self::new()
    }
}

/// `KBUGCHECK_CALLBACK_RECORD`: the legacy callback's record. Size 0x40.
#[repr(C)]
#[derive(Debug)]
pub struct KBUGCHECK_CALLBACK_RECORD {
    /// 0x00: link in the system's list.
    pub Entry: LIST_ENTRY,
    /// 0x10.
    pub CallbackRoutine: PKBUGCHECK_CALLBACK_ROUTINE,
    /// 0x18: passed back to the routine.
    pub Buffer: PVOID,
    /// 0x20: passed back to the routine.
    pub Length: ULONG,
    /// 0x28: the driver's name, NUL-terminated.
    pub Component: PUCHAR,
    /// 0x30: the system's integrity check of the record.
    pub Checksum: ULONG_PTR,
    /// 0x38: a `KBUGCHECK_BUFFER_DUMP_STATE`.
    pub State: UCHAR,
}

impl KBUGCHECK_CALLBACK_RECORD {
    /// A record as `KeInitializeCallbackRecord` leaves it: zeroed, `State` = `BufferEmpty`.
    pub const fn new() -> Self {
        Self {
            Entry: LIST_ENTRY::zeroed(),
            CallbackRoutine: None,
            Buffer: core::ptr::null_mut(),
            Length: 0,
            Component: core::ptr::null_mut(),
            Checksum: 0,
            State: BufferEmpty as UCHAR,
        }
    }
}

impl Default for KBUGCHECK_CALLBACK_RECORD {
    fn default() -> Self {
        Self::new()
    }
}

/// `KeInitializeCallbackRecord(Record)`: the wdm.h macro, `(Record)->State = BufferEmpty`.
/// Works for both record types.
pub trait KeInitializeCallbackRecord {
    /// Sets `State` to `BufferEmpty`.
    fn initialize(&mut self);
}
impl KeInitializeCallbackRecord for KBUGCHECK_REASON_CALLBACK_RECORD {
    fn initialize(&mut self) {
        self.State = BufferEmpty as UCHAR;
    }
}
impl KeInitializeCallbackRecord for KBUGCHECK_CALLBACK_RECORD {
    fn initialize(&mut self) {
        self.State = BufferEmpty as UCHAR;
    }
}

/// Byte offsets of the x64 `DUMP_HEADER64` fields a DumpIo callback reads from the first header
/// buffer to learn the bug check (the card-abi crate holds the same offsets for the host).
pub use crate::abi::dump_header64;

// The layouts, checked where they are defined for (64-bit targets, as x64 Windows).
#[cfg(target_pointer_width = "64")]
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<LIST_ENTRY>() == 0x10);
    assert!(size_of::<GUID>() == 0x10);
    assert!(offset_of!(GUID, Data4) == 0x08);

    assert!(size_of::<KBUGCHECK_DUMP_IO>() == 0x18);
    assert!(offset_of!(KBUGCHECK_DUMP_IO, Buffer) == 0x08);
    assert!(offset_of!(KBUGCHECK_DUMP_IO, BufferLength) == 0x10);
    assert!(offset_of!(KBUGCHECK_DUMP_IO, Type) == 0x14);

    assert!(size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>() == 0x30);
    assert!(offset_of!(KBUGCHECK_SECONDARY_DUMP_DATA, InBufferLength) == 0x08);
    assert!(offset_of!(KBUGCHECK_SECONDARY_DUMP_DATA, MaximumAllowed) == 0x0C);
    assert!(offset_of!(KBUGCHECK_SECONDARY_DUMP_DATA, Guid) == 0x10);
    assert!(offset_of!(KBUGCHECK_SECONDARY_DUMP_DATA, OutBuffer) == 0x20);
    assert!(offset_of!(KBUGCHECK_SECONDARY_DUMP_DATA, OutBufferLength) == 0x28);

    assert!(size_of::<KBUGCHECK_ADD_PAGES>() == 0x20);
    assert!(offset_of!(KBUGCHECK_ADD_PAGES, Flags) == 0x08);
    assert!(offset_of!(KBUGCHECK_ADD_PAGES, BugCheckCode) == 0x0C);
    assert!(offset_of!(KBUGCHECK_ADD_PAGES, Address) == 0x10);
    assert!(offset_of!(KBUGCHECK_ADD_PAGES, Count) == 0x18);

    assert!(size_of::<KBUGCHECK_REASON_CALLBACK_RECORD>() == 0x30);
    assert!(offset_of!(KBUGCHECK_REASON_CALLBACK_RECORD, CallbackRoutine) == 0x10);
    assert!(offset_of!(KBUGCHECK_REASON_CALLBACK_RECORD, Component) == 0x18);
    assert!(offset_of!(KBUGCHECK_REASON_CALLBACK_RECORD, Checksum) == 0x20);
    assert!(offset_of!(KBUGCHECK_REASON_CALLBACK_RECORD, Reason) == 0x28);
    assert!(offset_of!(KBUGCHECK_REASON_CALLBACK_RECORD, State) == 0x2C);

    assert!(size_of::<KBUGCHECK_CALLBACK_RECORD>() == 0x40);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, CallbackRoutine) == 0x10);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, Buffer) == 0x18);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, Length) == 0x20);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, Component) == 0x28);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, Checksum) == 0x30);
    assert!(offset_of!(KBUGCHECK_CALLBACK_RECORD, State) == 0x38);

    // A nullable function pointer is one pointer, NULL being None, as in C.
    assert!(size_of::<PKBUGCHECK_REASON_CALLBACK_ROUTINE>() == 8);
    assert!(size_of::<PKBUGCHECK_CALLBACK_ROUTINE>() == 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_bytes_are_windows_memory_order() {
        let g = GUID {
            Data1: 0x0403_0201,
            Data2: 0x0605,
            Data3: 0x0807,
            Data4: [9, 10, 11, 12, 13, 14, 15, 16],
        };
        assert_eq!(g.to_bytes(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn dump_io_types_match_the_card() {
        use crate::abi::DumpIoType;
        for t in
            [KbDumpIoInvalid, KbDumpIoHeader, KbDumpIoBody, KbDumpIoSecondaryData, KbDumpIoComplete]
        {
            assert_eq!(DumpIoType::from_u32(t as u32).map(|d| d as i32), Some(t));
        }
    }

    #[test]
    fn new_records_are_initialized() {
        let mut r = KBUGCHECK_REASON_CALLBACK_RECORD::new();
        assert_eq!(r.State as i32, BufferEmpty);
        r.State = BufferFinished as u8;
        r.initialize();
        assert_eq!(r.State as i32, BufferEmpty);
        assert_eq!(KBUGCHECK_CALLBACK_RECORD::default().State as i32, BufferEmpty);
    }
}
