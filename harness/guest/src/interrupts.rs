//! # Interrupts: the IDT, exception and NMI handlers
//!
//! All 32 exception vectors have an entry stub that saves the general registers into a
//! [`TrapFrame`] ([`crate::trap`]) and calls [`dispatch`], which turns the exception into
//! Windows' bug-check code and parameters and hands them to [`crate::bugcheck`]. Every one of
//! them, NMI included, runs on an IST stack (IST1 NMI, IST2 #DF, IST3 #MC, IST4 everything
//! else), whose addresses go into the TSS ([`gdt::init_gdt`]), so the CPU switches stacks before
//! it pushes anything: the red zone of the interrupted code, which the prebuilt `core` may use
//! even though this crate is built with `-C no-redzone`, is never overwritten.
//!
//! Maskable interrupts stay disabled for the guest's whole life (no PIC or APIC is programmed);
//! an NMI still wakes a `hlt`. Every exception is fatal and ends in a bug check with the code
//! and parameters Windows uses, so no handler returns into the code it interrupted (the
//! return path exists only for completeness).

use core::arch::{asm, global_asm};
use core::mem::size_of;

use crate::boot::{self, Stack};
use crate::codes::{self, status};
use crate::gdt::{self, KERNEL_CS};
use crate::global::Global;
use crate::trap::TrapFrame;
use crate::{bugcheck, cpu};

const IST_STACK_SIZE: usize = 16 * 1024;
/// IST index (1-based, as in the IDT gate) of each kind of stack.
const IST_NMI: u8 = 1;
const IST_DOUBLE_FAULT: u8 = 2;
const IST_MACHINE_CHECK: u8 = 3;
const IST_FAULT: u8 = 4;

static IST_STACKS: Global<[Stack<IST_STACK_SIZE>; 4]> =
    Global::new([const { Stack([0; IST_STACK_SIZE]) }; 4]);

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(size_of::<Gate>() == 16);

static IDT: Global<[Gate; 256]> = Global::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; 256],
);

macro_rules! stubs {
    ($($kind:ident $n:literal),* $(,)?) => {
        global_asm!(
            ".pushsection .text",
            $(concat!(".global isr_", stringify!($n)),
              concat!("isr_", stringify!($n), ":"),
              stubs!(@push $kind),
              concat!("push ", stringify!($n)),
              "jmp isr_common",)*
            ".popsection",
            ".pushsection .rodata",
            ".balign 8",
            ".global isr_table",
            "isr_table:",
            $(concat!(".quad isr_", stringify!($n)),)*
            ".popsection",
        );
    };
    // Vectors without an error code push a 0 in its place, so every frame looks the same.
    (@push noerr) => { "push 0" };
    (@push err) => { "" };
}

stubs!(
    noerr 0, noerr 1, noerr 2, noerr 3, noerr 4, noerr 5, noerr 6, noerr 7,
    err 8, noerr 9, err 10, err 11, err 12, err 13, err 14, noerr 15,
    noerr 16, err 17, noerr 18, noerr 19, noerr 20, err 21, noerr 22, noerr 23,
    noerr 24, noerr 25, noerr 26, noerr 27, noerr 28, err 29, err 30, noerr 31,
);

global_asm!(
    ".pushsection .text",
    "isr_common:",
    "push r15",
    "push r14",
    "push r13",
    "push r12",
    "push r11",
    "push r10",
    "push r9",
    "push r8",
    "push rbp",
    "push rdi",
    "push rsi",
    "push rdx",
    "push rcx",
    "push rbx",
    "push rax",
    // 5 CPU words + error code + vector + 15 registers = 176 bytes: RSP is 16-byte aligned here
    // because the CPU aligned it before pushing its frame.
    "mov rdi, rsp",
    "cld",
    "call {dispatch}",
    "pop rax",
    "pop rbx",
    "pop rcx",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "pop rbp",
    "pop r8",
    "pop r9",
    "pop r10",
    "pop r11",
    "pop r12",
    "pop r13",
    "pop r14",
    "pop r15",
    "add rsp, 16",
    "iretq",
    ".popsection",
    dispatch = sym dispatch,
);

