//! The driver's resource-list walk (`crashmon-wdk-types`, which crashmon.sys links), run on the
//! host: finds BAR0 and BAR2 in `CM_RESOURCE_LIST`s laid out byte by byte as wdm.h describes them
//! (building the crate for this 64-bit host also runs its compile-time layout assertions).

use crashmon_card_abi as abi;
use crashmon_wdk_types::ntddk;
use crashmon_wdk_types::resources::{
    self, card_resources, CardResources, MemoryRange, ResourceError,
};

const PCI_BUS: i32 = 5; // INTERFACE_TYPE PCIBus
const PORT: u8 = 1; // CmResourceTypePort
const INTERRUPT: u8 = 2; // CmResourceTypeInterrupt

/// One partial descriptor: type, flags, start, length (u.Generic/u.Memory layout).
struct D(u8, u16, i64, u32);

/// Bytes of a CM_RESOURCE_LIST with one full descriptor per slice, in a u32-aligned buffer.
fn list(fulls: &[&[D]]) -> Vec<u32> {
    let mut b: Vec<u8> = Vec::new();
    b.extend((fulls.len() as u32).to_le_bytes());
    for partials in fulls {
        b.extend(PCI_BUS.to_le_bytes()); // InterfaceType
        b.extend(0u32.to_le_bytes()); // BusNumber
        b.extend(1u16.to_le_bytes()); // Version
        b.extend(1u16.to_le_bytes()); // Revision
        b.extend((partials.len() as u32).to_le_bytes()); // Count
        for D(kind, flags, start, length) in partials.iter() {
            let before = b.len();
            b.push(*kind);
            b.push(1); // CmResourceShareDeviceExclusive
            b.extend(flags.to_le_bytes());
            b.extend(start.to_le_bytes()); // at +4: only 4-byte aligned (pshpack4)
            b.extend(length.to_le_bytes());
            b.extend(0u32.to_le_bytes()); // rest of the 16-byte union
            assert_eq!(b.len() - before, 0x14);
        }
    }
    b.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn parse(words: &[u32]) -> Result<CardResources, ResourceError> {
    // SAFETY: a well-formed list built above, alive for the call.
    unsafe { card_resources(words.as_ptr() as *const ntddk::CM_RESOURCE_LIST) }
}

#[test]
fn finds_the_bars_among_other_resources() {
    let words = list(&[&[
        D(PORT, 0, 0xC000, 0x20),
        D(ntddk::CmResourceTypeMemory, 0, 0xFEB0_0000, abi::BAR0_SIZE as u32),
        D(INTERRUPT, 0, 0, 0),
        D(
            ntddk::CmResourceTypeMemory,
            ntddk::CM_RESOURCE_MEMORY_PREFETCHABLE,
            0x8_0000_0000,
            abi::BAR2_SIZE as u32,
        ),
    ]]);
    let found = parse(&words).unwrap();
    assert_eq!(found.bar0, MemoryRange { start: 0xFEB0_0000, length: abi::BAR0_SIZE, flags: 0 });
    assert_eq!(
        found.bar2,
        MemoryRange {
            start: 0x8_0000_0000,
            length: abi::BAR2_SIZE,
            flags: ntddk::CM_RESOURCE_MEMORY_PREFETCHABLE
        }
    );
}

#[test]
fn walks_across_full_descriptors_and_decodes_large_memory() {
    let words = list(&[
        &[D(ntddk::CmResourceTypeMemory, 0, 0x1000_0000, 0x2000)],
        &[
            D(PORT, 0, 0xD000, 0x10),
            // 0x40 << 16 = 4 MiB, as CM_RESOURCE_MEMORY_LARGE_48 stores it.
            D(
                ntddk::CmResourceTypeMemoryLarge,
                ntddk::CM_RESOURCE_MEMORY_LARGE_48,
                0x100_0000_0000,
                0x40,
            ),
        ],
    ]);
    let found = parse(&words).unwrap();
    assert_eq!((found.bar0.start, found.bar0.length), (0x1000_0000, 0x2000));
    assert_eq!((found.bar2.start, found.bar2.length), (0x100_0000_0000, 0x40_0000));
}

#[test]
fn refuses_lists_that_are_not_the_card() {
    assert_eq!(
        parse(&list(&[&[D(ntddk::CmResourceTypeMemory, 0, 0x1000, 0x1000)]])),
        Err(ResourceError::MissingBar)
    );
    assert_eq!(
        parse(&list(&[&[
            D(ntddk::CmResourceTypeMemory, 0, 0x1000, 0x800),
            D(ntddk::CmResourceTypeMemory, 0, 0x2000_0000, 0x40_0000)
        ]])),
        Err(ResourceError::TooSmall { bar: 0, length: 0x800 })
    );
    assert_eq!(
        parse(&list(&[&[
            D(ntddk::CmResourceTypeMemory, 0, 0x1000, 0x1000),
            D(ntddk::CmResourceTypeMemory, 0, 0x2000_0000, 0x1000)
        ]])),
        Err(ResourceError::TooSmall { bar: 2, length: 0x1000 })
    );
    assert_eq!(parse(&list(&[])), Err(ResourceError::MissingBar));
    // SAFETY: NULL is allowed.
    assert_eq!(unsafe { card_resources(std::ptr::null()) }, Err(ResourceError::NoList));
}

#[test]
fn memory_length_decodes_each_large_encoding() {
    let d = |kind, flags, length| ntddk::CM_PARTIAL_RESOURCE_DESCRIPTOR {
        Type: kind,
        ShareDisposition: 0,
        Flags: flags,
        u: ntddk::CM_PARTIAL_RESOURCE_DESCRIPTOR_u {
            Memory: ntddk::CM_MEMORY { Start: 0, Length: length },
        },
    };
    use ntddk::*;
    assert_eq!(resources::memory_length(&d(CmResourceTypeMemory, 0, 0x1000)), Some(0x1000));
    assert_eq!(
        resources::memory_length(&d(CmResourceTypeMemoryLarge, CM_RESOURCE_MEMORY_LARGE_40, 1)),
        Some(1 << 8)
    );
    assert_eq!(
        resources::memory_length(&d(CmResourceTypeMemoryLarge, CM_RESOURCE_MEMORY_LARGE_48, 1)),
        Some(1 << 16)
    );
    assert_eq!(
        resources::memory_length(&d(CmResourceTypeMemoryLarge, CM_RESOURCE_MEMORY_LARGE_64, 1)),
        Some(1 << 32)
    );
    assert_eq!(resources::memory_length(&d(1, 0, 0x10)), None);
}
