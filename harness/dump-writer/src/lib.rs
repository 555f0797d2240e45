//! # crashmon-dump-writer: 64-bit Windows kernel crash dumps, written on the bug-check path
//!
//! crashmon's test guest cannot run Windows, yet it must hand the crash-monitor card exactly
//! what Windows hands a `KbCallbackDumpIo` callback: the pieces of a genuine 64-bit kernel crash
//! dump, each as a `KBUGCHECK_DUMP_IO { Offset, Buffer, BufferLength, Type }`. This crate writes
//! such a dump of the guest's physical memory through a [`DumpSink`], one `dump_io` call per
//! piece, ending with `KbDumpIoComplete`.
//!
//! It runs where Windows' own dump writer runs: `#![no_std]`, no allocator, no locks, no waits,
//! no `unsafe`, and no panics on any input. Every buffer comes from the caller: the header is
//! built in caller-provided `scratch` memory (see [`scratch_size`]), memory pages are borrowed
//! from a [`PhysicalMemory`], and secondary data from the [`DumpPlan`].
//!
//! ## The file
//!
//! Two kinds of dump are written, both `DUMP_HEADER64` dumps that Windows' debuggers,
//! [kdmp-parser](https://github.com/0vercl0k/kdmp-parser-rs), Volatility and friends read:
//!
//! ```text
//! full dump (DumpType 1)                     bitmap dump (DumpType 5)
//! 0x0000  DUMP_HEADER64 (0x2000 bytes)        0x0000  DUMP_HEADER64 (0x2000 bytes)
//! 0x2000  every page of Run[0], in order      0x2000  SUMMARY_DUMP64 "SDMP" + bitmap,
//!         every page of Run[1] ...                    zero-padded to a page boundary
//!         ...                                 FirstPage  each page whose bit is set,
//!                                                     in increasing PFN order
//! then, if there are secondary blobs, at the end of the primary data:
//!         DUMP_BLOB_FILE_HEADER, then DUMP_BLOB_HEADER + data + padding per blob
//! ```
//!
//! The file is exactly `RequiredDumpSpace` bytes long; [`DumpLayout`] gives every offset.
//!
//! ### `DUMP_HEADER64` (offsets in [`format::header64`])
//!
//! The header is first filled with the ASCII pattern "PAGE", as Windows does, and then:
//!
//! | offset | field | value written |
//! |---|---|---|
//! | 0x000 | `Signature` | "PAGE" |
//! | 0x004 | `ValidDump` | "DU64" |
//! | 0x008 | `MajorVersion` | 0xF (free build) |
//! | 0x00C | `MinorVersion` | 26100 ([`format::header64::MINOR_VERSION_BUILD`]) |
//! | 0x010 | `DirectoryTableBase` | [`DumpPlan::directory_table_base`] |
//! | 0x018 | `PfnDataBase` | [`DumpPlan::pfn_database`] |
//! | 0x020 | `PsLoadedModuleList` | [`DumpPlan::ps_loaded_module_list`] |
//! | 0x028 | `PsActiveProcessHead` | [`DumpPlan::ps_active_process_head`] |
//! | 0x030 | `MachineImageType` | 0x8664 |
//! | 0x034 | `NumberProcessors` | [`DumpPlan::number_processors`] |
//! | 0x038 | `BugCheckCode` | [`BugCheck::code`] |
//! | 0x040 | `BugCheckParameter1..4` | [`BugCheck::parameters`] |
//! | 0x080 | `KdDebuggerDataBlock` | [`DumpPlan::kd_debugger_data_block`] |
//! | 0x088 | `PhysicalMemoryBlock` | `NumberOfRuns` (u32, then 4 zero bytes), `NumberOfPages` (u64) at 0x090, `Run[]` (`BasePage`, `PageCount`: u64 each) from 0x098; at most [`MAX_RUNS`] runs fit the 700-byte buffer |
//! | 0x348 | `ContextRecord` | the AMD64 [`Context`] (0x4D0 bytes) |
//! | 0xF00 | `Exception` | an `EXCEPTION_RECORD64` recording the bug check (see [`format::exception_record64`]) |
//! | 0xF98 | `DumpType` | 1 (full) or 5 (bitmap) |
//! | 0xFA0 | `RequiredDumpSpace` | the file's size in bytes |
//! | 0xFA8 | `SystemTime` | [`DumpPlan::system_time`] |
//! | 0x1030 | `SystemUpTime` | [`DumpPlan::system_up_time`] |
//! | 0x103C | `SecondaryDataState` | 0 (`STATUS_SUCCESS`) |
//!
//! ### Bitmap dump header (offsets in [`format::summary_dump64`])
//!
//! At 0x2000: `Signature` "SDMP", `ValidDump` "DUMP", `DumpOptions` 0, then at 0x20 `FirstPage`
//! (file offset of the first page), at 0x28 `TotalPresentPages` (set bits), at 0x30 `Pages` (bits
//! in the bitmap: the end PFN of the last run), and the bitmap from 0x38: bit `n` (bit `n % 8`
//! of byte `n / 8`) set when page `n` is in the file.
//!
//! ### Secondary data (offsets in [`format::blob`])
//!
//! Windows appends the data its `KbCallbackSecondaryDumpData` callbacks return after the primary
//! dump, as tagged blobs: one 16-byte `DUMP_BLOB_FILE_HEADER` ("Dump", "Blob", `HeaderSize`,
//! `BuildNumber`) and, per blob, a 32-byte `DUMP_BLOB_HEADER` (`HeaderSize`, the GUID `Tag`,
//! `DataSize`, `PrePad`, `PostPad`) at an 8-byte-aligned offset, followed by the data and
//! `PostPad` zero bytes up to the next 8-byte boundary. There is no count; the blobs run to the
//! end of the file. A parser of the primary dump never looks past the primary data, so the blobs
//! do not disturb it. [`find_secondary_blob`] and [`secondary_blobs`] read them back.
//!
//! ## The `dump_io` calls
//!
//! | call | `kind` | bytes |
//! |---|---|---|
//! | header | [`DumpIoType::Header`] | `[0, FirstPage)`: `DUMP_HEADER64`, and for bitmap dumps the bitmap header, bitmap and padding, in one call |
//! | body | [`DumpIoType::Body`] | the pages; each call holds at most [`DumpPlan::chunk_size`] bytes of consecutive pages (several pages per call only when [`PhysicalMemory::pages`] lends them as one slice, else one call per page) |
//! | secondary | [`DumpIoType::SecondaryData`] | the blob file header, then per blob its header, its data (at most `chunk_size` bytes per call) and its padding; no call is ever empty |
//! | complete | [`DumpIoType::Complete`] | offset `u64::MAX`, empty buffer: always the last call |
//!
//! With [`WriteOrder::Sequential`] every call's offset is `u64::MAX` (Windows' -1: "after the
//! previous call") and the calls come in file order: header, body, secondary data, complete.
//! With [`WriteOrder::OutOfOrder`] every call except the last carries its explicit file offset
//! and the file is written back to front within each part: the body's chunks in reverse order,
//! then the header, then the secondary data in reverse order, then complete. Both orders
//! produce byte-identical files.
//!
//! If [`write_dump`] returns an error after it started writing (a page of the wrong size, or a
//! sink reporting [`DumpSink::failed`]), the `Complete` call is not made: the dump is incomplete.
//! Every check on the plan itself happens before the first call.
//!
//! ## Sources
//!
//! The layouts were written from public descriptions of the format, not from anyone's code:
//! the field list of `DUMP_HEADER64` in Microsoft's `windows` crate documentation, and the byte
//! offsets as kdmp-parser (0vercl0k) and Volatility 3's crash-dump layer read them (header of two
//! pages, 700-byte `PhysicalMemoryBlockBuffer`, 3000-byte `ContextRecord`, `DumpType` at 0xF98,
//! the bitmap header at 0x2000 with `FirstPage`, `TotalPresentPages` and `Pages` at
//! 0x20/0x28/0x30 and the bitmap at 0x38); `CONTEXT`, `XMM_SAVE_AREA32`, `EXCEPTION_RECORD64` and
//! `PHYSICAL_MEMORY_DESCRIPTOR64` as the Windows SDK headers declare them; `KBUGCHECK_DUMP_IO`
//! from the WDK documentation. `DUMP_BLOB_FILE_HEADER` / `DUMP_BLOB_HEADER` field offsets come
//! from type listings generated from Microsoft's public symbols (sizes 0x10 and 0x20), their
//! placement after the primary data from Microsoft's published dump tooling samples that append
//! secondary blobs that way, and the signatures "Dump"/"Blob" and the 8-byte alignment of blob
//! headers from Windows' dump header definitions as quoted publicly.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

