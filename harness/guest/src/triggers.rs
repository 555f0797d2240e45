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
//! | `seed` | number | [`workload::DEFAULT_SEED`] | the workload's seed |
//! | `zero` | 0 to 100 | 0 | percent of the workload's pages left all zero ([`workload::is_zero_page`]), as Windows keeps free memory zeroed |
//! | `dma` | `on`, `off` | `on` | `off`: the driver's `MmGetPhysicalAddress` knows no address, so its DMA probe fails and it uses copy mode even with shared guest RAM |
//!
//! Triggers: `bugcheck` calls `KeBugCheckEx`; `nmi` waits halted for an NMI (QMP `inject-nmi`),
//! which bug checks 0x80 NMI_HARDWARE_FAILURE as Windows does when told to crash on NMI;
//! `pagefault` reads an unmapped kernel address: 0x50 PAGE_FAULT_IN_NONPAGED_AREA; `divide`
//! divides by zero: 0x8E KERNEL_MODE_EXCEPTION_NOT_HANDLED with 0xC0000094; `none` only waits
//! (an NMI still crashes it).

use core::arch::asm;

use crashmon_dump_writer::WriteOrder;

use crate::dump::DumpChoice;
use crate::misbehave::Misbehaviour;
use crate::{bugcheck, cmos, codes, cpu, println, workload};

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
    /// `misbehave=`.
    pub misbehave: Misbehaviour,
    /// `reboot=`.
    pub reboot: u64,
    /// `seed=`.
    pub seed: u64,
    /// `zero=`: percent of workload pages left zero.
    pub zero_percent: u64,
    /// `dma=`: whether the driver may prove DMA mode.
    pub dma: bool,
    /// This boot's index since QEMU started (0 first), from CMOS.
    pub boot_index: u64,
}

impl Config {
    /// The defaults, before the command line is read.
    const DEFAULT: Config = Config {
        trigger: Trigger::None,
        code: codes::MANUALLY_INITIATED_CRASH,
        parameters: [0; 4],
        dump: DumpChoice::Full,
        order: WriteOrder::Sequential,
        misbehave: Misbehaviour::NONE,
        reboot: 0,
        seed: workload::DEFAULT_SEED,
        zero_percent: 0,
        dma: true,
        boot_index: 0,
    };
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses the command line into the configuration and counts this boot ([`cmos::count_boot`]).
/// Unknown options are reported and ignored.
pub fn init(cmdline: &str) -> Config {
    let mut config = Config::DEFAULT;
    let c = &mut config;
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
                    c.misbehave.alloc = true;
                    true
                }
                "lock" => {
                    c.misbehave.lock = true;
                    true
                }
                "wait" => {
                    c.misbehave.wait = true;
                    true
                }
                _ => false,
            }),
            "reboot" => number(value).map(|v| c.reboot = v).is_some(),
            "seed" => number(value).map(|v| c.seed = v).is_some(),
            "zero" => number(value).filter(|&v| v <= 100).map(|v| c.zero_percent = v).is_some(),
            "dma" => match value {
                "on" | "off" => {
                    c.dma = value == "on";
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if !ok {
            println!("CRASHMON ERROR bad option {}", option);
        }
    }
    c.boot_index = cmos::count_boot();
    config
}

impl Config {
    /// Whether the machine resets after this boot's dump: `reboot=` asks for more boots than
    /// have happened.
    pub fn reset_after_dump(&self) -> bool {
        self.boot_index < self.reboot
    }
}

/// Crashes as `c` asks (after `CRASHMON READY`).
pub fn fire(c: &Config) -> ! {
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
        // Halt until an NMI (maskable interrupts stay off); the NMI handler bug checks.
        cpu::halt();
    }
}
