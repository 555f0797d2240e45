//! # crashmon test guest
//!
//! A bare-metal x86_64 kernel that plays Windows' part of the bug-check contract for the crashmon
//! driver (see README.md): it registers the driver's callbacks exactly as Windows would have the
//! driver do at start, crashes on demand, and writes a Windows crash dump through the driver's
//! DumpIo callback to the crash-monitor card. One concept per module:
//!
//! * [`boot`]: PVH entry, long mode, paging, GDT/TSS
//! * [`serial`]: the COM1 log the harness reads
//! * [`interrupts`]: IDT; every exception and the NMI on an IST stack
//! * [`pci`]: finds the card and maps its BARs
//! * [`services`]: pool, spin lock, wait, IRQL (and catching their use at HIGH_LEVEL)
//! * [`bugcheck`]: KeRegisterBugCheck(Reason)Callback and KeBugCheckEx
//! * [`dump`]: the dump plan: context, runs, bitmap
//! * [`workload`]: fills RAM with known content; the known variable
//! * [`triggers`]: the kernel command line and the crash it asks for
//! * [`misbehave`]: a callback that breaks the rules
//! * [`global`], [`runtime`]: a static cell; memcpy and friends, the panic handler
#![no_std]
#![no_main]

pub mod boot;
pub mod bugcheck;
pub mod dump;
pub mod global;
pub mod interrupts;
pub mod misbehave;
pub mod pci;
pub mod runtime;
pub mod serial;
pub mod services;
pub mod triggers;
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
fn start_driver() -> Result<(), &'static str> {
    let (_, io) = pci::find_card()?;
    let start = || {
        DRIVER.start(io, &bugcheck::GuestRegistry).map_err(|e| match e {
            crashmon_guest_driver::driver::StartError::AlreadyStarted => "driver already started",
            crashmon_guest_driver::driver::StartError::Card(_) => "the card refused probe or arm",
            crashmon_guest_driver::driver::StartError::RegistrationFailed => {
                "registering the driver's callbacks"
            }
        })
    };
    let before = bugcheck::registered();
    start()?;
    if bugcheck::registered() != (before.0 + 3, before.1 + 1) {
        return Err("the driver did not register three reason callbacks and one legacy callback");
    }
    if !DRIVER.stop(&bugcheck::GuestRegistry) || bugcheck::registered() != before {
        return Err("unloading the driver left callbacks registered");
    }
    start()?;
    println!("CRASHMON DRIVER started (after a load/unload/load cycle)");
    Ok(())
}

/// Prints what the driver saw, after the dump.
pub fn driver_summary() {
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
    bugcheck::init();
    let config = triggers::init(info.cmdline());
    println!("CRASHMON BOOT index={} cmdline=\"{}\"", config.boot_index, info.cmdline());
    if !services::self_test() {
        fail("services self-test");
    }
    if let Err(e) = start_driver() {
        fail(e);
    }
    if let Err(e) = misbehave::register() {
        fail(e);
    }
    if let Err(e) = workload::init(info, config.seed) {
        fail(e);
    }
    println!("CRASHMON DTB cr3={:#x}", boot::cr3());
    println!("CRASHMON READY");
    triggers::fire()
}