mod context;
mod extent;
pub mod format;

pub use context::{
    Context, XmmSaveArea32, CONTEXT_ALL, CONTEXT_AMD64, CONTEXT_CONTROL, CONTEXT_DEBUG_REGISTERS,
    CONTEXT_FLOATING_POINT, CONTEXT_FULL, CONTEXT_INTEGER, CONTEXT_SEGMENTS, M128A,
};
pub use crashmon_card_abi::DumpIoType;

use extent::{Backward, Extent, Forward, Selection};
use format::summary_dump64 as sd;
use format::{blob, exception_record64 as exr, header64 as h, physical_memory_descriptor64 as pmd};

/// Size of a physical page, and the unit of every run and of the bitmap.
pub const PAGE_SIZE: usize = 0x1000;
/// Size of `DUMP_HEADER64`: the first two pages of the file.
pub const HEADER_SIZE: usize = 0x2000;
/// Size of the AMD64 `CONTEXT` record.
pub const CONTEXT_SIZE: usize = 0x4D0;
/// Most runs the header's `PhysicalMemoryBlock` holds (42).
pub const MAX_RUNS: usize = pmd::MAX_RUNS;
/// One past the highest PFN a run may reach: 52-bit physical addresses.
pub const MAX_PFN: u64 = 1 << 40;

const PAGE: u64 = PAGE_SIZE as u64;

/// Tag of the test guest's own secondary blob, its report of callbacks that broke the
/// bug-check rules: `{C4A50D02-6775-4573-8000-7265706F7274}` ("report"), as the 16 bytes of a
/// `GUID` in memory (`Data1`..`Data3` little endian). The guest writes the blob, the harness
/// looks for it; both take the tag from here.
pub const GUEST_REPORT_GUID: [u8; 16] = [
    0x02, 0x0D, 0xA5, 0xC4, 0x75, 0x67, 0x73, 0x45, 0x80, 0x00, b'r', b'e', b'p', b'o', b'r', b't',
];

/// A `PHYSICAL_MEMORY_RUN64`: `page_count` pages of physical memory from PFN `base_page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Run {
    /// First PFN of the run (physical address / 4 KiB).
    pub base_page: u64,
    /// Number of pages; at least 1.
    pub page_count: u64,
}

/// The bug check being recorded: `KeBugCheckEx`'s arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BugCheck {
    /// `BugCheckCode`.
    pub code: u32,
    /// `BugCheckParameter1..4`.
    pub parameters: [u64; 4],
}

