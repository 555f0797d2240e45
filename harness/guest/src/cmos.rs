//! # CMOS: the real-time clock and the boot counter
//!
//! The MC146818-compatible CMOS behind ports 0x70/0x71: the clock that gives the dump its
//! `SystemTime`, and two bytes of bank 0 (above what SeaBIOS and QEMU use) that count boots since
//! QEMU started, so that `reboot=` knows when to stop (CMOS survives a guest reset).

use crate::cpu::{inb, outb};

/// Reads CMOS register `register`.
pub fn read(register: u8) -> u8 {
    outb(0x70, register);
    inb(0x71)
}

/// Writes CMOS register `register`.
pub fn write(register: u8, value: u8) {
    outb(0x70, register);
    outb(0x71, value);
}

/// CMOS bytes for the boot counter.
const BOOT_MARK: u8 = 0x7D;
const BOOT_COUNT: u8 = 0x7E;
const MARK: u8 = 0xC4;

/// Counts this boot: returns how many boots happened before it since QEMU started (0 first).
/// Call once per boot.
pub fn count_boot() -> u64 {
    let index = if read(BOOT_MARK) == MARK { read(BOOT_COUNT) as u64 } else { 0 };
    write(BOOT_MARK, MARK);
    write(BOOT_COUNT, (index + 1).min(255) as u8);
    index
}

/// `SystemTime` from the real-time clock: 100 ns units since 1601-01-01 UTC (the RTC runs in
/// UTC under QEMU by default).
pub fn system_time() -> u64 {
    for _ in 0..100_000 {
        if read(0x0A) & 0x80 == 0 {
            break; // no update in progress
        }
    }
    let binary = read(0x0B) & 0x04 != 0;
    let v = |r: u8| {
        let x = read(r);
        if binary {
            x as u64
        } else {
            ((x >> 4) * 10 + (x & 0xF)) as u64
        }
    };
    let (sec, min, hour, day, month, year) =
        (v(0x00), v(0x02), v(0x04) & 0x7F, v(0x07), v(0x08), 2000 + v(0x09));
    // Days since 1970-01-01 (civil-from-days inverse, Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let unix = days * 86_400 + hour * 3600 + min * 60 + sec;
    (unix + 11_644_473_600) * 10_000_000
}
