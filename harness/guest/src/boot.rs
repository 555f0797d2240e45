//! # Boot: PVH entry, long mode, paging
//!
//! QEMU loads the kernel ELF at its physical addresses and, finding the `XEN_ELFNOTE_PHYS32_ENTRY`
//! note (type 18), enters `pvh_start` in 32-bit protected mode with paging off and EBX holding
//! the physical address of the `hvm_start_info` block (command line and memory map).
//!
//! `pvh_start` zeroes `.bss`, builds an identity map of the first 4 GiB with 2 MiB pages, turns
//! on PAE, SSE (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, !CR0.EM: the x86_64-linux-gnu `core` uses SSE)
//! and long mode, and calls [`crate::kernel_main`] on the boot stack (the one reference upward:
//! the entry point jumps to the top). The final GDT and TSS are [`crate::gdt`]'s. The Rust side
//! here marks the 2 MiB pages that hold no RAM uncached (the PCI MMIO hole), maps BARs above
//! 4 GiB on request and maps single 4 KiB pages at high virtual addresses ([`map_4k`]).
//!
//! Page-table entries are created with their Accessed (and, for leaves, Dirty) bits already set,
//! so the processor never writes to page tables on its own: RAM the dump captured stays as it
//! was.
//!
//! Besides the identity map, the same tables map all physical memory at [`PHYSMAP_BASE`]
//! (PML4 slot 0x180 points at the identity map's PDPT); the dump reads pages there.

use core::arch::global_asm;

use crate::global::Global;

/// Where all physical memory is also mapped (PML4 slot 0x180 shares the identity map's PDPT),
/// so that physical page 0 has a non-null address: Rust slices may not start at address 0.
pub const PHYSMAP_BASE: u64 = 0xFFFF_C000_0000_0000;

/// The address of physical `pa` in the physical-memory alias.
pub const fn phys_to_virt(pa: u64) -> u64 {
    PHYSMAP_BASE + pa
}

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large page.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty.
    pub const D: u64 = 1 << 6;
    /// Page size: a 2 MiB leaf in a page directory.
    pub const PS: u64 = 1 << 7;
    /// Physical address bits of an entry.
    pub const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    /// What a non-leaf entry gets.
    pub const TABLE: u64 = P | RW | A;
    /// What a leaf gets.
    pub const LEAF: u64 = P | RW | A | D;
}

/// One page table (any level).
#[repr(C, align(4096))]
pub struct PageTable(pub [u64; 512]);

const BOOT_STACK_SIZE: usize = 64 * 1024;

/// The boot stack: `kernel_main` and everything at PASSIVE_LEVEL run on it.
#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

#[no_mangle]
static BOOT_STACK: Global<Stack<BOOT_STACK_SIZE>> = Global::new(Stack([0; BOOT_STACK_SIZE]));
#[no_mangle]
static BOOT_PML4: Global<PageTable> = Global::new(PageTable([0; 512]));
#[no_mangle]
static BOOT_PDPT: Global<PageTable> = Global::new(PageTable([0; 512]));
/// Four page directories: the first 4 GiB in 2 MiB pages.
#[no_mangle]
static BOOT_PD: Global<[PageTable; 4]> = Global::new([const { PageTable([0; 512]) }; 4]);

/// Tables for mappings made after boot (BARs above 4 GiB, high 4 KiB pages).
const POOL_TABLES: usize = 16;
static TABLE_POOL: Global<[PageTable; POOL_TABLES]> =
    Global::new([const { PageTable([0; 512]) }; POOL_TABLES]);
static TABLES_USED: Global<usize> = Global::new(0);