/// Which pages the dump holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpKind<'a> {
    /// `DumpType` 1: every page of every run.
    Full,
    /// `DumpType` 5: the pages whose bit is set.
    Bitmap {
        /// Bit `n` (bit `n % 8` of byte `n / 8`) set = include the page with PFN `n`. It must
        /// cover the runs (at least `ceil(end / 8)` bytes, `end` being the last run's end PFN),
        /// and no bit may be set for a PFN outside the runs.
        bitmap: &'a [u8],
    },
}

/// How the `dump_io` calls address the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteOrder {
    /// Every call's offset is `u64::MAX` (Windows' -1): each call continues where the previous
    /// one ended, in file order.
    Sequential,
    /// Every data call carries its explicit file offset, and each part of the file is written
    /// back to front: the body in reverse chunk order before the header, then the secondary
    /// data in reverse order.
    OutOfOrder,
}

/// One blob of secondary dump data, as a `KbCallbackSecondaryDumpData` callback returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecondaryBlob<'a> {
    /// The blob's tag: a GUID in its in-memory layout (`Data1` little endian, `Data2`, `Data3`,
    /// then the 8 bytes of `Data4`).
    pub guid: [u8; 16],
    /// The data; at most `u32::MAX` bytes.
    pub data: &'a [u8],
}

/// Everything [`write_dump`] needs to know about the crash.
#[derive(Clone, Copy, Debug)]
pub struct DumpPlan<'a> {
    /// Full or bitmap dump.
    pub kind: DumpKind<'a>,
    /// Sequential or explicit-offset writes.
    pub order: WriteOrder,
    /// The bug check.
    pub bugcheck: BugCheck,
    /// The crashing processor's registers.
    pub context: &'a Context,
    /// CR3 of the crashing processor.
    pub directory_table_base: u64,
    /// The physical memory that exists (`PhysicalMemoryBlock`): sorted by `base_page`, not
    /// overlapping, none empty, at most [`MAX_RUNS`], each ending at or below [`MAX_PFN`].
    pub runs: &'a [Run],
    /// `NumberProcessors`.
    pub number_processors: u32,
    /// `KdDebuggerDataBlock` (0 when there is none).
    pub kd_debugger_data_block: u64,
    /// `PsLoadedModuleList` (0 when there is none).
    pub ps_loaded_module_list: u64,
    /// `PsActiveProcessHead` (0 when there is none).
    pub ps_active_process_head: u64,
    /// `PfnDataBase` (0 when there is none).
    pub pfn_database: u64,
    /// Secondary dump data, written after the primary dump in this order.
    pub secondary: &'a [SecondaryBlob<'a>],
    /// `SystemTime`: 100 ns units since 1601-01-01 UTC.
    pub system_time: u64,
    /// `SystemUpTime`: 100 ns units since boot.
    pub system_up_time: u64,
    /// Most bytes in one body or secondary-data call: a non-zero multiple of [`PAGE_SIZE`], at
    /// most `u32::MAX` (e.g. 64 KiB). The header goes out in one call whatever its size.
    pub chunk_size: usize,
}

/// Where the pages come from.
pub trait PhysicalMemory {
    /// The 4 KiB page with this PFN: exactly [`PAGE_SIZE`] bytes. Only asked for PFNs inside
    /// the plan's runs.
    fn page(&self, pfn: u64) -> &[u8];

    /// Optionally, the `count` consecutive pages from `first_pfn` as one slice of
    /// `count * PAGE_SIZE` bytes, so that one body call can carry up to
    /// [`DumpPlan::chunk_size`] bytes. Only asked for pages inside one run. The default
    /// returns `None`, and the writer then makes one call per page with [`PhysicalMemory::page`].
    fn pages(&self, first_pfn: u64, count: u64) -> Option<&[u8]> {
        let _ = (first_pfn, count);
        None
    }
}

/// Where the dump goes: a `KbCallbackDumpIo` callback.
pub trait DumpSink {
    /// One `KBUGCHECK_DUMP_IO`: `buffer` belongs at file offset `offset`, or right after the
    /// previous call's bytes when `offset` is `u64::MAX`. `kind` is [`DumpIoType::Complete`]
    /// with an empty buffer for the last call.
    fn dump_io(&mut self, offset: u64, buffer: &[u8], kind: DumpIoType);

    /// Whether the sink has given up (e.g. the device stopped answering). Checked after every
    /// call; when it returns true [`write_dump`] stops with [`DumpError::SinkFailed`]. The
    /// default never gives up.
    fn failed(&self) -> bool {
        false
    }
}

impl<S: DumpSink + ?Sized> DumpSink for &mut S {
    fn dump_io(&mut self, offset: u64, buffer: &[u8], kind: DumpIoType) {
        (**self).dump_io(offset, buffer, kind);
    }
    fn failed(&self) -> bool {
        (**self).failed()
    }
}