extern "C" {
    /// Entry stub addresses by vector (from the assembly above).
    static isr_table: [u64; 32];
}

/// Builds the IDT (every exception on its IST stack), installs the GDT/TSS that name those
/// stacks, and loads the IDT.
pub fn init() {
    // SAFETY: boot time, before any exception can be taken on these stacks; only the addresses
    // of the IST stacks are computed here.
    let ist_tops = unsafe {
        let stacks = IST_STACKS.get() as *mut Stack<IST_STACK_SIZE>;
        let top = |i: usize| stacks.add(i) as u64 + IST_STACK_SIZE as u64;
        [top(0), top(1), top(2), top(3), 0, 0, 0]
    };
    gdt::init_gdt(ist_tops);
    // SAFETY: boot time; nothing reads the IDT until lidt below.
    let idt = unsafe { IDT.as_mut() };
    for vector in 0..32 {
        // SAFETY: isr_table is the assembler's read-only table of 32 addresses.
        let handler = unsafe { isr_table[vector] };
        let ist = match vector {
            2 => IST_NMI,
            8 => IST_DOUBLE_FAULT,
            18 => IST_MACHINE_CHECK,
            _ => IST_FAULT,
        };
        idt[vector] = Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate (IF cleared on entry)
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer { limit: (size_of::<[Gate; 256]>() - 1) as u16, base: IDT.get() as u64 };
    // SAFETY: a complete IDT whose gates point at the stubs above.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Windows' code and parameters for an exception.
fn bugcheck_for(frame: &TrapFrame) -> (u32, [u64; 4]) {
    let trap = frame as *const TrapFrame as u64;
    let unhandled =
        |status: u64| (codes::KERNEL_MODE_EXCEPTION_NOT_HANDLED, [status, frame.rip, trap, 0]);
    match frame.vector {
        0 => unhandled(status::STATUS_INTEGER_DIVIDE_BY_ZERO),
        1 => unhandled(status::STATUS_SINGLE_STEP),
        2 => (codes::NMI_HARDWARE_FAILURE, [codes::NMI_SOURCE_TAG, 0, 0, 0]),
        3 => unhandled(status::STATUS_BREAKPOINT),
        4 => unhandled(status::STATUS_INTEGER_OVERFLOW),
        5 => unhandled(status::STATUS_ARRAY_BOUNDS_EXCEEDED),
        6 => unhandled(status::STATUS_ILLEGAL_INSTRUCTION),
        13 => unhandled(status::STATUS_ACCESS_VIOLATION),
        14 => {
            // PAGE_FAULT_IN_NONPAGED_AREA: address, 0 read / 2 write / 0x10 execute, the
            // instruction, and the type of fault (2: NONPAGED_BUGCHECK_NOT_PRESENT_PAGE_TABLE,
            // 3: a present table without a valid PTE).
            let address = cpu::cr2();
            let access = if frame.error_code & 0x10 != 0 {
                0x10
            } else if frame.error_code & 0x2 != 0 {
                2
            } else {
                0
            };
            let kind = if boot::page_table_missing(address) { 2 } else { 3 };
            (codes::PAGE_FAULT_IN_NONPAGED_AREA, [address, access, frame.rip, kind])
        }
        17 => unhandled(status::STATUS_DATATYPE_MISALIGNMENT),
        16 | 19 => unhandled(status::STATUS_FLOAT_INVALID_OPERATION),
        // #NM, #DF, #TS, #NP, #SS, #MC and the reserved vectors: UNEXPECTED_KERNEL_MODE_TRAP with
        // the vector as Windows reports it (8 for a double fault).
        v => (codes::UNEXPECTED_KERNEL_MODE_TRAP, [v, 0, 0, 0]),
    }
}

/// Called by `isr_common` with the saved registers. Every exception is fatal.
extern "C" fn dispatch(frame: &mut TrapFrame) {
    let (code, parameters) = bugcheck_for(frame);
    bugcheck::bugcheck_from_trap(code, parameters, frame)
}
