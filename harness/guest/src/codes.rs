//! # Codes: Windows' bug-check codes and exception status values
//!
//! The values the guest reports, as Windows defines them (bugcodes.h, ntstatus.h). Plain
//! constants: every layer may use them.

/// KMODE_EXCEPTION_NOT_HANDLED.
pub const KMODE_EXCEPTION_NOT_HANDLED: u32 = 0x1E;
/// PAGE_FAULT_IN_NONPAGED_AREA.
pub const PAGE_FAULT_IN_NONPAGED_AREA: u32 = 0x50;
/// UNEXPECTED_KERNEL_MODE_TRAP.
pub const UNEXPECTED_KERNEL_MODE_TRAP: u32 = 0x7F;
/// NMI_HARDWARE_FAILURE.
pub const NMI_HARDWARE_FAILURE: u32 = 0x80;
/// KERNEL_MODE_EXCEPTION_NOT_HANDLED.
pub const KERNEL_MODE_EXCEPTION_NOT_HANDLED: u32 = 0x8E;
/// MANUALLY_INITIATED_CRASH.
pub const MANUALLY_INITIATED_CRASH: u32 = 0xE2;

/// Parameter 1 of NMI_HARDWARE_FAILURE for an NMI from outside the machine, as Windows' HAL
/// reports an injected NMI (`0x4F4454`).
pub const NMI_SOURCE_TAG: u64 = 0x004F_4454;

/// NTSTATUS codes Windows reports for unhandled exceptions.
pub mod status {
    pub const STATUS_INTEGER_DIVIDE_BY_ZERO: u64 = 0xC000_0094;
    pub const STATUS_SINGLE_STEP: u64 = 0x8000_0004;
    pub const STATUS_BREAKPOINT: u64 = 0x8000_0003;
    pub const STATUS_INTEGER_OVERFLOW: u64 = 0xC000_0095;
    pub const STATUS_ARRAY_BOUNDS_EXCEEDED: u64 = 0xC000_008C;
    pub const STATUS_ILLEGAL_INSTRUCTION: u64 = 0xC000_001D;
    pub const STATUS_ACCESS_VIOLATION: u64 = 0xC000_0005;
    pub const STATUS_DATATYPE_MISALIGNMENT: u64 = 0x8000_0002;
    pub const STATUS_FLOAT_INVALID_OPERATION: u64 = 0xC000_0090;
}