/// Why a dump could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DumpError {
    /// The plan has no runs.
    NoRuns,
    /// More runs than `PhysicalMemoryBlock` holds.
    TooManyRuns {
        /// Runs in the plan.
        count: usize,
        /// [`MAX_RUNS`].
        max: usize,
    },
    /// A run has no pages.
    EmptyRun {
        /// Index of the run.
        index: usize,
    },
    /// A run reaches past [`MAX_PFN`].
    RunOutOfRange {
        /// Index of the run.
        index: usize,
    },
    /// A run starts before the previous one ends: the runs overlap or are not sorted.
    RunsOverlapOrUnsorted {
        /// Index of the offending run (its predecessor is `index - 1`).
        index: usize,
    },
    /// The bitmap has fewer bytes than the runs need.
    BitmapTooShort {
        /// Bytes needed.
        needed: u64,
        /// Bytes given.
        got: usize,
    },
    /// The bitmap selects a page that is in no run.
    BitmapPageOutsideRuns {
        /// The first such PFN.
        pfn: u64,
    },
    /// `chunk_size` is 0, not a multiple of [`PAGE_SIZE`], or above `u32::MAX`.
    BadChunkSize {
        /// The plan's `chunk_size`.
        chunk_size: usize,
    },
    /// A secondary blob is larger than `DataSize` (u32) can say.
    BlobTooLarge {
        /// Index of the blob.
        index: usize,
    },
    /// The dump's size, or its header region, does not fit the format's fields or the address
    /// space.
    TooLarge,
    /// `scratch` is smaller than [`scratch_size`].
    ScratchTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// [`PhysicalMemory::page`] or [`PhysicalMemory::pages`] returned a slice of the wrong
    /// length. The dump is left incomplete.
    BadPage {
        /// First PFN asked for.
        pfn: u64,
        /// Bytes expected.
        expected: u64,
        /// Bytes returned.
        got: usize,
    },
    /// [`DumpSink::failed`] returned true. The dump is left incomplete.
    SinkFailed,
}

impl core::fmt::Display for DumpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::NoRuns => write!(f, "the plan has no physical memory runs"),
            Self::TooManyRuns { count, max } => {
                write!(f, "{count} runs, but the dump header holds at most {max}")
            }
            Self::EmptyRun { index } => write!(f, "run {index} has no pages"),
            Self::RunOutOfRange { index } => {
                write!(f, "run {index} reaches past the 52-bit physical address space")
            }
            Self::RunsOverlapOrUnsorted { index } => {
                write!(f, "run {index} starts before run {} ends", index.wrapping_sub(1))
            }
            Self::BitmapTooShort { needed, got } => {
                write!(f, "the bitmap has {got} bytes but the runs need {needed}")
            }
            Self::BitmapPageOutsideRuns { pfn } => {
                write!(f, "the bitmap selects PFN {pfn:#x}, which is in no run")
            }
            Self::BadChunkSize { chunk_size } => write!(
                f,
                "chunk size {chunk_size:#x} is not a non-zero multiple of {PAGE_SIZE:#x} that fits in 32 bits"
            ),
            Self::BlobTooLarge { index } => write!(f, "secondary blob {index} exceeds 4 GiB"),
            Self::TooLarge => write!(f, "the dump does not fit the format's size fields"),
            Self::ScratchTooSmall { needed, got } => {
                write!(f, "scratch has {got} bytes but the header needs {needed}")
            }
            Self::BadPage { pfn, expected, got } => write!(
                f,
                "physical memory returned {got} bytes for PFN {pfn:#x}, expected {expected}"
            ),
            Self::SinkFailed => write!(f, "the dump sink failed"),
        }
    }
}

impl core::error::Error for DumpError {}

/// Where everything goes in the file a plan produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DumpLayout {
    /// `DumpType`: [`format::header64::DUMP_TYPE_FULL`] or
    /// [`format::header64::DUMP_TYPE_BITMAP`].
    pub dump_type: u32,
    /// Pages in all runs (`PhysicalMemoryBlock.NumberOfPages`).
    pub total_pages: u64,
    /// Pages in the file.
    pub present_pages: u64,
    /// Bits in the bitmap (`Pages`); 0 for a full dump.
    pub bitmap_bits: u64,
    /// File offset of the first page; also the size of the header call and of the scratch
    /// memory needed.
    pub first_page: u64,
    /// File offset of the secondary data: the end of the primary dump.
    pub secondary_offset: u64,
    /// Bytes of secondary data (0 without blobs).
    pub secondary_size: u64,
    /// Size of the file (`RequiredDumpSpace`) and what [`write_dump`] returns.
    pub file_size: u64,
}

fn round_up(value: u64, to: u64) -> Option<u64> {
    value.checked_add(to - 1).map(|v| v / to * to)
}

/// Bytes a blob takes: its header, its data and the padding to the next 8-byte boundary.
fn blob_span(len: usize) -> Option<u64> {
    round_up(len as u64, blob::ALIGN as u64)?.checked_add(blob::BLOB_HEADER_SIZE as u64)
}

/// Bytes needed for a bitmap of `bits` bits.
fn bitmap_bytes(bits: u64) -> u64 {
    bits.div_ceil(8)
}

