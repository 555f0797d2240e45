//! # CPU: port I/O and the few privileged instructions the kernel needs
//!
//! The lowest layer with `asm!`: I/O ports (the UART, PCI configuration, CMOS and the reset
//! register), CR2, and stopping or resetting the processor. Everything here touches no memory,
//! so it is safe on the bug-check path after the dump has captured RAM.

use core::arch::asm;

/// Writes the byte `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the ports this kernel writes are the UART, the PCI
    // configuration ports, CMOS and the reset register, all of which it owns.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes the dword `value` to I/O port `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb` (the PCI configuration ports).
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a dword from I/O port `port`.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// CR2: the address of the last page fault.
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Disables maskable interrupts (they are never enabled; a bug check says so anyway, as
/// Windows' does).
pub fn disable_interrupts() {
    // SAFETY: disabling interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Waits for the next interrupt: with maskable interrupts off, only an NMI ends the wait.
pub fn halt() {
    // SAFETY: halting has no memory effects; the NMI handler bug checks and never returns here.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

/// Stops the processor for good: interrupts off, `hlt` forever. An NMI still wakes it; its
/// handler bug checks (a nested bug check halts here again).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the processor has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Hard reset through the reset control register (0xCF9). Returns only if the machine has no
/// such register.
pub fn reset() {
    outb(0xCF9, 0x02);
    outb(0xCF9, 0x06);
}
