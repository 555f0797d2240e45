//! # Serial: the COM1 log
//!
//! 16550 UART at I/O port 0x3F8, 115200 baud 8N1, polled. Everything the harness reads comes out
//! here (see README.md for the `CRASHMON ...` line protocol). Writing needs no memory beyond the
//! stack, so logging on the bug-check path changes no RAM the dump has already captured.

use core::fmt;

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3F8;

/// Programs the UART: 115200 baud, 8 data bits, no parity, one stop bit, FIFOs on, no
/// interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn write_byte(byte: u8) {
    // Wait (bounded) for the transmit holding register; QEMU's UART is always ready.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, byte);
}

/// The COM1 port as a `fmt::Write`.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Lines end in a bare LF: the harness parses lines, and CR would only get in its way.
        for b in s.bytes() {
            write_byte(b);
        }
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, $($arg)*);
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
