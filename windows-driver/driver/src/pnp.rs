//! AddDevice, the dispatch routines and Unload: a WDM function driver for one PCI device.
//!
//! The device stack is the PCI bus driver's PDO with this driver's FDO attached on top. The FDO
//! handles PnP (start, stop, removal), passes power IRPs down with `PoCallDriver` and every other
//! IRP down unchanged. A remove lock (`IO_REMOVE_LOCK`) keeps the FDO alive while an IRP is in a
//! dispatch routine, as WDM requires: removal waits for them before detaching and deleting it.
//!
//! AddDevice, PnP dispatch, start/stop and Unload run at PASSIVE_LEVEL only and live in the
//! pageable `PAGE` section; power and pass-through dispatch may run at DISPATCH_LEVEL and stay in
//! non-paged `.text`. None of these is on the bug-check path.

use core::mem::size_of;
use core::ptr;

use crashmon_card_abi as abi;
use crashmon_guest_driver::driver::StartError;
use crashmon_guest_driver::CardError;

use crate::mmio::MmioCardIo;
use crate::ntoskrnl::*;
use crate::registry::NtBugCheckRegistry;
use crate::DRIVER;
use crashmon_wdk_types::ntddk::*;
use crashmon_wdk_types::resources::{card_resources, ResourceError};

/// The remove lock's allocation tag ("CMon", as a pool tag reads in a debugger).
const REMOVE_LOCK_TAG: ULONG = u32::from_le_bytes(*b"CMon");
/// `sizeof(IO_REMOVE_LOCK)` for the `Io*RemoveLockEx` routines.
const REMLOCK_SIZE: ULONG = size_of::<IO_REMOVE_LOCK>() as ULONG;
/// The "file" the remove lock records for checked-build tracking.
const SOURCE: &[u8] = b"crashmon\0";

/// One BAR mapping made by `MmMapIoSpaceEx`.
#[derive(Clone, Copy)]
struct Mapping {
    base: PVOID,
    len: usize,
}

/// The FDO's device extension (non-paged, allocated with the device object).
#[repr(C)]
struct DeviceExtension {
    /// The next-lower device object (the PCI PDO), from `IoAttachDeviceToDeviceStack`.
    lower: *mut DEVICE_OBJECT,
    remove_lock: IO_REMOVE_LOCK,
    bar0: Option<Mapping>,
    bar2: Option<Mapping>,
    /// This device started the core (registered the callbacks).
    started: bool,
}

/// The extension of one of this driver's device objects.
///
/// # Safety
/// `fdo` must be a device object this driver created in [`add_device`].
unsafe fn extension(fdo: *mut DEVICE_OBJECT) -> *mut DeviceExtension {
    // SAFETY: per the contract the extension is a DeviceExtension, written by add_device.
    unsafe { (*fdo).DeviceExtension as *mut DeviceExtension }
}

/// Prints to the kernel debugger (DbgView, WinDbg) at error level, which is not filtered out by
/// default. `format` is a NUL-terminated `printf` format.
macro_rules! log {
    ($format:literal $(, $arg:expr)*) => {
        #[allow(unused_unsafe)]
        // SAFETY: a NUL-terminated format whose conversions match the arguments.
        let _ = unsafe {
            DbgPrintEx(DPFLTR_IHVDRIVER_ID, DPFLTR_ERROR_LEVEL, concat!("crashmon: ", $format, "\n\0").as_ptr() $(, $arg)*)
        };
    };
}

