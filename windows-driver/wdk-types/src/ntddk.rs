//! # wdm.h, the I/O-manager part
//!
//! The Windows types the driver's PnP side touches, with wdm.h's names and their x64 layouts
//! (the bug-check types are in `crashmon_guest_driver::wdm`). Structures the system allocates
//! and the driver only reads or patches (`DEVICE_OBJECT`, `IRP`, `DRIVER_EXTENSION`) are
//! declared up to the last field the driver touches, with the rest as opaque padding where the
//! size is known; each field's offset is written beside it and checked, with the size, by the
//! compile-time assertions at the end (the offsets are those `dt nt!_X` shows on x64 Windows 10
//! and 11, stable since Windows Vista).
//!
//! The wdm.h macros the driver uses (`IoGetCurrentIrpStackLocation`,
//! `IoSkipCurrentIrpStackLocation`, `NT_SUCCESS`) are functions here, with the macros' exact
//! semantics.
//!
//! It uses only `core`, so the host-side tests (`windows-driver/pe-check`) use it too and check
//! the layouts on the build machine.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    clippy::upper_case_acronyms
)]

use core::ffi::c_void;

/// `NTSTATUS`.
pub type NTSTATUS = i32;
/// `CSHORT`.
pub type CSHORT = i16;
/// `USHORT`.
pub type USHORT = u16;
/// `ULONG`.
pub type ULONG = u32;
/// `LONG`.
pub type LONG = i32;
/// `UCHAR`.
pub type UCHAR = u8;
/// `CCHAR`.
pub type CCHAR = i8;
/// `BOOLEAN`.
pub type BOOLEAN = u8;
/// `ULONG_PTR`.
pub type ULONG_PTR = usize;
/// `SIZE_T`.
pub type SIZE_T = usize;
/// `PVOID`.
pub type PVOID = *mut c_void;
/// `PCSTR`.
pub type PCSTR = *const u8;
/// `PHYSICAL_ADDRESS`: a `LARGE_INTEGER`, passed by value in one register on x64.
pub type PHYSICAL_ADDRESS = i64;
/// `DEVICE_TYPE`.
pub type DEVICE_TYPE = ULONG;

/// `NT_SUCCESS(Status)`: success and informational codes (severity bits 00 and 01).
pub const fn NT_SUCCESS(status: NTSTATUS) -> bool {
    status >= 0
}

/// `STATUS_SUCCESS`.
pub const STATUS_SUCCESS: NTSTATUS = 0;
/// `STATUS_UNSUCCESSFUL`.
pub const STATUS_UNSUCCESSFUL: NTSTATUS = 0xC000_0001_u32 as i32;
/// `STATUS_NO_SUCH_DEVICE`.
pub const STATUS_NO_SUCH_DEVICE: NTSTATUS = 0xC000_000E_u32 as i32;
/// `STATUS_INSUFFICIENT_RESOURCES`.
pub const STATUS_INSUFFICIENT_RESOURCES: NTSTATUS = 0xC000_009A_u32 as i32;
/// `STATUS_DEVICE_NOT_READY`.
pub const STATUS_DEVICE_NOT_READY: NTSTATUS = 0xC000_00A3_u32 as i32;
/// `STATUS_DEVICE_CONFIGURATION_ERROR`.
pub const STATUS_DEVICE_CONFIGURATION_ERROR: NTSTATUS = 0xC000_0182_u32 as i32;
/// `STATUS_REVISION_MISMATCH`.
pub const STATUS_REVISION_MISMATCH: NTSTATUS = 0xC000_0059_u32 as i32;
/// `STATUS_DEVICE_BUSY` (a warning: `NT_SUCCESS` is false).
pub const STATUS_DEVICE_BUSY: NTSTATUS = 0x8000_0011_u32 as i32;

/// `IO_NO_INCREMENT`: the priority boost for `IoCompleteRequest`.
pub const IO_NO_INCREMENT: CCHAR = 0;