/// Checks a plan and computes where everything goes in its file. [`write_dump`] does exactly
/// this first; call it to learn the file size or the scratch size ahead of time.
pub fn layout(plan: &DumpPlan) -> Result<DumpLayout, DumpError> {
    let chunk_size = plan.chunk_size;
    if chunk_size == 0
        || !chunk_size.is_multiple_of(PAGE_SIZE)
        || u32::try_from(chunk_size).is_err()
    {
        return Err(DumpError::BadChunkSize { chunk_size });
    }
    let runs = plan.runs;
    if runs.is_empty() {
        return Err(DumpError::NoRuns);
    }
    if runs.len() > MAX_RUNS {
        return Err(DumpError::TooManyRuns { count: runs.len(), max: MAX_RUNS });
    }
    let mut total_pages = 0u64;
    let mut previous_end = 0u64;
    for (index, run) in runs.iter().enumerate() {
        if run.page_count == 0 {
            return Err(DumpError::EmptyRun { index });
        }
        let end = run.base_page.checked_add(run.page_count);
        if end.is_none_or(|end| end > MAX_PFN) {
            return Err(DumpError::RunOutOfRange { index });
        }
        if index > 0 && run.base_page < previous_end {
            return Err(DumpError::RunsOverlapOrUnsorted { index });
        }
        previous_end = run.base_page + run.page_count;
        total_pages += run.page_count;
    }
    let end_pfn = previous_end;

    let (dump_type, present_pages, bitmap_bits, first_page) = match plan.kind {
        DumpKind::Full => (h::DUMP_TYPE_FULL, total_pages, 0, HEADER_SIZE as u64),
        DumpKind::Bitmap { bitmap } => {
            let needed = bitmap_bytes(end_pfn);
            if (bitmap.len() as u64) < needed {
                return Err(DumpError::BitmapTooShort { needed, got: bitmap.len() });
            }
            let present: u64 = runs
                .iter()
                .map(|r| extent::count_ones(bitmap, r.base_page, r.base_page + r.page_count))
                .sum();
            let all_bits = bitmap.len() as u64 * 8;
            if extent::count_ones(bitmap, 0, all_bits) != present {
                return Err(DumpError::BitmapPageOutsideRuns {
                    pfn: first_set_outside(bitmap, runs).unwrap_or(0),
                });
            }
            let meta = round_up(HEADER_SIZE as u64 + sd::BITMAP as u64 + needed, PAGE)
                .ok_or(DumpError::TooLarge)?;
            (h::DUMP_TYPE_BITMAP, present, end_pfn, meta)
        }
    };
    // The header region goes out in one call (ULONG BufferLength) from scratch memory.
    if u32::try_from(first_page).is_err() || usize::try_from(first_page).is_err() {
        return Err(DumpError::TooLarge);
    }
    let secondary_offset = present_pages
        .checked_mul(PAGE)
        .and_then(|b| b.checked_add(first_page))
        .ok_or(DumpError::TooLarge)?;
    let mut secondary_size = 0u64;
    if !plan.secondary.is_empty() {
        secondary_size = blob::FILE_HEADER_SIZE as u64;
        for (index, b) in plan.secondary.iter().enumerate() {
            if u32::try_from(b.data.len()).is_err() {
                return Err(DumpError::BlobTooLarge { index });
            }
            secondary_size = blob_span(b.data.len())
                .and_then(|s| s.checked_add(secondary_size))
                .ok_or(DumpError::TooLarge)?;
        }
    }
    let file_size = secondary_offset.checked_add(secondary_size).ok_or(DumpError::TooLarge)?;
    if i64::try_from(file_size).is_err() {
        return Err(DumpError::TooLarge);
    }
    Ok(DumpLayout {
        dump_type,
        total_pages,
        present_pages,
        bitmap_bits,
        first_page,
        secondary_offset,
        secondary_size,
        file_size,
    })
}

/// The first PFN whose bit is set but which lies in no run.
fn first_set_outside(bitmap: &[u8], runs: &[Run]) -> Option<u64> {
    let all_bits = bitmap.len() as u64 * 8;
    let mut from = 0u64;
    for run in runs {
        if let Some(pfn) = extent::find_set(bitmap, from, run.base_page.min(all_bits)) {
            return Some(pfn);
        }
        from = run.base_page + run.page_count;
    }
    extent::find_set(bitmap, from, all_bits)
}