global_asm!(
    // The PVH note: QEMU's loader looks for it to find the 32-bit entry point.
    ".pushsection .note.pvh, \"a\", @note",
    ".balign 4",
    ".long 4",         // namesz: "Xen\0"
    ".long 4",         // descsz: a 32-bit address
    ".long 18",        // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".balign 4",
    ".long pvh_start",
    ".balign 4",
    ".popsection",

    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".global pvh_start",
    "pvh_start:",
    "cli",
    "cld",
    "mov esi, ebx",                     // hvm_start_info; kept in ESI (RDI, the argument, later)
    // Zero .bss (it holds the page tables and the boot stack).
    "mov edi, offset __bss_start",
    "mov ecx, offset __bss_end",
    "sub ecx, edi",
    "shr ecx, 2",
    "xor eax, eax",
    "rep stosd",
    // 2048 page-directory entries: 0..4 GiB in 2 MiB pages, P|RW|A|D|PS.
    "mov edi, offset {pd}",
    "xor ecx, ecx",
    "2:",
    "mov eax, ecx",
    "shl eax, 21",
    "or eax, 0xE3",
    "mov [edi + ecx*8], eax",
    "mov dword ptr [edi + ecx*8 + 4], 0",
    "inc ecx",
    "cmp ecx, 2048",
    "jne 2b",
    // PDPT[0..4] -> the four page directories, P|RW|A.
    "mov edi, offset {pdpt}",
    "mov eax, offset {pd}",
    "or eax, 0x23",
    "mov [edi], eax",
    "add eax, 0x1000",
    "mov [edi + 8], eax",
    "add eax, 0x1000",
    "mov [edi + 16], eax",
    "add eax, 0x1000",
    "mov [edi + 24], eax",
    // PML4[0] -> PDPT, and PML4[0x180] -> the same PDPT: the physical-memory alias at
    // PHYSMAP_BASE.
    "mov edi, offset {pml4}",
    "mov eax, offset {pdpt}",
    "or eax, 0x23",
    "mov [edi], eax",
    "mov [edi + 0x180 * 8], eax",
    // CR4: PAE, OSFXSR, OSXMMEXCPT.
    "mov eax, cr4",
    "or eax, 0x620",
    "mov cr4, eax",
    "mov eax, offset {pml4}",
    "mov cr3, eax",
    // EFER.LME.
    "mov ecx, 0xC0000080",
    "rdmsr",
    "or eax, 0x100",
    "wrmsr",
    // CR0: PG, WP, MP, PE on; EM, TS off.
    "mov eax, cr0",
    "and eax, 0xFFFFFFF3",
    "or eax, 0x80010003",
    "mov cr0, eax",
    "lgdt [boot_gdtr]",
    "push 0x10",
    "mov eax, offset boot_long_mode",
    "push eax",
    "retf",

    ".code64",
    "boot_long_mode:",
    "mov ax, 0x18",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "fninit",
    "mov edi, esi",
    "call {main}",
    "4:",
    "cli",
    "hlt",
    "jmp 4b",

    // The boot GDT: 0x08 32-bit code, 0x10 64-bit code, 0x18 data (Accessed bits preset).
    ".balign 16",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00CF9B000000FFFF",
    ".quad 0x00AF9B000000FFFF",
    ".quad 0x00CF93000000FFFF",
    "boot_gdtr:",
    ".word 4 * 8 - 1",
    ".long boot_gdt",
    ".popsection",
    pd = sym BOOT_PD,
    pdpt = sym BOOT_PDPT,
    pml4 = sym BOOT_PML4,
    stack = sym BOOT_STACK,
    stack_size = const BOOT_STACK_SIZE,
    main = sym crate::kernel_main,
);

// ---------------------------------------------------------------------------------------------
// hvm_start_info

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemmapEntry {
    /// Start physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// E820 type: 1 is RAM.
    pub kind: u32,
    /// Reserved.
    pub reserved: u32,
}

/// `XEN_HVM_MEMMAP_TYPE_RAM`.
pub const MEMMAP_RAM: u32 = 1;
const MAX_MEMMAP: usize = 64;
const MAX_CMDLINE: usize = 1024;

/// What the loader told us, copied into the kernel (the originals sit in low memory).
pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    memmap: [MemmapEntry; MAX_MEMMAP],
    memmap_len: usize,
}

static BOOT_INFO: Global<BootInfo> = Global::new(BootInfo {
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
    memmap: [MemmapEntry { addr: 0, size: 0, kind: 0, reserved: 0 }; MAX_MEMMAP],
    memmap_len: 0,
});

impl BootInfo {
    /// The kernel command line (`-append`).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The memory map, as the loader gave it.
    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// RAM entries, shrunk to whole pages.
    pub fn ram(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.memmap().iter().filter(|e| e.kind == MEMMAP_RAM).filter_map(|e| {
            let start = (e.addr + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
            let end = (e.addr + e.size) & !(PAGE_SIZE - 1);
            (end > start).then_some((start, end))
        })
    }

    /// One past the highest RAM address.
    pub fn ram_top(&self) -> u64 {
        self.ram().map(|r| r.1).max().unwrap_or(0)
    }
}

/// The boot information, once [`read_start_info`] has filled it in.
pub fn info() -> &'static BootInfo {
    // SAFETY: written once by read_start_info before anything reads it; read-only after.
    unsafe { &*BOOT_INFO.get() }
}