/// AddDevice: creates the FDO for a card the INF matched and attaches it to the PDO's stack.
///
/// # Safety
/// Called by the PnP manager at PASSIVE_LEVEL with valid driver and device objects.
#[link_section = "PAGE"]
pub unsafe extern "system" fn add_device(
    driver: *mut DRIVER_OBJECT,
    pdo: *mut DEVICE_OBJECT,
) -> NTSTATUS {
    let mut fdo: *mut DEVICE_OBJECT = ptr::null_mut();
    // SAFETY: valid arguments; IoCreateDevice writes `fdo` on success.
    let status = unsafe {
        IoCreateDevice(
            driver,
            size_of::<DeviceExtension>() as ULONG,
            ptr::null_mut(),
            FILE_DEVICE_UNKNOWN,
            FILE_DEVICE_SECURE_OPEN,
            0,
            &mut fdo,
        )
    };
    if !NT_SUCCESS(status) {
        log!("IoCreateDevice failed (%08x)", status);
        return status;
    }
    // SAFETY: IoCreateDevice succeeded: `fdo` is ours, with a non-paged extension of the
    // requested size, which we initialise in full before anything else can use it.
    unsafe {
        let ext = extension(fdo);
        ptr::write(
            ext,
            DeviceExtension {
                lower: ptr::null_mut(),
                remove_lock: core::mem::zeroed(),
                bar0: None,
                bar2: None,
                started: false,
            },
        );
        IoInitializeRemoveLockEx(&mut (*ext).remove_lock, REMOVE_LOCK_TAG, 0, 0, REMLOCK_SIZE);
        let lower = IoAttachDeviceToDeviceStack(fdo, pdo);
        if lower.is_null() {
            IoDeleteDevice(fdo);
            log!("IoAttachDeviceToDeviceStack failed");
            return STATUS_NO_SUCH_DEVICE;
        }
        (*ext).lower = lower;
        (*fdo).Flags |= DO_POWER_PAGABLE;
        (*fdo).Flags &= !DO_DEVICE_INITIALIZING;
    }
    STATUS_SUCCESS
}

/// Completes `irp` with `status`.
///
/// # Safety
/// The caller owns `irp` and has not passed it on.
unsafe fn complete(irp: *mut IRP, status: NTSTATUS) -> NTSTATUS {
    // SAFETY: per the contract.
    unsafe {
        (*irp).IoStatus.Status.Status = status;
        IofCompleteRequest(irp, IO_NO_INCREMENT);
    }
    status
}

/// Acquires the remove lock for `irp`, or completes the IRP (the device is being removed).
///
/// # Safety
/// `ext` is a live extension; the caller owns `irp`.
unsafe fn acquire(ext: *mut DeviceExtension, irp: *mut IRP) -> Result<(), NTSTATUS> {
    // SAFETY: per the contract; the lock was initialised by add_device.
    let status = unsafe {
        IoAcquireRemoveLockEx(
            &mut (*ext).remove_lock,
            irp as PVOID,
            SOURCE.as_ptr(),
            line!(),
            REMLOCK_SIZE,
        )
    };
    if NT_SUCCESS(status) {
        Ok(())
    } else {
        // SAFETY: the IRP is still ours.
        Err(unsafe { complete(irp, status) })
    }
}

/// Releases the remove lock taken for `irp` (which may be gone by now: the tag is only a value).
///
/// # Safety
/// `ext` is a live extension whose lock was acquired for `irp`.
unsafe fn release(ext: *mut DeviceExtension, irp: *mut IRP) {
    // SAFETY: per the contract.
    unsafe { IoReleaseRemoveLockEx(&mut (*ext).remove_lock, irp as PVOID, REMLOCK_SIZE) }
}

/// Passes `irp` down unchanged and releases the remove lock.
///
/// # Safety
/// `ext` is a live extension whose lock was acquired for `irp`; the caller owns `irp`.
unsafe fn pass_down(ext: *mut DeviceExtension, irp: *mut IRP) -> NTSTATUS {
    // SAFETY: per the contract; after IofCallDriver the IRP belongs to the lower driver.
    unsafe {
        IoSkipCurrentIrpStackLocation(irp);
        let status = IofCallDriver((*ext).lower, irp);
        release(ext, irp);
        status
    }
}

/// Every IRP the driver does not handle itself: down the stack, unchanged.
///
/// # Safety
/// Called by the I/O manager at IRQL <= DISPATCH_LEVEL with one of this driver's FDOs.
pub unsafe extern "system" fn dispatch_pass_through(
    fdo: *mut DEVICE_OBJECT,
    irp: *mut IRP,
) -> NTSTATUS {
    // SAFETY: `fdo` is ours; the IRP is ours until passed down.
    unsafe {
        let ext = extension(fdo);
        if let Err(status) = acquire(ext, irp) {
            return status;
        }
        pass_down(ext, irp)
    }
}