/// Bytes of `scratch` [`write_dump`] needs for `plan`: the header region, i.e. everything
/// before the first page.
///
/// * full dump: [`HEADER_SIZE`] (0x2000);
/// * bitmap dump: `HEADER_SIZE + round_up(0x38 + ceil(end_pfn / 8), PAGE_SIZE)`, where
///   `end_pfn` is the last run's `base_page + page_count` (0x38 is the bitmap header before the
///   bitmap). For example 4 GiB of memory ending at PFN 0x100000 needs 0x2000 + 0x21000 bytes.
///
/// It equals [`DumpLayout::first_page`] for a valid plan, and saturates for an absurd one
/// (which [`write_dump`] rejects anyway).
pub fn scratch_size(plan: &DumpPlan) -> usize {
    match plan.kind {
        DumpKind::Full => HEADER_SIZE,
        DumpKind::Bitmap { .. } => {
            let end_pfn = plan.runs.last().map_or(0, |r| r.base_page.saturating_add(r.page_count));
            let meta = (HEADER_SIZE as u64 + sd::BITMAP as u64)
                .saturating_add(bitmap_bytes(end_pfn))
                .saturating_add(PAGE - 1)
                / PAGE
                * PAGE;
            usize::try_from(meta).unwrap_or(usize::MAX)
        }
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    put(buf, at, &v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    put(buf, at, &v.to_le_bytes());
}

/// Builds `[0, first_page)` of the file in `meta` (exactly `first_page` bytes).
fn build_header(plan: &DumpPlan, layout: &DumpLayout, meta: &mut [u8]) {
    let (header, rest) = meta.split_at_mut(HEADER_SIZE.min(meta.len()));
    for word in header.chunks_exact_mut(4) {
        word.copy_from_slice(b"PAGE");
    }
    put_u32(header, h::SIGNATURE, h::SIGNATURE_VALUE);
    put_u32(header, h::VALID_DUMP, h::VALID_DUMP_VALUE);
    put_u32(header, h::MAJOR_VERSION, h::MAJOR_VERSION_FREE);
    put_u32(header, h::MINOR_VERSION, h::MINOR_VERSION_BUILD);
    put_u64(header, h::DIRECTORY_TABLE_BASE, plan.directory_table_base);
    put_u64(header, h::PFN_DATA_BASE, plan.pfn_database);
    put_u64(header, h::PS_LOADED_MODULE_LIST, plan.ps_loaded_module_list);
    put_u64(header, h::PS_ACTIVE_PROCESS_HEAD, plan.ps_active_process_head);
    put_u32(header, h::MACHINE_IMAGE_TYPE, h::MACHINE_AMD64);
    put_u32(header, h::NUMBER_PROCESSORS, plan.number_processors);
    put_u32(header, h::BUG_CHECK_CODE, plan.bugcheck.code);
    for (i, p) in plan.bugcheck.parameters.iter().enumerate() {
        put_u64(header, h::BUG_CHECK_PARAMETERS + 8 * i, *p);
    }
    put_u64(header, h::KD_DEBUGGER_DATA_BLOCK, plan.kd_debugger_data_block);

    let block = h::PHYSICAL_MEMORY_BLOCK;
    put_u32(header, block + pmd::NUMBER_OF_RUNS, plan.runs.len() as u32);
    put_u32(header, block + pmd::NUMBER_OF_RUNS + 4, 0);
    put_u64(header, block + pmd::NUMBER_OF_PAGES, layout.total_pages);
    for (i, run) in plan.runs.iter().enumerate() {
        let at = block + pmd::RUNS + i * pmd::RUN_SIZE;
        put_u64(header, at, run.base_page);
        put_u64(header, at + 8, run.page_count);
    }

    let context = h::CONTEXT_RECORD..h::CONTEXT_RECORD + CONTEXT_SIZE;
    if let Some(Ok(record)) = header.get_mut(context).map(<&mut [u8; CONTEXT_SIZE]>::try_from) {
        plan.context.write_to(record);
    }

    let e = h::EXCEPTION;
    put(header, e, &[0; exr::SIZE]);
    put_u32(header, e + exr::EXCEPTION_CODE, plan.bugcheck.code);
    put_u32(header, e + exr::EXCEPTION_FLAGS, exr::EXCEPTION_NONCONTINUABLE);
    put_u64(header, e + exr::EXCEPTION_ADDRESS, plan.context.rip);
    put_u32(header, e + exr::NUMBER_PARAMETERS, plan.bugcheck.parameters.len() as u32);
    for (i, p) in plan.bugcheck.parameters.iter().enumerate() {
        put_u64(header, e + exr::EXCEPTION_INFORMATION + 8 * i, *p);
    }

    put_u32(header, h::DUMP_TYPE, layout.dump_type);
    put_u64(header, h::REQUIRED_DUMP_SPACE, layout.file_size);
    put_u64(header, h::SYSTEM_TIME, plan.system_time);
    put_u64(header, h::SYSTEM_UP_TIME, plan.system_up_time);
    put_u32(header, h::SECONDARY_DATA_STATE, 0);

    if let DumpKind::Bitmap { bitmap } = plan.kind {
        rest.fill(0);
        put_u32(rest, sd::SIGNATURE, sd::SIGNATURE_SUMMARY);
        put_u32(rest, sd::VALID_DUMP, sd::VALID_DUMP_VALUE);
        put_u32(rest, sd::DUMP_OPTIONS, 0);
        put_u64(rest, sd::FIRST_PAGE, layout.first_page);
        put_u64(rest, sd::TOTAL_PRESENT_PAGES, layout.present_pages);
        put_u64(rest, sd::PAGES, layout.bitmap_bits);
        let bytes = bitmap_bytes(layout.bitmap_bits) as usize;
        if let Some(src) = bitmap.get(..bytes) {
            put(rest, sd::BITMAP, src);
        }
    }
}

/// Sends calls to the sink in the plan's order.
struct Out<'s, S: DumpSink> {
    sink: &'s mut S,
    sequential: bool,
}

impl<S: DumpSink> Out<'_, S> {
    fn io(&mut self, offset: u64, buffer: &[u8], kind: DumpIoType) -> Result<(), DumpError> {
        if buffer.is_empty() {
            return Ok(());
        }
        let offset = if self.sequential { u64::MAX } else { offset };
        self.sink.dump_io(offset, buffer, kind);
        if self.sink.failed() {
            return Err(DumpError::SinkFailed);
        }
        Ok(())
    }
}

fn write_extent<S: DumpSink>(
    out: &mut Out<'_, S>,
    memory: &impl PhysicalMemory,
    e: Extent,
    reverse: bool,
) -> Result<(), DumpError> {
    if let Some(data) = memory.pages(e.pfn, e.count) {
        let expected = e.count * PAGE;
        if data.len() as u64 != expected {
            return Err(DumpError::BadPage { pfn: e.pfn, expected, got: data.len() });
        }
        return out.io(e.offset, data, DumpIoType::Body);
    }
    for i in 0..e.count {
        let i = if reverse { e.count - 1 - i } else { i };
        let pfn = e.pfn + i;
        let page = memory.page(pfn);
        if page.len() != PAGE_SIZE {
            return Err(DumpError::BadPage { pfn, expected: PAGE, got: page.len() });
        }
        out.io(e.offset + i * PAGE, page, DumpIoType::Body)?;
    }
    Ok(())
}

/// The blob file header.
fn blob_file_header() -> [u8; blob::FILE_HEADER_SIZE] {
    let mut b = [0u8; blob::FILE_HEADER_SIZE];
    put_u32(&mut b, 0, blob::SIGNATURE1);
    put_u32(&mut b, 4, blob::SIGNATURE2);
    put_u32(&mut b, blob::FILE_HEADER_HEADER_SIZE, blob::FILE_HEADER_SIZE as u32);
    put_u32(&mut b, blob::FILE_HEADER_BUILD_NUMBER, blob::BUILD_NUMBER);
    b
}