/// Copies the command line and memory map out of `hvm_start_info` at physical `paddr`.
///
/// # Safety
/// `paddr` must be what the PVH loader passed in EBX; identity mapping must be on. Call once,
/// before [`info`].
pub unsafe fn read_start_info(paddr: u64) -> Result<(), &'static str> {
    // SAFETY: the loader's block, identity mapped.
    let si = unsafe { &*(paddr as *const HvmStartInfo) };
    if si.magic != HVM_START_MAGIC {
        return Err("hvm_start_info magic");
    }
    // SAFETY: called once, before anyone reads BOOT_INFO.
    let info = unsafe { BOOT_INFO.as_mut() };
    if si.cmdline_paddr != 0 {
        let mut p = si.cmdline_paddr as *const u8;
        // SAFETY: a NUL-terminated string from the loader, identity mapped; bounded.
        unsafe {
            while *p != 0 && info.cmdline_len < MAX_CMDLINE {
                info.cmdline[info.cmdline_len] = *p;
                info.cmdline_len += 1;
                p = p.add(1);
            }
        }
    }
    if si.version < 1 || si.memmap_paddr == 0 {
        return Err("no memory map in hvm_start_info (version < 1)");
    }
    let n = (si.memmap_entries as usize).min(MAX_MEMMAP);
    for i in 0..n {
        // SAFETY: the loader's table of memmap_entries entries, identity mapped.
        info.memmap[i] = unsafe { *(si.memmap_paddr as *const MemmapEntry).add(i) };
    }
    info.memmap_len = n;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Paging

/// CR3: the physical address of the PML4 and its low flag bits, as the register holds them
/// (the dump's DirectoryTableBase).
pub fn cr3() -> u64 {
    let (pml4, low_bits) = x86_64::registers::control::Cr3::read_raw();
    pml4.start_address().as_u64() | u64::from(low_bits)
}

fn flush_tlb() {
    // Reloads CR3 with its own value.
    x86_64::instructions::tlb::flush_all();
}

fn table_at(entry: u64) -> *mut PageTable {
    (entry & pte::ADDR) as *mut PageTable
}

/// The next-level table under `table[index]`, made from the pool if missing.
///
/// # Safety
/// `table` must be a live page table of this kernel; boot-time only (not on the bug-check path).
unsafe fn next_table(table: *mut PageTable, index: usize) -> Result<*mut PageTable, &'static str> {
    // SAFETY: caller's promise; the tables are identity mapped.
    unsafe {
        let entry = &mut (*table).0[index];
        if *entry & pte::P != 0 {
            if *entry & pte::PS != 0 {
                return Err("mapping would split a large page");
            }
            return Ok(table_at(*entry));
        }
        let used = TABLES_USED.as_mut();
        if *used == POOL_TABLES {
            return Err("page-table pool exhausted");
        }
        let new = &mut TABLE_POOL.as_mut()[*used] as *mut PageTable;
        *used += 1;
        (*new).0 = [0; 512];
        *entry = new as u64 | pte::TABLE;
        Ok(new)
    }
}

fn indexes(va: u64) -> [usize; 4] {
    [
        (va >> 39) as usize & 511,
        (va >> 30) as usize & 511,
        (va >> 21) as usize & 511,
        (va >> 12) as usize & 511,
    ]
}

/// Identity-maps `[start, start + len)` with 2 MiB pages, uncached for MMIO (BARs above 4 GiB)
/// or write-back for RAM above 4 GiB; the first 4 GiB are always mapped.
pub fn map_identity(start: u64, len: u64, uncached: bool) -> Result<(), &'static str> {
    let mut pa = start & !(LARGE_PAGE_SIZE - 1);
    while pa < start + len {
        if pa >= 1 << 32 {
            let [i4, i3, i2, _] = indexes(pa);
            // SAFETY: boot time; BOOT_PML4 is the live PML4.
            unsafe {
                let pdpt = next_table(BOOT_PML4.get(), i4)?;
                let pd = next_table(pdpt, i3)?;
                let cache = if uncached { pte::PCD | pte::PWT } else { 0 };
                (*pd).0[i2] = pa | pte::LEAF | pte::PS | cache;
            }
        }
        pa += LARGE_PAGE_SIZE;
    }
    flush_tlb();
    Ok(())
}