/// `IRP_MJ_POWER`: the card has no power management of its own; the bus driver handles it.
/// Since Windows Vista `PoStartNextPowerIrp` is not needed.
///
/// # Safety
/// Called by the power manager with one of this driver's FDOs.
pub unsafe extern "system" fn dispatch_power(fdo: *mut DEVICE_OBJECT, irp: *mut IRP) -> NTSTATUS {
    // SAFETY: `fdo` is ours; the IRP is ours until passed down.
    unsafe {
        let ext = extension(fdo);
        if let Err(status) = acquire(ext, irp) {
            return status;
        }
        IoSkipCurrentIrpStackLocation(irp);
        let status = PoCallDriver((*ext).lower, irp);
        release(ext, irp);
        status
    }
}

/// `IRP_MJ_PNP`.
///
/// # Safety
/// Called by the PnP manager at PASSIVE_LEVEL with one of this driver's FDOs.
#[link_section = "PAGE"]
pub unsafe extern "system" fn dispatch_pnp(fdo: *mut DEVICE_OBJECT, irp: *mut IRP) -> NTSTATUS {
    // SAFETY: `fdo` is ours and the IRP is ours until completed or passed down; the stack
    // location is the IRP's current one. Each arm follows the WDM rules for its minor function.
    unsafe {
        let ext = extension(fdo);
        if let Err(status) = acquire(ext, irp) {
            return status;
        }
        let stack = IoGetCurrentIrpStackLocation(irp);
        match (*stack).MinorFunction {
            IRP_MN_START_DEVICE => {
                // The bus driver starts the device first (it enables decoding of the BARs).
                let mut status = if IoForwardIrpSynchronously((*ext).lower, irp) != 0 {
                    (*irp).IoStatus.Status.Status
                } else {
                    STATUS_UNSUCCESSFUL
                };
                if NT_SUCCESS(status) {
                    status = start_device(
                        ext,
                        (*stack).Parameters.StartDevice.AllocatedResourcesTranslated,
                    );
                }
                complete(irp, status);
                release(ext, irp);
                status
            }
            IRP_MN_STOP_DEVICE | IRP_MN_SURPRISE_REMOVAL => {
                stop_device(ext);
                (*irp).IoStatus.Status.Status = STATUS_SUCCESS;
                pass_down(ext, irp)
            }
            IRP_MN_QUERY_STOP_DEVICE
            | IRP_MN_QUERY_REMOVE_DEVICE
            | IRP_MN_CANCEL_STOP_DEVICE
            | IRP_MN_CANCEL_REMOVE_DEVICE => {
                (*irp).IoStatus.Status.Status = STATUS_SUCCESS;
                pass_down(ext, irp)
            }
            IRP_MN_REMOVE_DEVICE => {
                stop_device(ext);
                (*irp).IoStatus.Status.Status = STATUS_SUCCESS;
                IoSkipCurrentIrpStackLocation(irp);
                let lower = (*ext).lower;
                let status = IofCallDriver(lower, irp);
                // Waits for every other IRP still in a dispatch routine, then the FDO goes.
                IoReleaseRemoveLockAndWaitEx(&mut (*ext).remove_lock, irp as PVOID, REMLOCK_SIZE);
                IoDetachDevice(lower);
                IoDeleteDevice(fdo);
                status
            }
            _ => pass_down(ext, irp),
        }
    }
}