/// `FILE_DEVICE_UNKNOWN`.
pub const FILE_DEVICE_UNKNOWN: DEVICE_TYPE = 0x22;
/// `FILE_DEVICE_SECURE_OPEN`.
pub const FILE_DEVICE_SECURE_OPEN: ULONG = 0x100;
/// `DO_POWER_PAGABLE`: power IRPs reach the driver at PASSIVE_LEVEL.
pub const DO_POWER_PAGABLE: ULONG = 0x2000;
/// `DO_DEVICE_INITIALIZING`: cleared by AddDevice when the device object is ready.
pub const DO_DEVICE_INITIALIZING: ULONG = 0x80;

/// `IRP_MJ_POWER`.
pub const IRP_MJ_POWER: u8 = 0x16;
/// `IRP_MJ_PNP`.
pub const IRP_MJ_PNP: u8 = 0x1B;
/// `IRP_MJ_MAXIMUM_FUNCTION`.
pub const IRP_MJ_MAXIMUM_FUNCTION: usize = 0x1B;

/// `IRP_MN_START_DEVICE`.
pub const IRP_MN_START_DEVICE: u8 = 0x00;
/// `IRP_MN_QUERY_REMOVE_DEVICE`.
pub const IRP_MN_QUERY_REMOVE_DEVICE: u8 = 0x01;
/// `IRP_MN_REMOVE_DEVICE`.
pub const IRP_MN_REMOVE_DEVICE: u8 = 0x02;
/// `IRP_MN_CANCEL_REMOVE_DEVICE`.
pub const IRP_MN_CANCEL_REMOVE_DEVICE: u8 = 0x03;
/// `IRP_MN_STOP_DEVICE`.
pub const IRP_MN_STOP_DEVICE: u8 = 0x04;
/// `IRP_MN_QUERY_STOP_DEVICE`.
pub const IRP_MN_QUERY_STOP_DEVICE: u8 = 0x05;
/// `IRP_MN_CANCEL_STOP_DEVICE`.
pub const IRP_MN_CANCEL_STOP_DEVICE: u8 = 0x06;
/// `IRP_MN_SURPRISE_REMOVAL`.
pub const IRP_MN_SURPRISE_REMOVAL: u8 = 0x17;

/// `PAGE_READWRITE`.
pub const PAGE_READWRITE: ULONG = 0x04;
/// `PAGE_NOCACHE`: uncached, for registers.
pub const PAGE_NOCACHE: ULONG = 0x200;
/// `PAGE_WRITECOMBINE`: write-combined, for a prefetchable data window.
pub const PAGE_WRITECOMBINE: ULONG = 0x400;

/// `CmResourceTypeMemory`.
pub const CmResourceTypeMemory: UCHAR = 3;
/// `CmResourceTypeMemoryLarge`: a memory range whose length is stored shifted (see `Flags`).
pub const CmResourceTypeMemoryLarge: UCHAR = 7;
/// `CM_RESOURCE_MEMORY_PREFETCHABLE`.
pub const CM_RESOURCE_MEMORY_PREFETCHABLE: USHORT = 0x0004;
/// `CM_RESOURCE_MEMORY_LARGE_40`: length is `Length40 << 8`.
pub const CM_RESOURCE_MEMORY_LARGE_40: USHORT = 0x0200;
/// `CM_RESOURCE_MEMORY_LARGE_48`: length is `Length48 << 16`.
pub const CM_RESOURCE_MEMORY_LARGE_48: USHORT = 0x0400;
/// `CM_RESOURCE_MEMORY_LARGE_64`: length is `Length64 << 32`.
pub const CM_RESOURCE_MEMORY_LARGE_64: USHORT = 0x0800;

/// `UNICODE_STRING`. Size 0x10.
#[repr(C)]
pub struct UNICODE_STRING {
    /// 0x00: bytes in use.
    pub Length: USHORT,
    /// 0x02: bytes allocated.
    pub MaximumLength: USHORT,
    /// 0x08.
    pub Buffer: *mut u16,
}