/// A blob's header and the number of padding bytes after its data.
fn blob_header(b: &SecondaryBlob) -> ([u8; blob::BLOB_HEADER_SIZE], usize) {
    let pad = (blob::ALIGN - b.data.len() % blob::ALIGN) % blob::ALIGN;
    let mut hdr = [0u8; blob::BLOB_HEADER_SIZE];
    put_u32(&mut hdr, blob::HEADER_SIZE, blob::BLOB_HEADER_SIZE as u32);
    put(&mut hdr, blob::TAG, &b.guid);
    put_u32(&mut hdr, blob::DATA_SIZE, b.data.len() as u32);
    put_u32(&mut hdr, blob::PRE_PAD, 0);
    put_u32(&mut hdr, blob::POST_PAD, pad as u32);
    (hdr, pad)
}

/// Writes one blob (header, data chunks, padding) whose header is at `at`.
fn write_blob<S: DumpSink>(
    out: &mut Out<'_, S>,
    b: &SecondaryBlob,
    at: u64,
    chunk: usize,
    reverse: bool,
) -> Result<(), DumpError> {
    const ZEROS: [u8; blob::ALIGN] = [0; blob::ALIGN];
    let (hdr, pad) = blob_header(b);
    let data_at = at + blob::BLOB_HEADER_SIZE as u64;
    let pad_at = data_at + b.data.len() as u64;
    let kind = DumpIoType::SecondaryData;
    if reverse {
        out.io(pad_at, &ZEROS[..pad], kind)?;
        let chunks = b.data.len().div_ceil(chunk);
        for c in (0..chunks).rev() {
            let start = c * chunk;
            let piece = b.data.get(start..b.data.len().min(start + chunk)).unwrap_or(&[]);
            out.io(data_at + start as u64, piece, kind)?;
        }
        out.io(at, &hdr, kind)
    } else {
        out.io(at, &hdr, kind)?;
        for (c, piece) in b.data.chunks(chunk).enumerate() {
            out.io(data_at + (c * chunk) as u64, piece, kind)?;
        }
        out.io(pad_at, &ZEROS[..pad], kind)
    }
}

fn write_secondary<S: DumpSink>(
    out: &mut Out<'_, S>,
    plan: &DumpPlan,
    layout: &DumpLayout,
    reverse: bool,
) -> Result<(), DumpError> {
    if plan.secondary.is_empty() {
        return Ok(());
    }
    let file_header = blob_file_header();
    let first_blob = layout.secondary_offset + blob::FILE_HEADER_SIZE as u64;
    // Spans were checked by `layout`, so these sums cannot overflow.
    let span = |b: &SecondaryBlob| blob_span(b.data.len()).unwrap_or(0);
    if reverse {
        let mut at = layout.file_size;
        for b in plan.secondary.iter().rev() {
            at -= span(b);
            write_blob(out, b, at, plan.chunk_size, true)?;
        }
        out.io(layout.secondary_offset, &file_header, DumpIoType::SecondaryData)
    } else {
        out.io(layout.secondary_offset, &file_header, DumpIoType::SecondaryData)?;
        let mut at = first_blob;
        for b in plan.secondary {
            write_blob(out, b, at, plan.chunk_size, false)?;
            at += span(b);
        }
        Ok(())
    }
}

/// Writes the whole dump described by `plan` through `sink`, ending with the
/// `KbDumpIoComplete` call (offset `u64::MAX`, empty buffer), and returns the dump file's size
/// in bytes.
///
/// `scratch` is the caller's memory for the header region (the `DUMP_HEADER64`, and for a bitmap
/// dump the bitmap header, the bitmap and the padding to the first page): at least
/// [`scratch_size`]`(plan)` bytes. Only that prefix is used. It must stay untouched until the
/// function returns.
///
/// The plan is checked completely before the first call (see [`layout`]); an invalid plan makes
/// no call at all. An error after that ([`DumpError::BadPage`], [`DumpError::SinkFailed`])
/// stops the dump without the `Complete` call.
pub fn write_dump(
    plan: &DumpPlan,
    memory: &impl PhysicalMemory,
    scratch: &mut [u8],
    sink: &mut impl DumpSink,
) -> Result<u64, DumpError> {
    let layout = layout(plan)?;
    let meta_len = layout.first_page as usize;
    let got = scratch.len();
    let Some(meta) = scratch.get_mut(..meta_len) else {
        return Err(DumpError::ScratchTooSmall { needed: meta_len, got });
    };
    build_header(plan, &layout, meta);

    let selection = Selection {
        runs: plan.runs,
        bitmap: match plan.kind {
            DumpKind::Full => None,
            DumpKind::Bitmap { bitmap } => Some(bitmap),
        },
        cap: (plan.chunk_size / PAGE_SIZE) as u64,
    };
    let sequential = plan.order == WriteOrder::Sequential;
    let mut out = Out { sink, sequential };
    if sequential {
        out.io(0, meta, DumpIoType::Header)?;
        for e in Forward::new(selection, layout.first_page) {
            write_extent(&mut out, memory, e, false)?;
        }
        write_secondary(&mut out, plan, &layout, false)?;
    } else {
        for e in Backward::new(selection, layout.secondary_offset) {
            write_extent(&mut out, memory, e, true)?;
        }
        out.io(0, meta, DumpIoType::Header)?;
        write_secondary(&mut out, plan, &layout, true)?;
    }
    out.sink.dump_io(u64::MAX, &[], DumpIoType::Complete);
    if out.sink.failed() {
        return Err(DumpError::SinkFailed);
    }
    Ok(layout.file_size)
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    let lo = get_u32(buf, at)?;
    let hi = get_u32(buf, at.checked_add(4)?)?;
    Some(u64::from(lo) | u64::from(hi) << 32)
}

