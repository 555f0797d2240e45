//! # PCI: finding the crash-monitor card and mapping its BARs
//!
//! Configuration mechanism #1 (address at port 0xCF8, data at 0xCFC) over every bus, device and
//! function. The BARs are used as the firmware (SeaBIOS) assigned them; the guest only sizes them
//! (writing all ones with decoding off, as every OS does), turns on memory decoding and maps
//! them: BAR0 lies in the PCI hole below 4 GiB, which is always mapped (uncached); a 64-bit BAR2
//! above 4 GiB gets an uncached identity mapping of its own.

use crashmon_card_abi as abi;
use crashmon_guest_driver::CardIo;

use crate::boot;
use crate::cpu::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// A PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub device: u8,
    /// Function.
    pub function: u8,
}

impl Function {
    fn address(self, offset: u8) -> u32 {
        1 << 31
            | (self.bus as u32) << 16
            | (self.device as u32) << 11
            | (self.function as u32) << 8
            | (offset as u32 & 0xFC)
    }

    /// Reads the configuration dword at `offset`.
    pub fn read(self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    /// Writes the configuration dword at `offset`.
    pub fn write(self, offset: u8, value: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, value);
    }
}

impl core::fmt::Display for Function {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The first function with this vendor and device ID.
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let f = Function { bus, device: dev, function: func };
                let id = f.read(0);
                if id & 0xFFFF == 0xFFFF {
                    if func == 0 {
                        break; // no device here
                    }
                    continue;
                }
                if id == (device as u32) << 16 | vendor as u32 {
                    return Some(f);
                }
                // Only function 0 unless the device is multi-function.
                if func == 0 && f.read(0x0C) & 0x0080_0000 == 0 {
                    break;
                }
            }
        }
    }
    None
}

/// A memory BAR as the firmware assigned it.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    /// Physical base.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit BAR (using the next BAR register too).
    pub is_64: bool,
}

const COMMAND: u8 = 0x04;
const COMMAND_MEMORY: u32 = 1 << 1;

/// Reads and sizes memory BAR `index`. `None` for an I/O or unimplemented BAR.
pub fn bar(f: Function, index: usize) -> Option<Bar> {
    let offset = 0x10 + 4 * index as u8;
    let low = f.read(offset);
    if low & 1 != 0 {
        return None;
    }
    let is_64 = (low >> 1) & 3 == 2;
    let high = if is_64 { f.read(offset + 4) } else { 0 };
    // Size with decoding off, then restore.
    let command = f.read(COMMAND);
    f.write(COMMAND, command & !COMMAND_MEMORY);
    f.write(offset, 0xFFFF_FFFF);
    let mut mask = (f.read(offset) & !0xF) as u64;
    f.write(offset, low);
    if is_64 {
        f.write(offset + 4, 0xFFFF_FFFF);
        mask |= (f.read(offset + 4) as u64) << 32;
        f.write(offset + 4, high);
    } else {
        mask |= 0xFFFF_FFFF_0000_0000;
    }
    f.write(COMMAND, command);
    if mask == 0 || mask == 0xFFFF_FFFF_0000_0000 {
        return None;
    }
    Some(Bar {
        base: (high as u64) << 32 | (low & !0xF) as u64,
        size: (!mask).wrapping_add(1),
        is_64,
    })
}

/// Turns on memory-space decoding.
pub fn enable_memory(f: Function) {
    f.write(COMMAND, f.read(COMMAND) | COMMAND_MEMORY);
}

/// The card's BARs through the identity map, as the driver's [`CardIo`].
#[derive(Clone, Copy, Debug)]
pub struct GuestCardIo {
    registers: u64,
    window: u64,
    window_size: u64,
    /// Whether `MmGetPhysicalAddress` answers (`dma=off` makes it know no address).
    physical_addresses: bool,
}

impl GuestCardIo {
    /// The same card, with `MmGetPhysicalAddress` answering or not.
    pub fn with_physical_addresses(self, on: bool) -> Self {
        Self { physical_addresses: on, ..self }
    }
}

impl CardIo for GuestCardIo {
    fn read_register(&self, offset: u32) -> u32 {
        // SAFETY: BAR0 is mapped uncached and the offset is within its 4 KiB (the driver only
        // uses the datasheet's registers).
        unsafe { core::ptr::read_volatile((self.registers + offset as u64) as *const u32) }
    }

    fn write_register(&self, offset: u32, value: u32) {
        // SAFETY: as for read_register.
        unsafe { core::ptr::write_volatile((self.registers + offset as u64) as *mut u32, value) }
    }

    fn write_window(&self, offset: usize, data: &[u8]) {
        if offset as u64 + data.len() as u64 > self.window_size {
            return;
        }
        // SAFETY: BAR2 is mapped and the range is inside it (checked above); the data window
        // is plain memory with no side effects on write.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.window + offset as u64) as *mut u8,
                data.len(),
            )
        }
    }

    /// `MmGetPhysicalAddress`: a walk of the live page tables from CR3 (reads only, no lock:
    /// callable on the bug-check path like Windows' routine).
    fn get_physical_address(&self, va: usize) -> u64 {
        if !self.physical_addresses {
            return 0;
        }
        boot::translate(va as u64).unwrap_or(0)
    }
}

/// Finds the card, checks its BARs, enables decoding and maps them.
pub fn find_card() -> Result<(Function, GuestCardIo), &'static str> {
    let f = find(abi::PCI_VENDOR_ID, abi::PCI_DEVICE_ID)
        .ok_or("no crash-monitor card on the PCI bus")?;
    let bar0 = bar(f, abi::BAR0_INDEX).ok_or("BAR0 is not a memory BAR")?;
    let bar2 = bar(f, abi::BAR2_INDEX).ok_or("BAR2 is not a memory BAR")?;
    if bar0.base == 0 || bar2.base == 0 {
        return Err("the firmware left a BAR unassigned");
    }
    if bar0.size < abi::BAR0_SIZE || bar2.size < abi::BAR2_SIZE {
        return Err("a BAR is smaller than the datasheet says");
    }
    enable_memory(f);
    boot::map_identity(bar0.base, bar0.size, true)?;
    boot::map_identity(bar2.base, bar2.size, true)?;
    crate::println!(
        "CRASHMON CARD bdf={} bar0={:#x} bar2={:#x} bar2_size={:#x}{}",
        f,
        bar0.base,
        bar2.base,
        bar2.size,
        if bar2.is_64 { " 64-bit" } else { "" }
    );
    Ok((
        f,
        GuestCardIo {
            registers: bar0.base,
            window: bar2.base,
            window_size: bar2.size,
            physical_addresses: true,
        },
    ))
}
