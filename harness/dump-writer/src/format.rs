//! Byte offsets and constants of the on-disk structures this crate writes and reads.
//!
//! Every multi-byte value is little endian. Offsets are from the start of the structure named
//! by the module; [`header64`] starts at file offset 0, [`summary_dump64`] at file offset
//! [`crate::HEADER_SIZE`] (bitmap dumps only), and the secondary data ([`blob`]) right after the
//! last page of primary data.

/// `DUMP_HEADER64`: the first [`crate::HEADER_SIZE`] (0x2000) bytes of every 64-bit kernel dump.
///
/// Windows first fills the whole header with the ASCII pattern "PAGE" and then writes the fields
/// it knows; bytes of unused fields (`VersionUser`, `Comment`, the alignment gaps, the reserved
/// tail, the unused part of `PhysicalMemoryBlockBuffer` and `ContextRecord`) keep the pattern.
/// This writer does the same.
pub mod header64 {
    /// `Signature` (u32): "PAGE" ([`SIGNATURE_VALUE`]).
    pub const SIGNATURE: usize = 0x000;
    /// `ValidDump` (u32): "DU64" ([`VALID_DUMP_VALUE`]).
    pub const VALID_DUMP: usize = 0x004;
    /// `MajorVersion` (u32): 0xF for a free (retail) build, 0xC for a checked build.
    pub const MAJOR_VERSION: usize = 0x008;
    /// `MinorVersion` (u32): the Windows build number, e.g. 26100.
    pub const MINOR_VERSION: usize = 0x00C;
    /// `DirectoryTableBase` (u64): CR3 of the crashing processor.
    pub const DIRECTORY_TABLE_BASE: usize = 0x010;
    /// `PfnDataBase` (u64): `MmPfnDatabase`.
    pub const PFN_DATA_BASE: usize = 0x018;
    /// `PsLoadedModuleList` (u64): address of the kernel's loaded-module `LIST_ENTRY` head.
    pub const PS_LOADED_MODULE_LIST: usize = 0x020;
    /// `PsActiveProcessHead` (u64): address of the process list head.
    pub const PS_ACTIVE_PROCESS_HEAD: usize = 0x028;
    /// `MachineImageType` (u32): `IMAGE_FILE_MACHINE_AMD64`, 0x8664.
    pub const MACHINE_IMAGE_TYPE: usize = 0x030;
    /// `NumberProcessors` (u32).
    pub const NUMBER_PROCESSORS: usize = 0x034;
    /// `BugCheckCode` (u32); 0x03C..0x040 is alignment padding.
    pub const BUG_CHECK_CODE: usize = 0x038;
    /// `BugCheckParameter1..4` (u64 each).
    pub const BUG_CHECK_PARAMETERS: usize = 0x040;
    /// `VersionUser[32]` (left as "PAGE" pattern).
    pub const VERSION_USER: usize = 0x060;
    /// `KdDebuggerDataBlock` (u64): address of `KDDEBUGGER_DATA64`, 0 when there is none.
    pub const KD_DEBUGGER_DATA_BLOCK: usize = 0x080;
    /// `PhysicalMemoryBlock`: a [`super::physical_memory_descriptor64`] in a 700-byte buffer.
    pub const PHYSICAL_MEMORY_BLOCK: usize = 0x088;
    /// Size of `PhysicalMemoryBlockBuffer` (`DMP_PHYSICAL_MEMORY_BLOCK_SIZE_64`).
    pub const PHYSICAL_MEMORY_BLOCK_SIZE: usize = 700;
    /// `ContextRecord[3000]`: the crashing processor's AMD64 `CONTEXT` (0x4D0 bytes) first.
    pub const CONTEXT_RECORD: usize = 0x348;
    /// Size of `ContextRecord` (`DMP_CONTEXT_RECORD_SIZE_64`).
    pub const CONTEXT_RECORD_SIZE: usize = 3000;
    /// `Exception`: an [`super::exception_record64`].
    pub const EXCEPTION: usize = 0xF00;
    /// `DumpType` (u32): [`DUMP_TYPE_FULL`] or [`DUMP_TYPE_BITMAP`]; 0xF9C..0xFA0 is padding.
    pub const DUMP_TYPE: usize = 0xF98;
    /// `RequiredDumpSpace` (u64): size of the whole dump file in bytes.
    pub const REQUIRED_DUMP_SPACE: usize = 0xFA0;
    /// `SystemTime` (u64): `KeQuerySystemTime` at the crash (100 ns units since 1601).
    pub const SYSTEM_TIME: usize = 0xFA8;
    /// `Comment[128]` (left as "PAGE" pattern).
    pub const COMMENT: usize = 0xFB0;
    /// `SystemUpTime` (u64): interrupt time at the crash (100 ns units since boot).
    pub const SYSTEM_UP_TIME: usize = 0x1030;
    /// `MiniDumpFields` (u32, left as pattern: only triage dumps use it).
    pub const MINI_DUMP_FIELDS: usize = 0x1038;
    /// `SecondaryDataState` (u32, NTSTATUS of the secondary-data collection).
    pub const SECONDARY_DATA_STATE: usize = 0x103C;
    /// `ProductType` (u32, left as pattern).
    pub const PRODUCT_TYPE: usize = 0x1040;
    /// `SuiteMask` (u32, left as pattern).
    pub const SUITE_MASK: usize = 0x1044;
    /// `WriterStatus` (u32, left as pattern).
    pub const WRITER_STATUS: usize = 0x1048;
    /// `KdSecondaryVersion` (u8, left as pattern).
    pub const KD_SECONDARY_VERSION: usize = 0x104D;
    /// `Attributes` (u32, left as pattern).
    pub const ATTRIBUTES: usize = 0x1050;
    /// `BootId` (u32, left as pattern).
    pub const BOOT_ID: usize = 0x1054;
    /// Start of `Reserved0`, which runs to the end of the header (left as pattern).
    pub const RESERVED: usize = 0x1058;