/// `IRP_MN_START_DEVICE` after the bus driver started the device: maps BAR0 (uncached) and BAR2
/// (write-combined) and starts the core, which probes, resets and arms the card and registers
/// the four bug-check callbacks.
///
/// # Safety
/// PASSIVE_LEVEL; `ext` is a live extension; `translated` is the IRP's translated resource list.
#[link_section = "PAGE"]
unsafe fn start_device(ext: *mut DeviceExtension, translated: *const CM_RESOURCE_LIST) -> NTSTATUS {
    // SAFETY: per the contract; a restart after a stop (rebalance) first undoes the old start.
    unsafe { stop_device(ext) };
    // SAFETY: the PnP manager's list, valid for the IRP's duration.
    let resources = match unsafe { card_resources(translated) } {
        Ok(r) => r,
        Err(e) => {
            let (what, length) = match e {
                ResourceError::NoList => (0u32, 0u64),
                ResourceError::MissingBar => (1, 0),
                ResourceError::TooSmall { bar, length } => (2 + bar as u32, length),
            };
            log!("the resources do not describe the card (%u, %I64x)", what, length);
            return STATUS_DEVICE_CONFIGURATION_ERROR;
        }
    };
    let bar0_len = abi::BAR0_SIZE as usize;
    let bar2_len = abi::BAR2_SIZE as usize;
    // SAFETY: the ranges are the card's, assigned by the PnP manager and at least this long.
    let (bar0, bar2) = unsafe {
        (
            MmMapIoSpaceEx(resources.bar0.start, bar0_len, PAGE_READWRITE | PAGE_NOCACHE),
            MmMapIoSpaceEx(resources.bar2.start, bar2_len, PAGE_READWRITE | PAGE_WRITECOMBINE),
        )
    };
    // SAFETY: whichever mapping exists is ours; ext is live.
    unsafe {
        if !bar0.is_null() {
            (*ext).bar0 = Some(Mapping { base: bar0, len: bar0_len });
        }
        if !bar2.is_null() {
            (*ext).bar2 = Some(Mapping { base: bar2, len: bar2_len });
        }
        if bar0.is_null() || bar2.is_null() {
            unmap(ext);
            log!("MmMapIoSpaceEx failed");
            return STATUS_INSUFFICIENT_RESOURCES;
        }
    }
    // SAFETY: both mappings stay until stop_device, which stops the core (dropping this access)
    // before unmapping them.
    let io = unsafe { MmioCardIo::new(bar0 as *mut u8, bar0_len, bar2 as *mut u8, bar2_len) };
    let status = match DRIVER.start(io, &NtBugCheckRegistry) {
        Ok(()) => {
            // SAFETY: ext is live.
            unsafe { (*ext).started = true };
            // DMA mode if the card read back the probe pattern by physical address, else copy.
            let mode: &[u8] = if DRIVER.dma() { b"DMA\0" } else { b"copy\0" };
            log!(
                "card started: BAR0 %I64x, BAR2 %I64x, %s mode; bug-check callbacks registered",
                resources.bar0.start,
                resources.bar2.start,
                mode.as_ptr()
            );
            return STATUS_SUCCESS;
        }
        Err(StartError::AlreadyStarted) => {
            log!("another card is already in use; only one is supported");
            STATUS_DEVICE_BUSY
        }
        Err(StartError::Card(CardError::NotACard { magic })) => {
            log!("BAR0 is not the card's (magic %08x)", magic);
            STATUS_DEVICE_CONFIGURATION_ERROR
        }
        Err(StartError::Card(CardError::UnsupportedVersion { version })) => {
            log!("unsupported card ABI version %08x", version);
            STATUS_REVISION_MISMATCH
        }
        Err(StartError::Card(_)) => {
            log!("the card refused to arm");
            STATUS_DEVICE_NOT_READY
        }
        Err(StartError::RegistrationFailed) => {
            log!("KeRegisterBugCheck(Reason)Callback failed");
            STATUS_UNSUCCESSFUL
        }
    };
    // SAFETY: the core did not start, so nothing uses the mappings.
    unsafe { unmap(ext) };
    status
}

/// Stops the core if this device started it (deregistering every callback and resetting the
/// card), then unmaps the BARs.
///
/// # Safety
/// PASSIVE_LEVEL; `ext` is a live extension.
#[link_section = "PAGE"]
unsafe fn stop_device(ext: *mut DeviceExtension) {
    // SAFETY: ext is live; the core is stopped before the mappings it uses go away.
    unsafe {
        if (*ext).started {
            DRIVER.stop(&NtBugCheckRegistry);
            (*ext).started = false;
        }
        unmap(ext);
    }
}

/// Unmaps whichever BARs are mapped.
///
/// # Safety
/// `ext` is a live extension and nothing uses its mappings any more.
#[link_section = "PAGE"]
unsafe fn unmap(ext: *mut DeviceExtension) {
    // SAFETY: per the contract; each mapping was made by MmMapIoSpaceEx with this length.
    unsafe {
        for mapping in [(*ext).bar0.take(), (*ext).bar2.take()].into_iter().flatten() {
            MmUnmapIoSpace(mapping.base, mapping.len);
        }
    }
}

/// Unload: by now the PnP manager has removed every device (each removal stopped the core);
/// stopping again is a no-op then, and makes certain nothing stays registered.
///
/// # Safety
/// Called by the I/O manager at PASSIVE_LEVEL.
#[link_section = "PAGE"]
pub unsafe extern "system" fn driver_unload(_driver: *mut DRIVER_OBJECT) {
    DRIVER.stop(&NtBugCheckRegistry);
}
