//! The routines the driver imports, all from `ntoskrnl.exe`, by name.
//!
//! `raw-dylib`: rustc writes the import entries itself, so no `ntoskrnl.lib` (no WDK) is needed
//! to link. The IRQL column is the documented upper bound from each routine's Requirements; the
//! PE test (`windows-driver/pe-check`) keeps the same table and checks that none of these is
//! reachable from a bug-check callback except `MmGetPhysicalAddress`, which the DumpIo callback
//! calls in DMA mode. Not even `KeBugCheckEx`: it is the panic handler's, and the callbacks are
//! written not to panic.
//!
//! | routine | IRQL | used by |
//! |---|---|---|
//! | `IoCreateDevice`, `IoDeleteDevice`, `IoDetachDevice` | PASSIVE | AddDevice, removal |
//! | `IoAttachDeviceToDeviceStack` | <= DISPATCH | AddDevice |
//! | `IoForwardIrpSynchronously` | <= APC | `IRP_MN_START_DEVICE` |
//! | `IofCallDriver`, `IofCompleteRequest`, `PoCallDriver` | <= DISPATCH | dispatch routines |
//! | `IoInitializeRemoveLockEx`, `IoReleaseRemoveLockAndWaitEx` | PASSIVE | AddDevice, removal |
//! | `IoAcquireRemoveLockEx`, `IoReleaseRemoveLockEx` | <= DISPATCH | dispatch routines |
//! | `MmMapIoSpaceEx`, `MmUnmapIoSpace` | <= DISPATCH | start, stop, removal |
//! | `MmGetPhysicalAddress` | any, "provided that the BaseAddress value is valid" (Remarks) | DMA mode: the probe at start, the DumpIo callback |
//! | `Ke(De)RegisterBugCheck(Reason)Callback` | any (but they lock the callback lists) | start, stop |
//! | `DbgPrintEx` | <= DIRQL | PnP diagnostics |
//! | `KeBugCheckEx` | any | the panic handler |
#![allow(non_snake_case)]

