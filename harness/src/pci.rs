//! The card as QEMU sees it: finding it in `query-pci` and checking it against the datasheet
//! (`crashmon_card_abi`).

use crate::qmp::qmp::{PciDeviceInfo, PciInfo, PciMemoryRegion};
use crashmon_card_abi as abi;
use std::fmt::Write;

/// The class code as `query-pci` reports it: base class and subclass, `0x0880`.
pub const CARD_CLASS: i64 = (abi::PCI_CLASS_CODE as i64) << 8 | abi::PCI_SUBCLASS as i64;

/// Every device on every bus, including the buses behind bridges.
pub fn all_devices(buses: &[PciInfo]) -> Vec<&PciDeviceInfo> {
    fn walk<'a>(devices: &'a [PciDeviceInfo], out: &mut Vec<&'a PciDeviceInfo>) {
        for device in devices {
            out.push(device);
            if let Some(behind) = device.pci_bridge.as_ref().and_then(|b| b.devices.as_deref()) {
                walk(behind, out);
            }
        }
    }
    let mut out = Vec::new();
    for bus in buses {
        walk(&bus.devices, &mut out);
    }
    out
}

/// The crash-monitor card (found by vendor and device ID), if the VM has one.
pub fn find_card(buses: &[PciInfo]) -> Option<&PciDeviceInfo> {
    all_devices(buses).into_iter().find(|d| {
        d.id.vendor == i64::from(abi::PCI_VENDOR_ID) && d.id.device == i64::from(abi::PCI_DEVICE_ID)
    })
}

/// The region of BAR `index`, if the device has one.
pub fn bar(device: &PciDeviceInfo, index: usize) -> Option<&PciMemoryRegion> {
    device.regions.iter().find(|r| r.bar == index as i64)
}

/// The differences between the card QEMU shows and the datasheet; empty if there are none.
pub fn datasheet_mismatches(card: &PciDeviceInfo) -> Vec<String> {
    let mut problems = Vec::new();
    if card.class_info.class != CARD_CLASS {
        problems.push(format!("class {:#06x}, expected {CARD_CLASS:#06x}", card.class_info.class));
    }
    let subsystem = (card.id.subsystem_vendor, card.id.subsystem);
    let expected =
        (Some(i64::from(abi::PCI_SUBSYSTEM_VENDOR_ID)), Some(i64::from(abi::PCI_SUBSYSTEM_ID)));
    if subsystem != expected {
        problems.push(format!("subsystem {subsystem:?}, expected {expected:?}"));
    }
    let expect_bar =
        |index: usize, size: u64, wide_prefetchable: bool, problems: &mut Vec<String>| {
            let Some(region) = bar(card, index) else {
                problems.push(format!("no BAR{index}"));
                return;
            };
            let actual = (region.type_.as_str(), region.size, region.mem_type_64, region.prefetch);
            let wanted = ("memory", size as i64, Some(wide_prefetchable), Some(wide_prefetchable));
            if actual != wanted {
                problems.push(format!(
                "BAR{index} is (type, size, 64-bit, prefetchable) {actual:?}, expected {wanted:?}"
            ));
            }
        };
    expect_bar(abi::BAR0_INDEX, abi::BAR0_SIZE, false, &mut problems);
    expect_bar(abi::BAR2_INDEX, abi::BAR2_SIZE, true, &mut problems);
    problems
}

/// A few lines describing a device and its BARs, for people.
pub fn describe(device: &PciDeviceInfo) -> String {
    let mut text = format!(
        "{:02x}:{:02x}.{} vendor {:04x} device {:04x} class {:04x}",
        device.bus,
        device.slot,
        device.function,
        device.id.vendor,
        device.id.device,
        device.class_info.class
    );
    for region in &device.regions {
        let mut kind = region.type_.clone();
        if region.mem_type_64 == Some(true) {
            kind.insert_str(0, "64-bit ");
        }
        if region.prefetch == Some(true) {
            kind.insert_str(0, "prefetchable ");
        }
        let _ = write!(
            text,
            "\n  BAR{}: {kind}, {} at {:#x}",
            region.bar,
            human_size(region.size as u64),
            region.address
        );
    }
    text
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 11.1 answered for a VM with the card attached (trimmed to the host bridge and
    /// the card).
    const QUERY_PCI: &str = r#"[{"bus": 0, "devices": [
        {"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 0, "class_info": {"class": 1536, "desc": "Host bridge"},
         "id": {"device": 10688, "subsystem-vendor": 6900, "vendor": 32902, "subsystem": 4352}, "function": 0, "regions": []},
        {"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 1, "class_info": {"class": 2176},
         "id": {"device": 3329, "subsystem-vendor": 50341, "vendor": 50341, "subsystem": 1}, "function": 0,
         "regions": [{"prefetch": false, "mem_type_64": false, "bar": 0, "size": 4096, "address": 4273987584, "type": "memory"},
                     {"prefetch": true, "mem_type_64": true, "bar": 2, "size": 4194304, "address": 4265607168, "type": "memory"}]}]}]"#;

    #[test]
    fn finds_the_card_and_it_matches_the_datasheet() {
        let buses: Vec<PciInfo> = serde_json::from_str(QUERY_PCI).unwrap();
        let card = find_card(&buses).expect("card");
        assert_eq!(card.slot, 1);
        assert_eq!(datasheet_mismatches(card), Vec::<String>::new());
        let text = describe(card);
        assert!(text.starts_with("00:01.0 vendor c4a5 device 0d01 class 0880"), "{text}");
        assert!(text.contains("BAR0: memory, 4 KiB at 0xfebfe000"), "{text}");
        assert!(text.contains("BAR2: prefetchable 64-bit memory, 4 MiB"), "{text}");
    }

    #[test]
    fn a_wrong_bar_is_reported() {
        let mut buses: Vec<PciInfo> = serde_json::from_str(QUERY_PCI).unwrap();
        buses[0].devices[1].regions[1].prefetch = Some(false);
        buses[0].devices[1].regions.remove(0);
        let problems = datasheet_mismatches(find_card(&buses).unwrap());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0], "no BAR0");
        assert!(problems[1].starts_with("BAR2 is"), "{problems:?}");
    }
}