    /// "PAGE" as a little-endian u32 (Windows' `'EGAP'`).
    pub const SIGNATURE_VALUE: u32 = u32::from_le_bytes(*b"PAGE");
    /// "DU64" as a little-endian u32 (Windows' `'46UD'`).
    pub const VALID_DUMP_VALUE: u32 = u32::from_le_bytes(*b"DU64");
    /// `MajorVersion` of a free build.
    pub const MAJOR_VERSION_FREE: u32 = 0xF;
    /// `MinorVersion` this writer puts in the header: Windows 11 24H2's build number.
    pub const MINOR_VERSION_BUILD: u32 = 26100;
    /// `IMAGE_FILE_MACHINE_AMD64`.
    pub const MACHINE_AMD64: u32 = 0x8664;
    /// `DumpType` of a full dump: every page of every run follows the header.
    pub const DUMP_TYPE_FULL: u32 = 1;
    /// `DumpType` of a bitmap dump: a [`super::summary_dump64`] follows the header.
    pub const DUMP_TYPE_BITMAP: u32 = 5;
}

/// `PHYSICAL_MEMORY_DESCRIPTOR64` inside `DUMP_HEADER64.PhysicalMemoryBlockBuffer`.
pub mod physical_memory_descriptor64 {
    /// `NumberOfRuns` (u32); 0x04..0x08 is padding (written as zeros).
    pub const NUMBER_OF_RUNS: usize = 0x00;
    /// `NumberOfPages` (u64): total pages in all runs.
    pub const NUMBER_OF_PAGES: usize = 0x08;
    /// `Run[]`: `PHYSICAL_MEMORY_RUN64 { u64 BasePage; u64 PageCount; }`.
    pub const RUNS: usize = 0x10;
    /// Size of one `PHYSICAL_MEMORY_RUN64`.
    pub const RUN_SIZE: usize = 0x10;
    /// Most runs that fit in the 700-byte buffer: (700 - 0x10) / 0x10.
    pub const MAX_RUNS: usize = (super::header64::PHYSICAL_MEMORY_BLOCK_SIZE - RUNS) / RUN_SIZE;
}

/// `EXCEPTION_RECORD64` at `DUMP_HEADER64.Exception` (0x98 bytes).
///
/// This writer records the bug check in it: `ExceptionCode` = the bug-check code,
/// `ExceptionFlags` = `EXCEPTION_NONCONTINUABLE`, `ExceptionAddress` = the context's `Rip`,
/// `NumberParameters` = 4 and the four bug-check parameters first in `ExceptionInformation`.
pub mod exception_record64 {
    /// `ExceptionCode` (u32).
    pub const EXCEPTION_CODE: usize = 0x00;
    /// `ExceptionFlags` (u32).
    pub const EXCEPTION_FLAGS: usize = 0x04;
    /// `ExceptionRecord` (u64): address of a chained record, 0.
    pub const EXCEPTION_RECORD: usize = 0x08;
    /// `ExceptionAddress` (u64).
    pub const EXCEPTION_ADDRESS: usize = 0x10;
    /// `NumberParameters` (u32); 0x1C..0x20 is `__unusedAlignment`.
    pub const NUMBER_PARAMETERS: usize = 0x18;
    /// `ExceptionInformation[15]` (u64 each).
    pub const EXCEPTION_INFORMATION: usize = 0x20;
    /// Size of the record.
    pub const SIZE: usize = 0x98;
    /// `EXCEPTION_NONCONTINUABLE`.
    pub const EXCEPTION_NONCONTINUABLE: u32 = 1;
}