/// `DRIVER_INITIALIZE` (`DriverEntry`).
pub type DRIVER_INITIALIZE = unsafe extern "system" fn(
    DriverObject: *mut DRIVER_OBJECT,
    RegistryPath: *mut UNICODE_STRING,
) -> NTSTATUS;
/// `DRIVER_ADD_DEVICE`.
pub type DRIVER_ADD_DEVICE = unsafe extern "system" fn(
    DriverObject: *mut DRIVER_OBJECT,
    PhysicalDeviceObject: *mut DEVICE_OBJECT,
) -> NTSTATUS;
/// `DRIVER_UNLOAD`.
pub type DRIVER_UNLOAD = unsafe extern "system" fn(DriverObject: *mut DRIVER_OBJECT);
/// `DRIVER_DISPATCH`.
pub type DRIVER_DISPATCH =
    unsafe extern "system" fn(DeviceObject: *mut DEVICE_OBJECT, Irp: *mut IRP) -> NTSTATUS;

/// `DRIVER_OBJECT`, allocated by the I/O manager. Size 0x150.
#[repr(C)]
pub struct DRIVER_OBJECT {
    /// 0x000: `IO_TYPE_DRIVER`.
    pub Type: CSHORT,
    /// 0x002.
    pub Size: CSHORT,
    /// 0x008: the driver's device objects.
    pub DeviceObject: *mut DEVICE_OBJECT,
    /// 0x010.
    pub Flags: ULONG,
    /// 0x018: the image's base.
    pub DriverStart: PVOID,
    /// 0x020.
    pub DriverSize: ULONG,
    /// 0x028.
    pub DriverSection: PVOID,
    /// 0x030: holds `AddDevice`.
    pub DriverExtension: *mut DRIVER_EXTENSION,
    /// 0x038.
    pub DriverName: UNICODE_STRING,
    /// 0x048.
    pub HardwareDatabase: *mut UNICODE_STRING,
    /// 0x050.
    pub FastIoDispatch: PVOID,
    /// 0x058.
    pub DriverInit: Option<DRIVER_INITIALIZE>,
    /// 0x060.
    pub DriverStartIo: PVOID,
    /// 0x068.
    pub DriverUnload: Option<DRIVER_UNLOAD>,
    /// 0x070: one dispatch routine per `IRP_MJ_*`.
    pub MajorFunction: [Option<DRIVER_DISPATCH>; IRP_MJ_MAXIMUM_FUNCTION + 1],
}

/// `DRIVER_EXTENSION`: its documented head (the system's private fields follow).
#[repr(C)]
pub struct DRIVER_EXTENSION {
    /// 0x00.
    pub DriverObject: *mut DRIVER_OBJECT,
    /// 0x08: the PnP manager calls it for each device the INF matched.
    pub AddDevice: Option<DRIVER_ADD_DEVICE>,
    /// 0x10.
    pub Count: ULONG,
    /// 0x18.
    pub ServiceKeyName: UNICODE_STRING,
}

/// `DEVICE_OBJECT`, allocated by `IoCreateDevice`. Size 0x150; the fields after `StackSize`
/// (device queue, DPC, lock, ...) are the system's and opaque here.
#[repr(C)]
pub struct DEVICE_OBJECT {
    /// 0x000: `IO_TYPE_DEVICE`.
    pub Type: CSHORT,
    /// 0x002.
    pub Size: USHORT,
    /// 0x004.
    pub ReferenceCount: LONG,
    /// 0x008.
    pub DriverObject: *mut DRIVER_OBJECT,
    /// 0x010.
    pub NextDevice: *mut DEVICE_OBJECT,
    /// 0x018.
    pub AttachedDevice: *mut DEVICE_OBJECT,
    /// 0x020.
    pub CurrentIrp: *mut IRP,
    /// 0x028.
    pub Timer: PVOID,
    /// 0x030: `DO_*`.
    pub Flags: ULONG,
    /// 0x034: `FILE_*` characteristics.
    pub Characteristics: ULONG,
    /// 0x038.
    pub Vpb: PVOID,
    /// 0x040: the driver's per-device storage (zeroed by `IoCreateDevice`, non-paged).
    pub DeviceExtension: PVOID,
    /// 0x048.
    pub DeviceType: DEVICE_TYPE,
    /// 0x04C.
    pub StackSize: CCHAR,
    /// 0x050..0x150: `Queue`, `AlignmentRequirement`, `DeviceQueue`, `Dpc`,
    /// `ActiveThreadCount`, `SecurityDescriptor`, `DeviceLock`, `SectorSize`, `Spare1`,
    /// `DeviceObjectExtension`, `Reserved`.
    _opaque: [u64; 0x20],
}

