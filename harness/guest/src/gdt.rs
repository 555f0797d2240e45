//! # GDT: the final descriptor table and the TSS
//!
//! The boot code (`boot.rs`) enters long mode with a minimal GDT of its own; [`init_gdt`] then
//! installs the kernel's: Windows' selectors for kernel code and data, and a TSS whose IST
//! pointers name the stacks the exception and NMI handlers run on ([`crate::interrupts`] owns
//! those stacks and passes their tops in). Descriptors are created with their Accessed bit set,
//! so the processor never writes the GDT on its own: RAM the dump captured stays as it was.

use core::arch::asm;
use core::mem::size_of;

use crate::global::Global;

/// Kernel code selector (Windows' KGDT64_R0_CODE).
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data/stack selector (Windows' KGDT64_R0_DATA).
pub const KERNEL_DS: u16 = 0x18;
/// TSS selector (Windows' KGDT64_SYS_TSS).
pub const TSS_SELECTOR: u16 = 0x40;

/// The 64-bit TSS: only its IST pointers matter here.
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    /// IST1..IST7 (index 0 is IST1).
    pub ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}
const _: () = assert!(size_of::<Tss>() == 104);

static TSS: Global<Tss> = Global::new(Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: size_of::<Tss>() as u16,
});

static GDT: Global<[u64; 10]> = Global::new([
    0,
    0x00CF_9B00_0000_FFFF, // 0x08: 32-bit code (unused after boot)
    0x00AF_9B00_0000_FFFF, // 0x10: 64-bit kernel code
    0x00CF_9300_0000_FFFF, // 0x18: kernel data
    0,
    0,
    0,
    0,
    0, // 0x40: TSS, low half (filled in by init_gdt)
    0, // 0x48: TSS, high half
]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Installs the final GDT and the TSS with `ist` as IST1..IST7 stack tops.
pub fn init_gdt(ist: [u64; 7]) {
    // SAFETY: boot, before interrupts are set up: nothing else uses the TSS or GDT now.
    unsafe {
        let tss = TSS.as_mut();
        tss.ist = ist;
        let base = TSS.get() as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        // Available 64-bit TSS (type 9), present.
        let low = (limit & 0xFFFF)
            | (base & 0xFF_FFFF) << 16
            | 0x89 << 40
            | ((limit >> 16) & 0xF) << 48
            | ((base >> 24) & 0xFF) << 56;
        let gdt = GDT.as_mut();
        gdt[8] = low;
        gdt[9] = base >> 32;
        let ptr = DescriptorPointer {
            limit: (size_of::<[u64; 10]>() - 1) as u16,
            base: GDT.get() as u64,
        };
        // SAFETY: a valid GDT whose 0x10/0x18 match what is loaded; reloading CS by far return.
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = const KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SELECTOR as u64,
            tmp = out(reg) _,
        );
    }
}