/// The bitmap-dump header (`SUMMARY_DUMP64` as modern Windows writes it) at file offset
/// [`crate::HEADER_SIZE`] of a dump whose `DumpType` is 5.
///
/// The bitmap follows at [`BITMAP`](summary_dump64::BITMAP): one bit per physical page from PFN 0, least significant
/// bit first within each byte (so also within each little-endian `ULONG` of an `RTL_BITMAP`);
/// a set bit means the page is in the file. The present pages follow at [`FIRST_PAGE`](summary_dump64::FIRST_PAGE)'s value
/// (a page-aligned offset) in increasing PFN order, with nothing in between them. This writer
/// zero-fills from the end of the bitmap to that first page.
pub mod summary_dump64 {
    /// `Signature` (u32): "SDMP" ([`SIGNATURE_SUMMARY`]); "FDMP" ([`SIGNATURE_FULL`]) also exists.
    pub const SIGNATURE: usize = 0x00;
    /// `ValidDump` (u32): "DUMP" ([`VALID_DUMP_VALUE`]).
    pub const VALID_DUMP: usize = 0x04;
    /// `DumpOptions` (u32), 0; 0x0C..0x20 is reserved (zeros).
    pub const DUMP_OPTIONS: usize = 0x08;
    /// `FirstPage` / `HeaderSize` (u64): file offset of the first present page.
    pub const FIRST_PAGE: usize = 0x20;
    /// `TotalPresentPages` (u64): number of set bits, i.e. of pages in the file.
    pub const TOTAL_PRESENT_PAGES: usize = 0x28;
    /// `Pages` / `BitmapSize` (u64): number of bits in the bitmap.
    pub const PAGES: usize = 0x30;
    /// The bitmap itself.
    pub const BITMAP: usize = 0x38;

    /// "SDMP": a bitmap (summary) dump.
    pub const SIGNATURE_SUMMARY: u32 = u32::from_le_bytes(*b"SDMP");
    /// "FDMP": the signature Windows uses for a bitmap-format complete memory dump.
    pub const SIGNATURE_FULL: u32 = u32::from_le_bytes(*b"FDMP");
    /// "DUMP".
    pub const VALID_DUMP_VALUE: u32 = u32::from_le_bytes(*b"DUMP");
}

/// Secondary dump data: `DUMP_BLOB_FILE_HEADER` then one `DUMP_BLOB_HEADER` + data per blob.
///
/// The blob area starts right after the primary data (after the last page of a full dump or the
/// last present page of a bitmap dump, where Windows' debugger engine looks for its "tagged
/// data") and runs to `RequiredDumpSpace`. There is no blob count: a reader walks the blob
/// headers until the end of the file.
///
/// `DUMP_BLOB_FILE_HEADER` (0x10 bytes):
///
/// | offset | field |
/// |---|---|
/// | 0x00 | `Signature1` (u32): "Dump" |
/// | 0x04 | `Signature2` (u32): "Blob" |
/// | 0x08 | `HeaderSize` (u32): 0x10, the offset of the first blob header |
/// | 0x0C | `BuildNumber` (u32): `NtBuildNumber` (0xF0000000 \| build for a free build) |
///
/// `DUMP_BLOB_HEADER` (0x20 bytes), each at an 8-byte-aligned offset:
///
/// | offset | field |
/// |---|---|
/// | 0x00 | `HeaderSize` (u32): 0x20 |
/// | 0x04 | `Tag` (GUID, 16 bytes as laid out in memory) |
/// | 0x14 | `DataSize` (u32) |
/// | 0x18 | `PrePad` (u32): bytes between the header and the data (0 here) |
/// | 0x1C | `PostPad` (u32): bytes after the data up to the next 8-byte boundary |
///
/// The next blob header is at `header + HeaderSize + PrePad + DataSize + PostPad`.
pub mod blob {
    /// `DUMP_BLOB_FILE_HEADER.Signature1`: "Dump" (Windows' `'pmuD'`).
    pub const SIGNATURE1: u32 = u32::from_le_bytes(*b"Dump");
    /// `DUMP_BLOB_FILE_HEADER.Signature2`: "Blob" (Windows' `'bolB'`).
    pub const SIGNATURE2: u32 = u32::from_le_bytes(*b"Blob");
    /// Size of `DUMP_BLOB_FILE_HEADER`.
    pub const FILE_HEADER_SIZE: usize = 0x10;
    /// Offset of `DUMP_BLOB_FILE_HEADER.HeaderSize`.
    pub const FILE_HEADER_HEADER_SIZE: usize = 0x08;
    /// Offset of `DUMP_BLOB_FILE_HEADER.BuildNumber`.
    pub const FILE_HEADER_BUILD_NUMBER: usize = 0x0C;
    /// Size of `DUMP_BLOB_HEADER`.
    pub const BLOB_HEADER_SIZE: usize = 0x20;
    /// Offset of `DUMP_BLOB_HEADER.HeaderSize`.
    pub const HEADER_SIZE: usize = 0x00;
    /// Offset of `DUMP_BLOB_HEADER.Tag`.
    pub const TAG: usize = 0x04;
    /// Offset of `DUMP_BLOB_HEADER.DataSize`.
    pub const DATA_SIZE: usize = 0x14;
    /// Offset of `DUMP_BLOB_HEADER.PrePad`.
    pub const PRE_PAD: usize = 0x18;
    /// Offset of `DUMP_BLOB_HEADER.PostPad`.
    pub const POST_PAD: usize = 0x1C;
    /// Blob headers sit on multiples of this.
    pub const ALIGN: usize = 8;
    /// `BuildNumber` this writer records: a free build of
    /// [`super::header64::MINOR_VERSION_BUILD`].
    pub const BUILD_NUMBER: u32 = 0xF000_0000 | super::header64::MINOR_VERSION_BUILD;
}
