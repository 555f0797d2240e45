//! # CPU: port I/O and the few privileged instructions the kernel needs
//!
//! The lowest layer with `asm!`: I/O ports (the UART, PCI configuration, CMOS and the reset
//! register), CR2, and stopping or resetting the processor. Everything here touches no memory,
//! so it is safe on the bug-check path after the dump has captured RAM.

use x86_64::instructions::{hlt, interrupts, port::Port};
use x86_64::registers::control::Cr2;

/// Writes the byte `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the ports this kernel writes are the UART, the PCI
    // configuration ports, CMOS and the reset register, all of which it owns.
    unsafe { Port::<u8>::new(port).write(value) };
}

/// Reads a byte from I/O port `port`.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes the dword `value` to I/O port `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb` (the PCI configuration ports).
    unsafe { Port::<u32>::new(port).write(value) };
}

/// Reads a dword from I/O port `port`.
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for `outb`.
    unsafe { Port::<u32>::new(port).read() }
}

/// CR2: the address of the last page fault, as the processor wrote it (not checked for being
/// canonical: it goes into the bug check's parameters as it is).
pub fn cr2() -> u64 {
    Cr2::read_raw()
}

/// Disables maskable interrupts (they are never enabled; a bug check says so anyway, as
/// Windows' does).
pub fn disable_interrupts() {
    interrupts::disable();
}

/// Waits for the next interrupt: with maskable interrupts off, only an NMI ends the wait.
pub fn halt() {
    hlt();
}

/// Stops the processor for good: interrupts off, `hlt` forever. An NMI still wakes it; its
/// handler bug checks (a nested bug check halts here again).
pub fn halt_forever() -> ! {
    loop {
        interrupts::disable();
        hlt();
    }
}

/// Hard reset through the reset control register (0xCF9). Returns only if the machine has no
/// such register.
pub fn reset() {
    outb(0xCF9, 0x02);
    outb(0xCF9, 0x06);
}