/// `IO_STATUS_BLOCK`. Size 0x10.
#[repr(C)]
pub struct IO_STATUS_BLOCK {
    /// 0x00: `Status` (or `Pointer`, the other member of the union).
    pub Status: IO_STATUS_BLOCK_0,
    /// 0x08.
    pub Information: ULONG_PTR,
}

/// The `Status`/`Pointer` union of `IO_STATUS_BLOCK`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IO_STATUS_BLOCK_0 {
    /// The status.
    pub Status: NTSTATUS,
    /// Reserved for the system.
    pub Pointer: PVOID,
}

/// `IRP`, allocated by the I/O manager, followed by its stack locations. Size 0xD0 (without
/// them). Only the fields the wdm.h macros and the driver use are named.
#[repr(C)]
pub struct IRP {
    /// 0x00: `IO_TYPE_IRP`.
    pub Type: CSHORT,
    /// 0x02.
    pub Size: USHORT,
    /// 0x04..0x30: `AllocationProcessorNumber`, `Reserved`, `MdlAddress`, `Flags`,
    /// `AssociatedIrp`, `ThreadListEntry`.
    _head: [u8; 0x2C],
    /// 0x30.
    pub IoStatus: IO_STATUS_BLOCK,
    /// 0x40.
    pub RequestorMode: i8,
    /// 0x41.
    pub PendingReturned: BOOLEAN,
    /// 0x42: number of stack locations.
    pub StackCount: CCHAR,
    /// 0x43: index of the current stack location (1-based; counts down as the IRP goes down).
    pub CurrentLocation: CCHAR,
    /// 0x44..0xB8: `Cancel`, `CancelIrql`, `ApcEnvironment`, `AllocationFlags`, `UserIosb`,
    /// `UserEvent`, `Overlay`, `CancelRoutine`, `UserBuffer`, and the head of
    /// `Tail.Overlay` (`DeviceQueueEntry`/`DriverContext`, `Thread`, `AuxiliaryBuffer`,
    /// `ListEntry`).
    _middle: [u8; 0x74],
    /// 0xB8: `Tail.Overlay.CurrentStackLocation`.
    pub CurrentStackLocation: *mut IO_STACK_LOCATION,
    /// 0xC0..0xD0: `Tail.Overlay.OriginalFileObject` and the rest of the `Tail` union.
    _tail: [u64; 2],
}

/// `IO_STACK_LOCATION`. Size 0x48.
#[repr(C)]
pub struct IO_STACK_LOCATION {
    /// 0x00: `IRP_MJ_*`.
    pub MajorFunction: UCHAR,
    /// 0x01: `IRP_MN_*`.
    pub MinorFunction: UCHAR,
    /// 0x02.
    pub Flags: UCHAR,
    /// 0x03: `SL_*`.
    pub Control: UCHAR,
    /// 0x08.
    pub Parameters: IO_STACK_LOCATION_PARAMETERS,
    /// 0x28.
    pub DeviceObject: *mut DEVICE_OBJECT,
    /// 0x30.
    pub FileObject: PVOID,
    /// 0x38.
    pub CompletionRoutine: PVOID,
    /// 0x40.
    pub Context: PVOID,
}

