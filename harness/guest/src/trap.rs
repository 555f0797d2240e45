//! # Trap: the crashing processor's registers
//!
//! [`TrapFrame`] is the one layout of saved registers in the kernel: the exception entry stubs
//! push it ([`crate::interrupts`]), `KeBugCheckEx` builds the same one at its call
//! ([`crate::bugcheck`]), and the dump turns it into the `CONTEXT` ([`crate::dump`]). It is
//! defined here, below all three, so none of them imports another for it. Its field order is
//! the stubs' push order and the offsets `KeBugCheckEx`'s assembly writes: change all three
//! together.

/// Registers saved by the entry stubs, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// Exception vector (pushed by the stub; 0x100 from `KeBugCheckEx`).
    pub vector: u64,
    /// Error code (pushed by the CPU, or 0 by the stub).
    pub error_code: u64,
    /// The processor's interrupt frame.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// 15 general registers, vector, error code and the 5-word interrupt frame: 176 bytes, as the
// stubs and KeBugCheckEx's assembly assume.
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 176);

impl TrapFrame {
    /// All zero (for statics).
    pub const ZERO: TrapFrame = TrapFrame {
        rax: 0,
        rbx: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        rbp: 0,
        r8: 0,
        r9: 0,
        r10: 0,
        r11: 0,
        r12: 0,
        r13: 0,
        r14: 0,
        r15: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };
}
