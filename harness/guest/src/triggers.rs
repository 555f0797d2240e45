//! # Triggers: the kernel command line, and the crash it asks for
//!
//! Options (`-append`, space separated `key=value`; numbers in decimal or `0x` hex):
//!
//! | option | values | default | meaning |
//! |---|---|---|---|
//! | `trigger` | `bugcheck`, `nmi`, `pagefault`, `divide`, `none` | `none` | what crashes the guest after `CRASHMON READY` |
//! | `code`, `p1`..`p4` | numbers | `0xE2`, 0 | `trigger=bugcheck`: `KeBugCheckEx(code, p1, p2, p3, p4)` |
//! | `dump` | `full`, `bitmap` | `full` | dump type 1 or 5 |
//! | `order` | `sequential`, `outoforder` | `sequential` | Offset -1, or explicit offsets written back to front |
//! | `misbehave` | `alloc`, `lock`, `wait`, comma separated | none | register a SecondaryDumpData callback that breaks those rules |
//! | `reboot` | number | 0 | after a dump, reset the machine while fewer than this many resets have happened (counted in CMOS), so the next boot crashes again |
//! | `seed` | number | [`crate::workload::DEFAULT_SEED`] | the workload's seed |
//!
//! Triggers: `bugcheck` calls `KeBugCheckEx`; `nmi` waits halted for an NMI (QMP `inject-nmi`),
//! which bug checks 0x80 NMI_HARDWARE_FAILURE as Windows does when told to crash on NMI;
//! `pagefault` reads an unmapped kernel address: 0x50 PAGE_FAULT_IN_NONPAGED_AREA; `divide`
//! divides by zero: 0x8E KERNEL_MODE_EXCEPTION_NOT_HANDLED with 0xC0000094; `none` only waits
//! (an NMI still crashes it).

use core::arch::asm;

use crashmon_dump_writer::WriteOrder;

use crate::bugcheck::{self, codes};
use crate::global::Global;
use crate::println;
use crate::serial::{inb, outb};

/// What to crash with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `KeBugCheckEx(code, p1..p4)`.
    BugCheck,
    /// Wait for an NMI.
    Nmi,
    /// Read an unmapped address.
    PageFault,
    /// Divide by zero.
    Divide,
    /// Just wait.
    None,
}

/// Full or bitmap dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpChoice {
    /// Type 1.
    Full,
    /// Type 5.
    Bitmap,
}

/// The parsed command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `trigger=`.
    pub trigger: Trigger,
    /// `code=`.
    pub code: u32,
    /// `p1=`..`p4=`.
    pub parameters: [u64; 4],
    /// `dump=`.
    pub dump: DumpChoice,
    /// `order=`.
    pub order: WriteOrder,
    /// `misbehave=alloc`.
    pub misbehave_alloc: bool,
    /// `misbehave=lock`.
    pub misbehave_lock: bool,
    /// `misbehave=wait`.
    pub misbehave_wait: bool,
    /// `reboot=`.
    pub reboot: u64,
    /// `seed=`.
    pub seed: u64,
    /// This boot's index since QEMU started (0 first), from CMOS.
    pub boot_index: u64,
}

static CONFIG: Global<Config> = Global::new(Config {
    trigger: Trigger::None,
    code: codes::MANUALLY_INITIATED_CRASH,
    parameters: [0; 4],
    dump: DumpChoice::Full,
    order: WriteOrder::Sequential,
    misbehave_alloc: false,
    misbehave_lock: false,
    misbehave_wait: false,
    reboot: 0,
    seed: crate::workload::DEFAULT_SEED,
    boot_index: 0,
});

/// The configuration (after [`init`]).
pub fn config() -> &'static Config {
    // SAFETY: written once by init at boot, read-only afterwards.
    unsafe { &*CONFIG.get() }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// CMOS bytes for the boot counter (bank 0, above what SeaBIOS and QEMU use).
const CMOS_MARK: u8 = 0x7D;
const CMOS_COUNT: u8 = 0x7E;
const MARK: u8 = 0xC4;

fn cmos_read(r: u8) -> u8 {
    outb(0x70, r);
    inb(0x71)
}

fn cmos_write(r: u8, v: u8) {
    outb(0x70, r);
    outb(0x71, v);
}

