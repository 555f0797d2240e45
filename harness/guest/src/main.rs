//! # crashmon test guest
//!
//! A bare-metal x86_64 kernel that plays Windows' part of the bug-check contract for the crashmon
//! driver (see README.md): it registers the driver's callbacks exactly as Windows would have the
//! driver do at start, crashes on demand, and writes a Windows crash dump through the driver's
//! DumpIo callback to the crash-monitor card. One concept per module, in layers that import
//! one way only (README.md, "Layers"): a module uses the ones below it, never one above; what a
//! lower layer needs from a higher one (the dump options, the driver's report, whether to reset)
//! is handed down at boot, by this file.
//!
//! * [`main`](self): boot order, the driver's "DriverEntry", the panic handler
//! * [`triggers`]: the kernel command line, and the crash it asks for
//! * [`interrupts`]: IDT; every exception and the NMI on an IST stack, turned into a bug check
//! * [`workload`]: fills RAM with known content; the known variable and its AddPages callback
//! * [`misbehave`]: a callback that breaks the rules
//! * [`pci`]: finds the card and maps its BARs
//! * [`bugcheck`]: `KeBugCheckEx`: polls the callbacks, writes the dump, runs the legacy
//!   callbacks
//! * [`dump`]: the dump plan (context, runs, bitmap) for `crashmon-dump-writer`
//! * [`callbacks`]: `KeRegisterBugCheck(Reason)Callback` and friends: the callback records
//! * [`services`]: pool, spin lock, wait, IRQL (refused at HIGH_LEVEL)
//! * [`violations`]: what a callback did at HIGH_LEVEL that it must not, and the report of it
//! * [`boot`]: PVH entry, long mode, paging; [`gdt`]: the GDT and the TSS
//! * [`trap`]: the saved registers of the crashing processor
//! * [`serial`], [`cmos`], [`cpu`]: the COM1 log; the clock and boot counter; port I/O and
//!   privileged instructions
//! * [`codes`], [`global`], [`runtime`]: Windows' codes; a static cell; memcpy and friends
#![no_std]
#![no_main]

pub mod boot;
pub mod bugcheck;
pub mod callbacks;
pub mod cmos;
pub mod codes;
pub mod cpu;
pub mod dump;
pub mod gdt;
pub mod global;
pub mod interrupts;
pub mod misbehave;
pub mod pci;
pub mod runtime;
pub mod serial;
pub mod services;
pub mod trap;
pub mod triggers;
pub mod violations;
pub mod workload;

use crashmon_card_abi::SessionState;
use crashmon_guest_driver::CrashmonDriver;

/// The crashmon driver, as it would sit in a Windows driver's non-paged data. Its callback
/// records and state change during the bug check, hence `.crashmon_volatile`.
#[link_section = ".crashmon_volatile"]
static DRIVER: CrashmonDriver<pci::GuestCardIo> = CrashmonDriver::new();

fn fail(what: &str) {
    println!("CRASHMON ERROR {}", what);
}

/// The driver's "DriverEntry": find the card and start the driver (probe, reset, arm,
/// register its callbacks). The first start is followed by an unload (`stop`: deregistration
/// of all four callbacks, card reset) and a second start, as a driver reload would do, and
/// the callback lists are checked after each step.
fn start_driver(dma: bool) -> Result<(), &'static str> {
    let (_, io) = pci::find_card()?;
    let io = io.with_physical_addresses(dma);
    let start = || {
        DRIVER.start(io, &callbacks::GuestRegistry).map_err(|e| match e {
            crashmon_guest_driver::driver::StartError::AlreadyStarted => "driver already started",
            crashmon_guest_driver::driver::StartError::Card(_) => "the card refused probe or arm",
            crashmon_guest_driver::driver::StartError::RegistrationFailed => {
                "registering the driver's callbacks"
            }
        })
    };
    let before = callbacks::registered();
    start()?;
    if callbacks::registered() != (before.0 + 3, before.1 + 1) {
        return Err("the driver did not register three reason callbacks and one legacy callback");
    }
    if !DRIVER.stop(&callbacks::GuestRegistry) || callbacks::registered() != before {
        return Err("unloading the driver left callbacks registered");
    }
    start()?;
    println!(
        "CRASHMON DRIVER started (after a load/unload/load cycle) mode={}",
        if DRIVER.dma() { "dma" } else { "copy" }
    );
    Ok(())
}

/// Prints what the driver saw, after the dump: handed to the bug check as its report.
fn driver_summary() {
    let s = DRIVER.session();
    println!(
        "CRASHMON DRIVER SESSION calls={} bytes={} announced={:#x} complete={} error={} final={} rearmed={}",
        s.dump_io_calls,
        s.bytes,
        s.announced.map_or(0, |a| a.0 as u64),
        s.complete as u8,
        match s.first_error {
            None => "none",
            Some(crashmon_guest_driver::CardError::Timeout) => "timeout",
            Some(crashmon_guest_driver::CardError::Gone) => "card-gone",
            Some(crashmon_guest_driver::CardError::Refused(c)) => c.name(),
            Some(_) => "card",
        },
        match s.final_state {
            None => "none",
            Some(SessionState::Idle) => "idle",
            Some(SessionState::Armed) => "armed",
            Some(SessionState::BugCheckAnnounced) => "announced",
            Some(SessionState::Streaming) => "streaming",
            Some(SessionState::Complete) => "complete",
            Some(SessionState::Aborted) => "aborted",
            Some(SessionState::Finishing) => "finishing",
        },
        s.rearmed as u8,
    );
}

/// Called by `pvh_start` in long mode on the boot stack.
#[no_mangle]
pub extern "C" fn kernel_main(start_info: u64) -> ! {
    serial::init();
    // SAFETY: start_info is what the loader passed; called once.
    if let Err(e) = unsafe { boot::read_start_info(start_info) } {
        fail(e);
    }
    let info = boot::info();
    interrupts::init();
    boot::uncache_non_ram(info);
    for (start, end) in info.ram().filter(|r| r.1 > 1 << 32) {
        if let Err(e) = boot::map_identity(start.max(1 << 32), end - start.max(1 << 32), false) {
            fail(e);
        }
    }
    callbacks::init();
    let config = triggers::init(info.cmdline());
    bugcheck::init(bugcheck::Setup {
        dump: dump::Settings { kind: config.dump, order: config.order, is_free: workload::is_free },
        reset_after_dump: config.reset_after_dump(),
        report: driver_summary,
    });
    println!("CRASHMON BOOT index={} cmdline=\"{}\"", config.boot_index, info.cmdline());
    if !services::self_test() {
        fail("services self-test");
    }
    if let Err(e) = start_driver(config.dma) {
        fail(e);
    }
    if let Err(e) = misbehave::register(config.misbehave) {
        fail(e);
    }
    if let Err(e) = workload::init(info, config.seed, config.zero_percent) {
        fail(e);
    }
    println!("CRASHMON DTB cr3={:#x}", boot::cr3());
    println!("CRASHMON READY");
    triggers::fire(&config)
}

/// A Rust panic is a kernel bug: report it, then bug check as Windows would for an unexpected
/// kernel failure (0xE2 MANUALLY_INITIATED_CRASH is for users; a panic is treated as
/// KMODE_EXCEPTION_NOT_HANDLED with a private code, 0xE0000001).
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("CRASHMON PANIC {}", info);
    bugcheck::KeBugCheckEx(codes::KMODE_EXCEPTION_NOT_HANDLED, 0xE000_0001, 0, 0, 0)
}