/// The `Parameters` union of `IO_STACK_LOCATION` (the members the driver uses). Size 0x20.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IO_STACK_LOCATION_PARAMETERS {
    /// `IRP_MN_START_DEVICE`.
    pub StartDevice: START_DEVICE_PARAMETERS,
    /// `Others`: the union's full size.
    pub Others: [PVOID; 4],
}

/// `Parameters.StartDevice`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct START_DEVICE_PARAMETERS {
    /// 0x00: raw (bus-relative) resources.
    pub AllocatedResources: *mut CM_RESOURCE_LIST,
    /// 0x08: translated (CPU physical) resources: what `MmMapIoSpaceEx` takes.
    pub AllocatedResourcesTranslated: *mut CM_RESOURCE_LIST,
}

/// `IoGetCurrentIrpStackLocation(Irp)`.
///
/// # Safety
/// `irp` must be a valid IRP the caller owns.
pub unsafe fn IoGetCurrentIrpStackLocation(irp: *mut IRP) -> *mut IO_STACK_LOCATION {
    // SAFETY: the caller passes a valid IRP.
    unsafe { (*irp).CurrentStackLocation }
}

/// `IoSkipCurrentIrpStackLocation(Irp)`: the next driver reuses this driver's stack location.
///
/// # Safety
/// `irp` must be a valid IRP the caller owns and is about to pass down.
pub unsafe fn IoSkipCurrentIrpStackLocation(irp: *mut IRP) {
    // SAFETY: the caller owns the IRP; the macro's two increments, exactly.
    unsafe {
        (*irp).CurrentLocation += 1;
        (*irp).CurrentStackLocation = (*irp).CurrentStackLocation.add(1);
    }
}

/// `KEVENT`: a dispatcher header (opaque here). Size 0x18.
#[repr(C)]
pub struct KEVENT {
    _header: [u64; 3],
}

/// `IO_REMOVE_LOCK` as a free (non-DBG) build declares it: `IO_REMOVE_LOCK_COMMON_BLOCK` only.
/// Its size is passed to the `Io*RemoveLockEx` routines, which is how the kernel tells a free
/// build's lock from a checked one's. Size 0x20.
#[repr(C)]
pub struct IO_REMOVE_LOCK {
    /// 0x00.
    pub Removed: BOOLEAN,
    /// 0x01.
    pub Reserved: [BOOLEAN; 3],
    /// 0x04.
    pub IoCount: LONG,
    /// 0x08.
    pub RemoveEvent: KEVENT,
}

/// `CM_PARTIAL_RESOURCE_DESCRIPTOR`, declared inside `#include <pshpack4.h>` in wdm.h, hence
/// `packed(4)`: `u` starts at 0x04 and its 64-bit `Start` is only 4-byte aligned. Size 0x14
/// (`u` is 0x10 on x64 because of `u.Interrupt.Affinity`, a `KAFFINITY`).
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct CM_PARTIAL_RESOURCE_DESCRIPTOR {
    /// 0x00: `CmResourceType*`.
    pub Type: UCHAR,
    /// 0x01.
    pub ShareDisposition: UCHAR,
    /// 0x02: type-specific flags (`CM_RESOURCE_MEMORY_*` for memory).
    pub Flags: USHORT,
    /// 0x04: the type-specific union.
    pub u: CM_PARTIAL_RESOURCE_DESCRIPTOR_u,
}

/// The union `u` of `CM_PARTIAL_RESOURCE_DESCRIPTOR` (the members the driver reads, and its full
/// size). Size 0x10.
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub union CM_PARTIAL_RESOURCE_DESCRIPTOR_u {
    /// `u.Memory` (`CmResourceTypeMemory`).
    pub Memory: CM_MEMORY,
    /// `u.Memory40`/`Memory48`/`Memory64` (`CmResourceTypeMemoryLarge`): the same layout with the
    /// length stored shifted right by 8, 16 or 32.
    pub MemoryLarge: CM_MEMORY,
    /// The union's full x64 size (`u.Interrupt`: Level, Group, Vector, Affinity).
    pub Raw: [u32; 4],
}