/// File offset where a dump's primary data ends (and its secondary data, if any, begins), read
/// from the dump's own headers: `0x2000 + pages * 0x1000` for a full dump (pages summed over
/// `PhysicalMemoryBlock`'s runs), `FirstPage + TotalPresentPages * 0x1000` for a bitmap dump.
/// `None` if `dump` does not start with a 64-bit full or bitmap dump header.
pub fn primary_data_end(dump: &[u8]) -> Option<u64> {
    if get_u32(dump, h::SIGNATURE)? != h::SIGNATURE_VALUE
        || get_u32(dump, h::VALID_DUMP)? != h::VALID_DUMP_VALUE
    {
        return None;
    }
    match get_u32(dump, h::DUMP_TYPE)? {
        h::DUMP_TYPE_FULL => {
            let block = h::PHYSICAL_MEMORY_BLOCK;
            let runs = get_u32(dump, block + pmd::NUMBER_OF_RUNS)? as usize;
            if runs > MAX_RUNS {
                return None;
            }
            let mut pages = 0u64;
            for i in 0..runs {
                let count = get_u64(dump, block + pmd::RUNS + i * pmd::RUN_SIZE + 8)?;
                pages = pages.checked_add(count)?;
            }
            pages.checked_mul(PAGE)?.checked_add(HEADER_SIZE as u64)
        }
        h::DUMP_TYPE_BITMAP => {
            let s = HEADER_SIZE;
            let sig = get_u32(dump, s + sd::SIGNATURE)?;
            if (sig != sd::SIGNATURE_SUMMARY && sig != sd::SIGNATURE_FULL)
                || get_u32(dump, s + sd::VALID_DUMP)? != sd::VALID_DUMP_VALUE
            {
                return None;
            }
            let first = get_u64(dump, s + sd::FIRST_PAGE)?;
            let present = get_u64(dump, s + sd::TOTAL_PRESENT_PAGES)?;
            present.checked_mul(PAGE)?.checked_add(first)
        }
        _ => None,
    }
}

/// The secondary blobs of a dump file, in file order; see [`secondary_blobs`].
#[derive(Clone, Debug)]
pub struct SecondaryBlobs<'d> {
    dump: &'d [u8],
    next: usize,
    end: usize,
}

impl<'d> Iterator for SecondaryBlobs<'d> {
    type Item = SecondaryBlob<'d>;

    fn next(&mut self) -> Option<SecondaryBlob<'d>> {
        let item = self.parse_one();
        if item.is_none() {
            self.next = self.end;
        }
        item
    }
}

impl<'d> SecondaryBlobs<'d> {
    fn parse_one(&mut self) -> Option<SecondaryBlob<'d>> {
        let at = self.next;
        let header_end = at.checked_add(blob::BLOB_HEADER_SIZE)?;
        if header_end > self.end {
            return None;
        }
        let header = self.dump.get(at..header_end)?;
        let header_size = get_u32(header, blob::HEADER_SIZE)? as usize;
        if header_size < blob::BLOB_HEADER_SIZE {
            return None;
        }
        let mut guid = [0u8; 16];
        guid.copy_from_slice(header.get(blob::TAG..blob::TAG + 16)?);
        let data_size = get_u32(header, blob::DATA_SIZE)? as usize;
        let pre_pad = get_u32(header, blob::PRE_PAD)? as usize;
        let post_pad = get_u32(header, blob::POST_PAD)? as usize;
        let data_start = at.checked_add(header_size)?.checked_add(pre_pad)?;
        let data_end = data_start.checked_add(data_size)?;
        if data_end > self.end {
            return None;
        }
        let data = self.dump.get(data_start..data_end)?;
        self.next = data_end.checked_add(post_pad).unwrap_or(self.end);
        Some(SecondaryBlob { guid, data })
    }
}

/// Walks the secondary dump data of a dump file's bytes: the `DUMP_BLOB_FILE_HEADER` at
/// [`primary_data_end`] and the blobs after it, up to `RequiredDumpSpace` (or the end of `dump`
/// if that is shorter). Yields nothing if the dump has no (valid) secondary data; stops at the
/// first blob header that does not fit. Never panics, whatever the bytes.
pub fn secondary_blobs(dump: &[u8]) -> SecondaryBlobs<'_> {
    let none = SecondaryBlobs { dump, next: 0, end: 0 };
    let Some(start) = primary_data_end(dump).and_then(|s| usize::try_from(s).ok()) else {
        return none;
    };
    let required = get_u64(dump, h::REQUIRED_DUMP_SPACE)
        .and_then(|r| usize::try_from(r).ok())
        .unwrap_or(usize::MAX);
    let end = dump.len().min(required);
    let Some(file_header) = start
        .checked_add(blob::FILE_HEADER_SIZE)
        .filter(|&e| e <= end)
        .and_then(|e| dump.get(start..e))
    else {
        return none;
    };
    if get_u32(file_header, 0) != Some(blob::SIGNATURE1)
        || get_u32(file_header, 4) != Some(blob::SIGNATURE2)
    {
        return none;
    }
    let Some(header_size) = get_u32(file_header, blob::FILE_HEADER_HEADER_SIZE) else {
        return none;
    };
    if (header_size as usize) < blob::FILE_HEADER_SIZE {
        return none;
    }
    match start.checked_add(header_size as usize) {
        Some(next) if next <= end => SecondaryBlobs { dump, next, end },
        _ => none,
    }
}

/// The data of the first secondary blob tagged `guid` in a dump file's bytes (as written by
/// [`write_dump`], or by Windows), or `None`.
pub fn find_secondary_blob<'d>(dump: &'d [u8], guid: &[u8; 16]) -> Option<&'d [u8]> {
    secondary_blobs(dump).find(|b| b.guid == *guid).map(|b| b.data)
}
