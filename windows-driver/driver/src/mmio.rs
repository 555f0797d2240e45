//! The card's BARs through the HAL register routines' semantics.
//!
//! On x64, wdm.h defines `READ_REGISTER_ULONG`, `WRITE_REGISTER_ULONG` and
//! `WRITE_REGISTER_BUFFER_UCHAR` as inline functions, not imports:
//!
//! ```c
//! ULONG READ_REGISTER_ULONG(volatile ULONG *Register)
//!     { _ReadWriteBarrier(); return *Register; }
//! VOID WRITE_REGISTER_ULONG(volatile ULONG *Register, ULONG Value)
//!     { *Register = Value; FastFence(); }
//! VOID WRITE_REGISTER_BUFFER_UCHAR(PUCHAR Register, PUCHAR Buffer, ULONG Count)
//!     { __movsb(Register, Buffer, Count); FastFence(); }
//! ```
//!
//! `FastFence` is `__faststorefence`, a `lock or dword ptr [rsp], 0`: it drains the store
//! buffer (and the write-combining buffers of the data window) before the next access, so the
//! data is in the window before the doorbell write reaches the card. The functions below are
//! exactly those, so they are what Microsoft's bug-check rules allow at HIGH_LEVEL: no call, no
//! lock, no wait, nothing pageable.
//!
//! DMA mode adds one call: `get_physical_address` is `MmGetPhysicalAddress`, which Microsoft
//! documents for any IRQL given a valid address. It is the one kernel routine the bug-check path
//! may reach (`windows-driver/pe-check` checks that nothing else is reachable).

use core::arch::asm;
use core::sync::atomic::{compiler_fence, Ordering};

use crashmon_card_abi as abi;
use crashmon_guest_driver::CardIo;

use crate::ntoskrnl::MmGetPhysicalAddress;

/// `FastFence()` / `__faststorefence()`.
#[inline(always)]
fn fast_fence() {
    // SAFETY: a locked OR of zero into the word at [rsp]: the stack slot keeps its value (the
    // operation is atomic, so not even another reader could see a change); it only orders
    // memory. The asm is also a compiler barrier (no `nomem`).
    unsafe { asm!("lock or dword ptr [rsp], 0", options(nostack)) };
}

/// `READ_REGISTER_ULONG`.
///
/// # Safety
/// `register` must point to a mapped, resident device register.
#[inline(always)]
pub unsafe fn read_register_ulong(register: *const u32) -> u32 {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: per the contract.
    unsafe { core::ptr::read_volatile(register) }
}

/// `WRITE_REGISTER_ULONG`.
///
/// # Safety
/// `register` must point to a mapped, resident device register.
#[inline(always)]
pub unsafe fn write_register_ulong(register: *mut u32, value: u32) {
    // SAFETY: per the contract.
    unsafe { core::ptr::write_volatile(register, value) };
    fast_fence();
}

/// `WRITE_REGISTER_BUFFER_UCHAR`.
///
/// # Safety
/// `register` must point to `count` bytes of mapped, resident device memory and `buffer` to
/// `count` readable, resident bytes; the ranges must not overlap.
#[inline(always)]
pub unsafe fn write_register_buffer_uchar(register: *mut u8, buffer: *const u8, count: usize) {
    // The copy and its `FastFence` are one asm block, so the compiler cannot schedule anything
    // between them (with two blocks it may reload a spilled register there): the fence is the
    // very next instruction, as `windows-driver/pe-check` requires of every `rep movsb`.
    // SAFETY: per the contract; `rep movsb` copies forward (the x64 ABI keeps DF clear), and it
    // moves rdi/rsi/rcx, which are declared clobbered; the fence is `fast_fence`'s (it leaves
    // the stack word as it was but sets the flags, so they are not preserved).
    unsafe {
        asm!(
            "rep movsb",
            "lock or dword ptr [rsp], 0",
            inout("rdi") register => _,
            inout("rsi") buffer => _,
            inout("rcx") count => _,
            options(nostack),
        )
    };
}

/// The card's BAR0 (registers) and BAR2 (data window), mapped with `MmMapIoSpaceEx`.
pub struct MmioCardIo {
    bar0: *mut u8,
    bar0_len: usize,
    bar2: *mut u8,
    bar2_len: usize,
}

// SAFETY: the mappings are system-space, valid on every processor; the driver core serialises
// access (see `crashmon_guest_driver::driver`).
unsafe impl Send for MmioCardIo {}

impl MmioCardIo {
    /// The card behind two mappings.
    ///
    /// # Safety
    /// `bar0` must map `bar0_len` bytes of the card's BAR0 and `bar2` `bar2_len` bytes of its
    /// BAR2, non-paged and valid until the value is dropped (the driver unmaps them only after
    /// deregistering its callbacks and dropping the card).
    pub unsafe fn new(bar0: *mut u8, bar0_len: usize, bar2: *mut u8, bar2_len: usize) -> Self {
        Self { bar0, bar0_len, bar2, bar2_len }
    }

    /// Whether `[offset, offset + 4)` is an aligned register inside the mapped BAR0.
    #[inline(always)]
    fn register_ok(&self, offset: u32) -> bool {
        let offset = offset as usize;
        offset.is_multiple_of(4) && offset < self.bar0_len.min(abi::BAR0_SIZE as usize)
    }
}

impl CardIo for MmioCardIo {
    #[inline(always)]
    fn read_register(&self, offset: u32) -> u32 {
        if !self.register_ok(offset) {
            // What the card answers for an offset that names no register.
            return 0;
        }
        // SAFETY: an aligned offset inside the mapped BAR0 (checked above).
        unsafe { read_register_ulong(self.bar0.add(offset as usize) as *const u32) }
    }

    #[inline(always)]
    fn write_register(&self, offset: u32, value: u32) {
        if self.register_ok(offset) {
            // SAFETY: an aligned offset inside the mapped BAR0 (checked above).
            unsafe { write_register_ulong(self.bar0.add(offset as usize) as *mut u32, value) }
        }
    }

    #[inline(always)]
    fn write_window(&self, offset: usize, data: &[u8]) {
        let fits = offset.checked_add(data.len()).is_some_and(|end| end <= self.bar2_len);
        if fits && !data.is_empty() {
            // SAFETY: the range is inside the mapped BAR2 (checked above); `data` is the
            // caller's buffer (the system's dump buffer, resident), which cannot overlap a
            // device mapping.
            unsafe { write_register_buffer_uchar(self.bar2.add(offset), data.as_ptr(), data.len()) }
        }
    }

    /// `MmGetPhysicalAddress`. The core calls it at PASSIVE_LEVEL for its DMA probe buffer (in
    /// the `static DRIVER`, non-paged) and, in DMA mode, at HIGH_LEVEL from the DumpIo callback
    /// for each page of the system's dump buffer (resident by the callback's contract). The
    /// bug-check rules allow it there: it is documented for any IRQL given a valid address, and
    /// nothing here allocates, locks or waits around the call.
    #[inline(always)]
    fn get_physical_address(&self, va: usize) -> u64 {
        // SAFETY: the routine only translates the address, it never dereferences it for us; the
        // core passes addresses of resident memory (its probe buffer, the system's dump buffer),
        // which is the valid address its documentation asks for at any IRQL. An address with no
        // provenance is enough: nothing on our side reads through it.
        let pa = unsafe { MmGetPhysicalAddress(core::ptr::without_provenance_mut(va)) };
        // A LARGE_INTEGER: 0 (or a nonsensical negative value) means no physical address, which
        // the core treats as "use copy mode for this page".
        u64::try_from(pa).unwrap_or(0)
    }
}
