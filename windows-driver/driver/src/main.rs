//! # crashmon.sys: the Windows build of the crashmon guest driver
//!
//! A WDM function driver for the crash-monitor card (PCI `VEN_C4A5&DEV_0D01`), and a thin
//! binding of the platform-independent core in `crashmon_guest_driver`: the core's
//! [`CrashmonDriver`] holds the four bug-check callbacks and drives the card through
//! [`crashmon_guest_driver::Card`]; this crate gives it
//!
//! * a [`CardIo`](crashmon_guest_driver::CardIo) over the two BARs mapped with `MmMapIoSpaceEx`
//!   and accessed with the HAL register routines' semantics, and `MmGetPhysicalAddress` for DMA
//!   mode ([`mmio`]);
//! * a [`BugCheckRegistry`](crashmon_guest_driver::BugCheckRegistry) that is
//!   `KeRegisterBugCheckReasonCallback` and friends ([`registry`]);
//! * `DriverEntry`, AddDevice, PnP and power dispatch, and Unload ([`pnp`]): `IRP_MN_START_DEVICE`
//!   maps BAR0 and BAR2 from the translated resources and starts the core (which probes and
//!   resets the card, proves DMA mode if the card offers it, arms it and registers the
//!   callbacks); stop, surprise removal, removal and Unload stop the core (deregistering every
//!   callback) and unmap the BARs.
//!
//! The crate is a `#![no_main]` binary: the image is an executable entered at `DriverEntry`, with
//! no C runtime and no exports, as the WDK links drivers.
//!
//! ## Sections
//! | section | what | why |
//! |---|---|---|
//! | `.text` | the bug-check callbacks and everything they call (the core, `memcpy`), power and pass-through dispatch | non-paged: the callbacks run at HIGH_LEVEL, where a page fault is fatal |
//! | `.data`/`.bss`/`.rdata` | the driver's state ([`DRIVER`], its callback records, the DMA probe buffer), constants | non-paged: the records stay resident while registered, and the card reads the probe buffer by physical address |
//! | `PAGE` | AddDevice, PnP dispatch, start/stop, Unload | pageable: they run at PASSIVE_LEVEL only |
//! | `INIT` | `DriverEntry` | discarded by the kernel once `DriverEntry` returns |
//!
//! `windows-driver/pe-check` checks the built image for exactly this: the callbacks' call graph
//! stays in non-paged, non-discardable sections and calls no import but `MmGetPhysicalAddress`
//! (documented for any IRQL; DMA mode).
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod mmio;
pub mod ntoskrnl;
pub mod pnp;
pub mod registry;

use crashmon_guest_driver::CrashmonDriver;
use crashmon_wdk_types::ntddk::*;
use mmio::MmioCardIo;

/// The driver's one instance of the core: the callback records and the card. A `static`, so it
/// is in the image's non-paged data and never moves while its callbacks are registered. One card
/// per system: a second card's start fails with `STATUS_DEVICE_BUSY`.
pub static DRIVER: CrashmonDriver<MmioCardIo> = CrashmonDriver::new();

/// Bug-check code of a panic in the driver (which the driver's code is written not to have):
/// the card's vendor and device IDs. Parameter 1 is the source line, parameter 2 the address
/// of the source file's name (not NUL-terminated; parameter 3 is its length).
pub const CRASHMON_PANIC_BUGCHECK: u32 = 0xC4A5_0D01;

/// `_fltused`: MSVC's marker that the image uses floating point, which LLVM references from any
/// object with floating-point code (parts of `core` have some; the driver runs none). Kernel
/// drivers define it themselves since they link no C runtime.
#[no_mangle]
#[used]
pub static _fltused: i32 = 0;

/// `DriverEntry`: fills in the dispatch table, AddDevice and Unload. The card is found later,
/// by the PnP manager calling AddDevice and sending `IRP_MN_START_DEVICE`.
///
/// # Safety
/// Called once by the I/O manager with a valid driver object.
#[no_mangle]
#[link_section = "INIT"]
pub unsafe extern "system" fn DriverEntry(
    driver: *mut DRIVER_OBJECT,
    _registry_path: *mut UNICODE_STRING,
) -> NTSTATUS {
    // SAFETY: the I/O manager passes a valid driver object (with its driver extension) that is
    // ours to fill in during DriverEntry.
    unsafe {
        let driver = &mut *driver;
        for dispatch in driver.MajorFunction.iter_mut() {
            *dispatch = Some(pnp::dispatch_pass_through);
        }
        driver.MajorFunction[IRP_MJ_PNP as usize] = Some(pnp::dispatch_pnp);
        driver.MajorFunction[IRP_MJ_POWER as usize] = Some(pnp::dispatch_power);
        driver.DriverUnload = Some(pnp::driver_unload);
        (*driver.DriverExtension).AddDevice = Some(pnp::add_device);
    }
    STATUS_SUCCESS
}

/// A panic bug checks the system with [`CRASHMON_PANIC_BUGCHECK`] (`KeBugCheckEx` may be
/// called at any IRQL); it never returns and never unwinds.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let (line, file, len) = match info.location() {
        Some(l) => (l.line() as usize, l.file().as_ptr() as usize, l.file().len()),
        None => (0, 0, 0),
    };
    // SAFETY: KeBugCheckEx takes plain values and does not return.
    unsafe { ntoskrnl::KeBugCheckEx(CRASHMON_PANIC_BUGCHECK, line, file, len, 0) }
}