/// `u.Memory`: `PHYSICAL_ADDRESS Start; ULONG Length;` (packed to 4). Size 0x0C.
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct CM_MEMORY {
    /// 0x00.
    pub Start: PHYSICAL_ADDRESS,
    /// 0x08.
    pub Length: ULONG,
}

/// `CM_PARTIAL_RESOURCE_LIST`: a header and `Count` descriptors (one declared).
#[repr(C)]
pub struct CM_PARTIAL_RESOURCE_LIST {
    /// 0x00.
    pub Version: USHORT,
    /// 0x02.
    pub Revision: USHORT,
    /// 0x04.
    pub Count: ULONG,
    /// 0x08.
    pub PartialDescriptors: [CM_PARTIAL_RESOURCE_DESCRIPTOR; 1],
}

/// `CM_FULL_RESOURCE_DESCRIPTOR`: one bus's resources. Variable length: the next one starts
/// right after the last of its `Count` partial descriptors.
#[repr(C)]
pub struct CM_FULL_RESOURCE_DESCRIPTOR {
    /// 0x00: `INTERFACE_TYPE` (an enum, so `int`-sized).
    pub InterfaceType: i32,
    /// 0x04.
    pub BusNumber: ULONG,
    /// 0x08.
    pub PartialResourceList: CM_PARTIAL_RESOURCE_LIST,
}

/// `CM_RESOURCE_LIST`: `Count` full descriptors (one declared).
#[repr(C)]
pub struct CM_RESOURCE_LIST {
    /// 0x00.
    pub Count: ULONG,
    /// 0x04.
    pub List: [CM_FULL_RESOURCE_DESCRIPTOR; 1],
}

