//! # Dump: the plan for `crashmon-dump-writer`
//!
//! Turns what the bug check gathered ([`Crash`], handed in by [`crate::bugcheck`]) into a
//! [`DumpPlan`] and writes it to a [`DumpSink`] (the bug check's: every DumpIo callback):
//!
//! * `CONTEXT`: the crashing processor's registers (from `KeBugCheckEx`'s capture or the trap
//!   frame), with CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS;
//! * `DirectoryTableBase`: CR3, so the harness can translate virtual addresses through the
//!   dump's own page tables;
//! * runs: the RAM entries of the PVH memory map, in whole pages;
//! * full dump (type 1): every page of every run; bitmap dump (type 5): the pages in use, i.e.
//!   every RAM page except the free ones ([`Settings::is_free`]: the workload's), plus the pages
//!   AddPages callbacks added;
//! * sequential (Offset -1) or out-of-order (explicit offsets) writes;
//! * `SystemTime` from the CMOS clock; `SystemUpTime` 0 (the guest keeps no calibrated clock);
//!   no `KdDebuggerDataBlock`, module list, process list or PFN database (all 0).
//!
//! The pages are read in place through the physical-memory alias ([`boot::PHYSMAP_BASE`]):
//! nothing is copied, so the only memory the dump writer writes is its header scratch (in
//! `.bss.crashmon_volatile`). Everything else comes in as arguments: this module reads no other
//! module's state and calls nothing above it.

use core::arch::asm;

use crashmon_dump_writer::{
    write_dump as write, BugCheck, Context, DumpError, DumpKind, DumpPlan, DumpSink,
    PhysicalMemory, Run, SecondaryBlob, WriteOrder, CONTEXT_CONTROL, CONTEXT_INTEGER,
    CONTEXT_SEGMENTS, MAX_RUNS, PAGE_SIZE,
};

use crate::boot::{self, BootInfo};
use crate::global::Global;
use crate::trap::TrapFrame;
use crate::{cmos, gdt, println};

/// Full or bitmap dump (`dump=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpChoice {
    /// Type 1.
    Full,
    /// Type 5.
    Bitmap,
}

/// How to write the dump: the command line's choices, and which pages are free.
#[derive(Clone, Copy)]
pub struct Settings {
    /// Full or bitmap.
    pub kind: DumpChoice,
    /// Sequential (Offset -1) or out of order.
    pub order: WriteOrder,
    /// Whether a page is free, so left out of a bitmap dump.
    pub is_free: fn(u64) -> bool,
}

impl Settings {
    /// A full dump in file order.
    pub const DEFAULT: Settings =
        Settings { kind: DumpChoice::Full, order: WriteOrder::Sequential, is_free: |_| false };
}

/// What the bug check gathered.
pub struct Crash<'a> {
    /// `KeBugCheckEx`'s code.
    pub code: u32,
    /// Its parameters 1..4.
    pub parameters: [u64; 4],
    /// Registers of the crashing processor.
    pub frame: &'a TrapFrame,
    /// Page ranges AddPages callbacks added: (first PFN, count).
    pub added: &'a [(u64, u64)],
    /// The secondary-data blobs, in the order they go into the dump.
    pub secondary: &'a [SecondaryBlob<'a>],
}

/// Bytes per body call: one card slot.
pub const CHUNK_SIZE: usize = 1 << 20;
/// RAM the bitmap can describe: 1 GiB (the harness gives the guest 128 MiB).
const BITMAP_BYTES: usize = (1 << 30) / PAGE_SIZE / 8;
/// Header scratch: the header plus the bitmap header and bitmap for 1 GiB.
const SCRATCH_BYTES: usize = 0x2000 + 0x1000 + BITMAP_BYTES;

#[repr(C, align(4096))]
struct Buffer<const N: usize>([u8; N]);

#[link_section = ".bss.crashmon_volatile"]
static BITMAP: Global<Buffer<BITMAP_BYTES>> = Global::new(Buffer([0; BITMAP_BYTES]));
#[link_section = ".bss.crashmon_volatile"]
static SCRATCH: Global<Buffer<SCRATCH_BYTES>> = Global::new(Buffer([0; SCRATCH_BYTES]));
#[link_section = ".bss.crashmon_volatile"]
static CONTEXT: Global<Context> = Global::new(Context::zeroed());

/// Physical memory through the physical-memory alias (not the identity map, where page 0 would
/// be a null pointer).
struct PhysMemory;

impl PhysicalMemory for PhysMemory {
    fn page(&self, pfn: u64) -> &[u8] {
        // SAFETY: the writer asks only for pages inside the runs, which are RAM and mapped at
        // PHYSMAP_BASE (below 4 GiB always; above it by `map_identity` at boot, which the alias
        // shares). Nothing writes them while the slice lives except the bug-check path's own
        // declared pages.
        unsafe {
            core::slice::from_raw_parts(
                boot::phys_to_virt(pfn * PAGE_SIZE as u64) as *const u8,
                PAGE_SIZE,
            )
        }
    }

    fn pages(&self, first_pfn: u64, count: u64) -> Option<&[u8]> {
        // SAFETY: as for `page`: the writer asks only for pages within one run.
        Some(unsafe {
            core::slice::from_raw_parts(
                boot::phys_to_virt(first_pfn * PAGE_SIZE as u64) as *const u8,
                count as usize * PAGE_SIZE,
            )
        })
    }
}