/// Parses the command line into the configuration and counts this boot. Unknown options are
/// reported and ignored.
pub fn init(cmdline: &str) -> &'static Config {
    // SAFETY: boot time, before anyone reads the configuration.
    let c = unsafe { CONFIG.as_mut() };
    for option in cmdline.split_ascii_whitespace() {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let ok = match key {
            "trigger" => {
                c.trigger = match value {
                    "bugcheck" => Trigger::BugCheck,
                    "nmi" => Trigger::Nmi,
                    "pagefault" => Trigger::PageFault,
                    "divide" => Trigger::Divide,
                    "none" => Trigger::None,
                    _ => Trigger::None,
                };
                matches!(value, "bugcheck" | "nmi" | "pagefault" | "divide" | "none")
            }
            "code" => number(value).map(|v| c.code = v as u32).is_some(),
            "p1" | "p2" | "p3" | "p4" => {
                let i = (key.as_bytes()[1] - b'1') as usize;
                number(value).map(|v| c.parameters[i] = v).is_some()
            }
            "dump" => {
                c.dump = if value == "bitmap" { DumpChoice::Bitmap } else { DumpChoice::Full };
                matches!(value, "full" | "bitmap")
            }
            "order" => {
                c.order = if value == "outoforder" {
                    WriteOrder::OutOfOrder
                } else {
                    WriteOrder::Sequential
                };
                matches!(value, "sequential" | "outoforder")
            }
            "misbehave" => value.split(',').all(|m| match m {
                "alloc" => {
                    c.misbehave_alloc = true;
                    true
                }
                "lock" => {
                    c.misbehave_lock = true;
                    true
                }
                "wait" => {
                    c.misbehave_wait = true;
                    true
                }
                _ => false,
            }),
            "reboot" => number(value).map(|v| c.reboot = v).is_some(),
            "seed" => number(value).map(|v| c.seed = v).is_some(),
            _ => false,
        };
        if !ok {
            println!("CRASHMON ERROR bad option {}", option);
        }
    }
    c.boot_index = if cmos_read(CMOS_MARK) == MARK { cmos_read(CMOS_COUNT) as u64 } else { 0 };
    cmos_write(CMOS_MARK, MARK);
    cmos_write(CMOS_COUNT, (c.boot_index + 1).min(255) as u8);
    c
}

/// Crashes as configured (after `CRASHMON READY`).
pub fn fire() -> ! {
    let c = config();
    match c.trigger {
        Trigger::BugCheck => {
            let p = c.parameters;
            bugcheck::KeBugCheckEx(c.code, p[0], p[1], p[2], p[3])
        }
        Trigger::PageFault => {
            // PML4 slot 256 is never mapped: a kernel-half address with no page table.
            let address = 0xFFFF_8000_DEAD_B000u64 as *const u64;
            // SAFETY: deliberately faults; the #PF handler bug checks and never returns here.
            let value = unsafe { core::ptr::read_volatile(address) };
            println!("CRASHMON ERROR read {:#x} from an unmapped address", value);
        }
        Trigger::Divide => {
            // SAFETY: deliberately raises #DE (a Rust `/` would panic before dividing); the
            // handler bug checks and never returns here.
            unsafe {
                asm!("xor edx, edx", "mov eax, 1", "xor ecx, ecx", "div ecx", out("eax") _, out("ecx") _, out("edx") _)
            };
            println!("CRASHMON ERROR divide by zero did not fault");
        }
        Trigger::Nmi | Trigger::None => {}
    }
    if c.trigger == Trigger::Nmi {
        println!("CRASHMON WAITING nmi");
    }
    loop {
        // SAFETY: halt until an NMI (maskable interrupts stay off); the NMI handler bug checks.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// After the dump: reset for the next crash (`reboot=`), or halt forever so the harness can
/// take `pmemsave` of RAM and compare it with the dump.
pub fn after_dump() -> ! {
    let c = config();
    if c.boot_index < c.reboot {
        println!("CRASHMON REBOOT");
        // Reset control register (0xCF9): hard reset.
        outb(0xCF9, 0x02);
        outb(0xCF9, 0x06);
    }
    println!("CRASHMON HALT");
    loop {
        // SAFETY: the final state: interrupts off, halted.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