// The x64 layouts.
#[cfg(target_pointer_width = "64")]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<UNICODE_STRING>() == 0x10);
    assert!(offset_of!(UNICODE_STRING, Buffer) == 0x08);

    assert!(size_of::<DRIVER_OBJECT>() == 0x150);
    assert!(offset_of!(DRIVER_OBJECT, DeviceObject) == 0x008);
    assert!(offset_of!(DRIVER_OBJECT, Flags) == 0x010);
    assert!(offset_of!(DRIVER_OBJECT, DriverStart) == 0x018);
    assert!(offset_of!(DRIVER_OBJECT, DriverSize) == 0x020);
    assert!(offset_of!(DRIVER_OBJECT, DriverSection) == 0x028);
    assert!(offset_of!(DRIVER_OBJECT, DriverExtension) == 0x030);
    assert!(offset_of!(DRIVER_OBJECT, DriverName) == 0x038);
    assert!(offset_of!(DRIVER_OBJECT, HardwareDatabase) == 0x048);
    assert!(offset_of!(DRIVER_OBJECT, FastIoDispatch) == 0x050);
    assert!(offset_of!(DRIVER_OBJECT, DriverInit) == 0x058);
    assert!(offset_of!(DRIVER_OBJECT, DriverStartIo) == 0x060);
    assert!(offset_of!(DRIVER_OBJECT, DriverUnload) == 0x068);
    assert!(offset_of!(DRIVER_OBJECT, MajorFunction) == 0x070);

    assert!(offset_of!(DRIVER_EXTENSION, AddDevice) == 0x08);
    assert!(offset_of!(DRIVER_EXTENSION, Count) == 0x10);
    assert!(offset_of!(DRIVER_EXTENSION, ServiceKeyName) == 0x18);

    assert!(size_of::<DEVICE_OBJECT>() == 0x150);
    assert!(offset_of!(DEVICE_OBJECT, ReferenceCount) == 0x004);
    assert!(offset_of!(DEVICE_OBJECT, DriverObject) == 0x008);
    assert!(offset_of!(DEVICE_OBJECT, NextDevice) == 0x010);
    assert!(offset_of!(DEVICE_OBJECT, AttachedDevice) == 0x018);
    assert!(offset_of!(DEVICE_OBJECT, CurrentIrp) == 0x020);
    assert!(offset_of!(DEVICE_OBJECT, Timer) == 0x028);
    assert!(offset_of!(DEVICE_OBJECT, Flags) == 0x030);
    assert!(offset_of!(DEVICE_OBJECT, Characteristics) == 0x034);
    assert!(offset_of!(DEVICE_OBJECT, Vpb) == 0x038);
    assert!(offset_of!(DEVICE_OBJECT, DeviceExtension) == 0x040);
    assert!(offset_of!(DEVICE_OBJECT, DeviceType) == 0x048);
    assert!(offset_of!(DEVICE_OBJECT, StackSize) == 0x04C);

    assert!(size_of::<IO_STATUS_BLOCK>() == 0x10);
    assert!(offset_of!(IO_STATUS_BLOCK, Information) == 0x08);

    assert!(size_of::<IRP>() == 0xD0);
    assert!(offset_of!(IRP, IoStatus) == 0x30);
    assert!(offset_of!(IRP, RequestorMode) == 0x40);
    assert!(offset_of!(IRP, PendingReturned) == 0x41);
    assert!(offset_of!(IRP, StackCount) == 0x42);
    assert!(offset_of!(IRP, CurrentLocation) == 0x43);
    assert!(offset_of!(IRP, CurrentStackLocation) == 0xB8);

    assert!(size_of::<IO_STACK_LOCATION>() == 0x48);
    assert!(offset_of!(IO_STACK_LOCATION, MinorFunction) == 0x01);
    assert!(offset_of!(IO_STACK_LOCATION, Control) == 0x03);
    assert!(offset_of!(IO_STACK_LOCATION, Parameters) == 0x08);
    assert!(size_of::<IO_STACK_LOCATION_PARAMETERS>() == 0x20);
    assert!(offset_of!(START_DEVICE_PARAMETERS, AllocatedResourcesTranslated) == 0x08);
    assert!(offset_of!(IO_STACK_LOCATION, DeviceObject) == 0x28);
    assert!(offset_of!(IO_STACK_LOCATION, FileObject) == 0x30);
    assert!(offset_of!(IO_STACK_LOCATION, CompletionRoutine) == 0x38);
    assert!(offset_of!(IO_STACK_LOCATION, Context) == 0x40);

    assert!(size_of::<KEVENT>() == 0x18);
    assert!(size_of::<IO_REMOVE_LOCK>() == 0x20);
    assert!(offset_of!(IO_REMOVE_LOCK, IoCount) == 0x04);
    assert!(offset_of!(IO_REMOVE_LOCK, RemoveEvent) == 0x08);

    assert!(size_of::<CM_MEMORY>() == 0x0C);
    assert!(size_of::<CM_PARTIAL_RESOURCE_DESCRIPTOR_u>() == 0x10);
    assert!(size_of::<CM_PARTIAL_RESOURCE_DESCRIPTOR>() == 0x14);
    assert!(align_of::<CM_PARTIAL_RESOURCE_DESCRIPTOR>() == 4);
    assert!(offset_of!(CM_PARTIAL_RESOURCE_DESCRIPTOR, Flags) == 0x02);
    assert!(offset_of!(CM_PARTIAL_RESOURCE_DESCRIPTOR, u) == 0x04);
    assert!(offset_of!(CM_PARTIAL_RESOURCE_LIST, Count) == 0x04);
    assert!(offset_of!(CM_PARTIAL_RESOURCE_LIST, PartialDescriptors) == 0x08);
    assert!(offset_of!(CM_FULL_RESOURCE_DESCRIPTOR, BusNumber) == 0x04);
    assert!(offset_of!(CM_FULL_RESOURCE_DESCRIPTOR, PartialResourceList) == 0x08);
    assert!(size_of::<CM_FULL_RESOURCE_DESCRIPTOR>() == 0x24);
    assert!(offset_of!(CM_RESOURCE_LIST, List) == 0x04);
    assert!(size_of::<CM_RESOURCE_LIST>() == 0x28);
};