/// Maps the 4 KiB page at virtual `va` to physical `pa` (for addresses outside the identity
/// map, such as the known variable's high alias).
pub fn map_4k(va: u64, pa: u64) -> Result<(), &'static str> {
    let [i4, i3, i2, i1] = indexes(va);
    // SAFETY: boot time; BOOT_PML4 is the live PML4.
    unsafe {
        let pdpt = next_table(BOOT_PML4.get(), i4)?;
        let pd = next_table(pdpt, i3)?;
        let pt = next_table(pd, i2)?;
        (*pt).0[i1] = (pa & pte::ADDR) | pte::LEAF;
    }
    flush_tlb();
    Ok(())
}

/// Marks every 2 MiB page of the first 4 GiB that holds no RAM uncached (PCD|PWT): the PCI
/// MMIO hole, where the card's registers are.
pub fn uncache_non_ram(info: &BootInfo) {
    // SAFETY: boot time; the four page directories are live and only we change them.
    let pds = unsafe { BOOT_PD.as_mut() };
    for (i, entry) in pds.iter_mut().flat_map(|pd| pd.0.iter_mut()).enumerate() {
        let start = i as u64 * LARGE_PAGE_SIZE;
        let end = start + LARGE_PAGE_SIZE;
        let has_ram = info
            .memmap()
            .iter()
            .any(|e| e.kind == MEMMAP_RAM && e.addr < end && e.addr + e.size > start);
        if !has_ram {
            *entry |= pte::PCD | pte::PWT;
        }
    }
    flush_tlb();
}

/// The physical address `va` maps to, walking the live page tables from CR3.
pub fn translate(va: u64) -> Option<u64> {
    let [i4, i3, i2, i1] = indexes(va);
    let mut table = (cr3() & pte::ADDR) as *const PageTable;
    for (level, index) in [i4, i3, i2, i1].into_iter().enumerate() {
        // SAFETY: page tables are identity mapped and valid while the kernel runs.
        let entry = unsafe { (*table).0[index] };
        if entry & pte::P == 0 {
            return None;
        }
        if level == 2 && entry & pte::PS != 0 {
            return Some(
                (entry & pte::ADDR & !(LARGE_PAGE_SIZE - 1)) | (va & (LARGE_PAGE_SIZE - 1)),
            );
        }
        if level == 3 {
            return Some((entry & pte::ADDR) | (va & (PAGE_SIZE - 1)));
        }
        table = table_at(entry);
    }
    None
}

/// Whether the page-directory level of `va` is missing: Windows' NOT_PRESENT_PAGE_TABLE.
pub fn page_table_missing(va: u64) -> bool {
    let [i4, i3, i2, _] = indexes(va);
    let mut table = (cr3() & pte::ADDR) as *const PageTable;
    for (level, index) in [i4, i3, i2].into_iter().enumerate() {
        // SAFETY: as in translate.
        let entry = unsafe { (*table).0[index] };
        if entry & pte::P == 0 {
            return true;
        }
        if level == 2 || entry & pte::PS != 0 {
            return false;
        }
        table = table_at(entry);
    }
    false
}

/// The kernel image's physical extent, from the linker script.
pub fn image() -> (u64, u64) {
    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    // Linker-defined symbols: only their addresses are taken.
    (&raw const __image_start as u64, &raw const __image_end as u64)
}

/// The pages written during a dump (`.crashmon_volatile`), from the linker script.
pub fn volatile_section() -> (u64, u64) {
    extern "C" {
        static __volatile_start: u8;
        static __volatile_end: u8;
    }
    // Linker-defined symbols: only their addresses are taken.
    (&raw const __volatile_start as u64, &raw const __volatile_end as u64)
}

/// The zero-initialised pages written during a dump (`.bss.crashmon_volatile`).
pub fn volatile_bss() -> (u64, u64) {
    extern "C" {
        static __volatile_bss_start: u8;
        static __volatile_bss_end: u8;
    }
    // Linker-defined symbols: only their addresses are taken.
    (&raw const __volatile_bss_start as u64, &raw const __volatile_bss_end as u64)
}
