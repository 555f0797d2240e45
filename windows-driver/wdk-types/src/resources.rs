//! Finding the card's BARs in the translated resources of `IRP_MN_START_DEVICE`.
//!
//! The PCI bus driver reports a device's memory BARs as memory descriptors in BAR order, so the
//! card's (datasheet: BAR0 registers, BAR2 data window; no I/O ports, no interrupt) arrive as the
//! first and second memory descriptors. The driver checks each is at least as large as the
//! datasheet says; whether BAR0 really holds the card's registers is then checked by
//! [`crashmon_guest_driver::Card::probe`] reading the magic value.
//!
//! Uses only `core` and [`crate::ntddk`], so the host-side tests (`windows-driver/pe-check`)
//! run it too.
#![allow(non_upper_case_globals)]

use crate::ntddk::*;
use crashmon_card_abi as abi;

/// One memory range from a resource list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// CPU physical address (translated).
    pub start: PHYSICAL_ADDRESS,
    /// Length in bytes.
    pub length: u64,
    /// `CM_RESOURCE_MEMORY_*` flags.
    pub flags: u16,
}

/// The card's two BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardResources {
    /// The register file.
    pub bar0: MemoryRange,
    /// The data window.
    pub bar2: MemoryRange,
}

/// Why the resources do not describe the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceError {
    /// The list is missing (NULL).
    NoList,
    /// Fewer than two memory ranges.
    MissingBar,
    /// A BAR is smaller than the datasheet's size.
    TooSmall {
        /// 0 or 2.
        bar: u8,
        /// What the list says.
        length: u64,
    },
}

/// The length of a memory descriptor, decoding `CmResourceTypeMemoryLarge`'s shifted lengths.
// `#[inline]` here and on `card_resources`: they run only in the driver's start routine, which is
// in the pageable `PAGE` section. Without it a function from another crate is not inlined (no
// LTO) and would be compiled into resident `.text` on its own.
#[inline]
pub fn memory_length(descriptor: &CM_PARTIAL_RESOURCE_DESCRIPTOR) -> Option<u64> {
    // SAFETY: both union members are plain integers, valid for any bytes; copies of packed
    // fields are taken by value.
    let memory = unsafe { descriptor.u.Memory };
    let length = memory.Length as u64;
    match descriptor.Type {
        CmResourceTypeMemory => Some(length),
        CmResourceTypeMemoryLarge => {
            let flags = descriptor.Flags;
            if flags & CM_RESOURCE_MEMORY_LARGE_40 != 0 {
                Some(length << 8)
            } else if flags & CM_RESOURCE_MEMORY_LARGE_48 != 0 {
                Some(length << 16)
            } else if flags & CM_RESOURCE_MEMORY_LARGE_64 != 0 {
                Some(length << 32)
            } else {
                Some(length)
            }
        }
        _ => None,
    }
}

/// Finds BAR0 and BAR2 in a translated `CM_RESOURCE_LIST`.
///
/// # Safety
/// `list` must be NULL or point to a valid `CM_RESOURCE_LIST` (as the PnP manager passes in
/// `Parameters.StartDevice.AllocatedResourcesTranslated`), readable for its full variable length.
#[inline]
pub unsafe fn card_resources(
    list: *const CM_RESOURCE_LIST,
) -> Result<CardResources, ResourceError> {
    if list.is_null() {
        return Err(ResourceError::NoList);
    }
    let mut found: [Option<MemoryRange>; 2] = [None, None];
    let mut next = 0;
    // SAFETY: per the contract the list is valid; every pointer below is derived from `list`
    // with the list's own counts, walking the variable-length layout wdm.h describes: each full
    // descriptor is followed directly by the next.
    unsafe {
        let count = (*list).Count;
        let mut full = core::ptr::addr_of!((*list).List) as *const CM_FULL_RESOURCE_DESCRIPTOR;
        for _ in 0..count {
            let partial_count = (*full).PartialResourceList.Count as usize;
            let first = core::ptr::addr_of!((*full).PartialResourceList.PartialDescriptors)
                as *const CM_PARTIAL_RESOURCE_DESCRIPTOR;
            for i in 0..partial_count {
                let descriptor = &*first.add(i);
                if next < found.len() {
                    if let Some(length) = memory_length(descriptor) {
                        let memory = descriptor.u.Memory;
                        found[next] = Some(MemoryRange {
                            start: memory.Start,
                            length,
                            flags: descriptor.Flags,
                        });
                        next += 1;
                    }
                }
            }
            full = first.add(partial_count) as *const CM_FULL_RESOURCE_DESCRIPTOR;
        }
    }
    let (Some(bar0), Some(bar2)) = (found[0], found[1]) else {
        return Err(ResourceError::MissingBar);
    };
    if bar0.length < abi::BAR0_SIZE {
        return Err(ResourceError::TooSmall { bar: 0, length: bar0.length });
    }
    if bar2.length < abi::BAR2_SIZE {
        return Err(ResourceError::TooSmall { bar: 2, length: bar2.length });
    }
    Ok(CardResources { bar0, bar2 })
}