/// The runs: RAM entries of the memory map in whole pages, sorted, merged where they touch.
fn runs(info: &BootInfo, out: &mut [Run; MAX_RUNS]) -> usize {
    let mut n = 0;
    let mut ram: [(u64, u64); 64] = [(0, 0); 64];
    let mut count = 0;
    for r in info.ram() {
        if count < ram.len() {
            ram[count] = r;
            count += 1;
        }
    }
    let ram = &mut ram[..count];
    ram.sort_unstable();
    for &(start, end) in ram.iter() {
        let (base, pages) = (start / PAGE_SIZE as u64, (end - start) / PAGE_SIZE as u64);
        if n > 0 && out[n - 1].base_page + out[n - 1].page_count == base {
            out[n - 1].page_count += pages;
        } else if n < MAX_RUNS {
            out[n] = Run { base_page: base, page_count: pages };
            n += 1;
        }
    }
    n
}

fn context_of(f: &TrapFrame) -> Context {
    let mut c = Context::zeroed();
    c.context_flags = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS;
    let mut mxcsr: u32 = 0;
    // SAFETY: stores MXCSR into a local.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut mxcsr, options(nostack, preserves_flags)) };
    c.mx_csr = mxcsr;
    c.flt_save.mx_csr = mxcsr;
    c.seg_cs = f.cs as u16;
    c.seg_ss = f.ss as u16;
    c.seg_ds = gdt::KERNEL_DS;
    c.seg_es = gdt::KERNEL_DS;
    c.eflags = f.rflags as u32;
    (c.rax, c.rbx, c.rcx, c.rdx) = (f.rax, f.rbx, f.rcx, f.rdx);
    (c.rsi, c.rdi, c.rbp, c.rsp) = (f.rsi, f.rdi, f.rbp, f.rsp);
    (c.r8, c.r9, c.r10, c.r11) = (f.r8, f.r9, f.r10, f.r11);
    (c.r12, c.r13, c.r14, c.r15) = (f.r12, f.r13, f.r14, f.r15);
    c.rip = f.rip;
    c
}

fn set_bit(bitmap: &mut [u8], pfn: u64) {
    if let Some(b) = bitmap.get_mut((pfn / 8) as usize) {
        *b |= 1 << (pfn % 8);
    }
}

/// Marks the pages in use: every page of every run except the workload's free pages, then the
/// AddPages ranges that fall inside the runs. Returns the bytes used, or `None` if the RAM is
/// beyond what the bitmap covers.
fn build_bitmap(
    runs: &[Run],
    added: &[(u64, u64)],
    is_free: fn(u64) -> bool,
    bitmap: &mut [u8],
) -> Option<usize> {
    let end = runs.last().map_or(0, |r| r.base_page + r.page_count);
    let bytes = end.div_ceil(8) as usize;
    if bytes > bitmap.len() {
        return None;
    }
    bitmap[..bytes].fill(0);
    for r in runs {
        for pfn in r.base_page..r.base_page + r.page_count {
            if !is_free(pfn) {
                set_bit(bitmap, pfn);
            }
        }
    }
    let in_runs =
        |pfn: u64| runs.iter().any(|r| pfn >= r.base_page && pfn < r.base_page + r.page_count);
    for &(first, count) in added {
        for pfn in first..first + count {
            if in_runs(pfn) {
                set_bit(bitmap, pfn);
            }
        }
    }
    Some(bytes)
}

/// Writes the dump of `crash` through `sink` (the DumpIo callbacks), with the runs of `info`'s
/// memory map. Returns the file size. Bug-check path: no allocation; the buffers are this
/// module's statics.
pub fn write_dump(
    crash: &Crash,
    settings: &Settings,
    info: &BootInfo,
    sink: &mut impl DumpSink,
) -> Result<u64, DumpError> {
    // SAFETY: bug-check path; the module's buffers are only used here.
    let (bitmap, scratch, context) =
        unsafe { (&mut BITMAP.as_mut().0, &mut SCRATCH.as_mut().0, CONTEXT.as_mut()) };
    let mut run_buf = [Run { base_page: 0, page_count: 0 }; MAX_RUNS];
    let n = runs(info, &mut run_buf);
    let runs = &run_buf[..n];
    *context = context_of(crash.frame);

    let kind = match settings.kind {
        DumpChoice::Full => DumpKind::Full,
        DumpChoice::Bitmap => match build_bitmap(runs, crash.added, settings.is_free, bitmap) {
            Some(bytes) => DumpKind::Bitmap { bitmap: &bitmap[..bytes] },
            None => {
                println!("CRASHMON ERROR RAM too large for the bitmap: writing a full dump");
                DumpKind::Full
            }
        },
    };
    let plan = DumpPlan {
        kind,
        order: settings.order,
        bugcheck: BugCheck { code: crash.code, parameters: crash.parameters },
        context,
        directory_table_base: boot::cr3(),
        runs,
        number_processors: 1,
        kd_debugger_data_block: 0,
        ps_loaded_module_list: 0,
        ps_active_process_head: 0,
        pfn_database: 0,
        secondary: crash.secondary,
        system_time: cmos::system_time(),
        system_up_time: 0,
        chunk_size: CHUNK_SIZE,
    };
    println!(
        "CRASHMON DUMP START type={} order={} runs={} scratch={:#x}",
        if matches!(kind, DumpKind::Full) { "full" } else { "bitmap" },
        if settings.order == WriteOrder::Sequential { "sequential" } else { "outoforder" },
        n,
        crashmon_dump_writer::scratch_size(&plan)
    );
    write(&plan, &PhysMemory, scratch, sink)
}