use crashmon_guest_driver::wdm::{
    KBUGCHECK_CALLBACK_REASON, KBUGCHECK_CALLBACK_RECORD, KBUGCHECK_REASON_CALLBACK_RECORD,
    PKBUGCHECK_CALLBACK_ROUTINE, PKBUGCHECK_REASON_CALLBACK_ROUTINE, PUCHAR,
};
use crashmon_wdk_types::ntddk::*;

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
extern "system" {
    pub fn IoCreateDevice(
        DriverObject: *mut DRIVER_OBJECT,
        DeviceExtensionSize: ULONG,
        DeviceName: *mut UNICODE_STRING,
        DeviceType: DEVICE_TYPE,
        DeviceCharacteristics: ULONG,
        Exclusive: BOOLEAN,
        DeviceObject: *mut *mut DEVICE_OBJECT,
    ) -> NTSTATUS;
    pub fn IoDeleteDevice(DeviceObject: *mut DEVICE_OBJECT);
    pub fn IoAttachDeviceToDeviceStack(
        SourceDevice: *mut DEVICE_OBJECT,
        TargetDevice: *mut DEVICE_OBJECT,
    ) -> *mut DEVICE_OBJECT;
    pub fn IoDetachDevice(TargetDevice: *mut DEVICE_OBJECT);

    /// `IoCallDriver` is a wdm.h macro for this.
    pub fn IofCallDriver(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP) -> NTSTATUS;
    /// `IoCompleteRequest` is a wdm.h macro for this.
    pub fn IofCompleteRequest(Irp: *mut IRP, PriorityBoost: CCHAR);
    pub fn IoForwardIrpSynchronously(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP) -> BOOLEAN;
    pub fn PoCallDriver(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP) -> NTSTATUS;

    /// `IoInitializeRemoveLock` is a wdm.h macro for this with `sizeof(IO_REMOVE_LOCK)`.
    pub fn IoInitializeRemoveLockEx(
        Lock: *mut IO_REMOVE_LOCK,
        AllocateTag: ULONG,
        MaxLockedMinutes: ULONG,
        HighWatermark: ULONG,
        RemlockSize: ULONG,
    );
    pub fn IoAcquireRemoveLockEx(
        RemoveLock: *mut IO_REMOVE_LOCK,
        Tag: PVOID,
        File: PCSTR,
        Line: ULONG,
        RemlockSize: ULONG,
    ) -> NTSTATUS;
    pub fn IoReleaseRemoveLockEx(RemoveLock: *mut IO_REMOVE_LOCK, Tag: PVOID, RemlockSize: ULONG);
    pub fn IoReleaseRemoveLockAndWaitEx(
        RemoveLock: *mut IO_REMOVE_LOCK,
        Tag: PVOID,
        RemlockSize: ULONG,
    );

    pub fn MmMapIoSpaceEx(
        PhysicalAddress: PHYSICAL_ADDRESS,
        NumberOfBytes: SIZE_T,
        Protect: ULONG,
    ) -> PVOID;
    pub fn MmUnmapIoSpace(BaseAddress: PVOID, NumberOfBytes: SIZE_T);
    /// The physical address behind a valid non-paged virtual address (ntddk.h). Microsoft's
    /// reference page (learn.microsoft.com, "MmGetPhysicalAddress function (ntddk.h)") gives IRQL
    /// "Any level (see Remarks section)", and the Remarks say callers "can be running at any IRQL,
    /// provided that the BaseAddress value is valid": that is why it is the one routine the
    /// bug-check path may call. The page also says not to use it for DMA and points to adapter
    /// objects instead, whose routines a HIGH_LEVEL callback cannot call; the card's DMA mode is
    /// proved at start instead (see `crashmon_card_abi`, "DMA mode").
    ///
    /// `PHYSICAL_ADDRESS` is a `LARGE_INTEGER`, an 8-byte union, which the x64 convention returns
    /// in RAX like a `LONGLONG`: `crashmon_wdk_types` declares it as `i64`.
    pub fn MmGetPhysicalAddress(BaseAddress: PVOID) -> PHYSICAL_ADDRESS;

    pub fn KeRegisterBugCheckReasonCallback(
        CallbackRecord: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        CallbackRoutine: PKBUGCHECK_REASON_CALLBACK_ROUTINE,
        Reason: KBUGCHECK_CALLBACK_REASON,
        Component: PUCHAR,
    ) -> BOOLEAN;
    pub fn KeDeregisterBugCheckReasonCallback(
        CallbackRecord: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    ) -> BOOLEAN;
    pub fn KeRegisterBugCheckCallback(
        CallbackRecord: *mut KBUGCHECK_CALLBACK_RECORD,
        CallbackRoutine: PKBUGCHECK_CALLBACK_ROUTINE,
        Buffer: PVOID,
        Length: ULONG,
        Component: PUCHAR,
    ) -> BOOLEAN;
    pub fn KeDeregisterBugCheckCallback(CallbackRecord: *mut KBUGCHECK_CALLBACK_RECORD) -> BOOLEAN;

    pub fn KeBugCheckEx(
        BugCheckCode: ULONG,
        BugCheckParameter1: ULONG_PTR,
        BugCheckParameter2: ULONG_PTR,
        BugCheckParameter3: ULONG_PTR,
        BugCheckParameter4: ULONG_PTR,
    ) -> !;
}

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
extern "C" {
    /// Variadic, so `cdecl`, which is the one x64 calling convention anyway.
    pub fn DbgPrintEx(ComponentId: ULONG, Level: ULONG, Format: PCSTR, ...) -> ULONG;
}

/// `DPFLTR_IHVDRIVER_ID`: the component for third-party drivers' debug output.
pub const DPFLTR_IHVDRIVER_ID: ULONG = 77;
/// `DPFLTR_ERROR_LEVEL`: shown by default (no Debug Print Filter needed).
pub const DPFLTR_ERROR_LEVEL: ULONG = 0;
/// `DPFLTR_INFO_LEVEL`.
pub const DPFLTR_INFO_LEVEL: ULONG = 3;
