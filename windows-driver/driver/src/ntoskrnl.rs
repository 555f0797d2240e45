//! The routines the driver imports, all from `ntoskrnl.exe`, by name.
//!
//! `raw-dylib`: rustc writes the import entries itself, so no `ntoskrnl.lib` (no WDK) is needed
//! to link. The IRQL column is the documented upper bound from each routine's Requirements; the
//! PE test (`windows-driver/pe-check`) keeps the same table and checks that none of these is
//! reachable from a bug-check callback, except `KeBugCheckEx` (the panic handler's).
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
