//! The card's PCI configuration space (bus plumbing, not device behaviour).
//!
//! 256 bytes of type-0 header with a write mask per byte: identity and class read-only, the
//! command register's memory-space, bus-master and INTx-disable bits writable, BARs that answer
//! the all-ones size probe, no capabilities, no interrupt pin. QEMU virtualizes the BAR
//! addresses itself, but any other vfio-user client probing sizes sees a correct card.

use crashmon_card_abi as abi;

/// Bytes of configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const REVISION_ID: usize = 0x08;
const PROG_IF: usize = 0x09;
const SUBCLASS: usize = 0x0A;
const CLASS_CODE: usize = 0x0B;
const CACHE_LINE_SIZE: usize = 0x0C;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
const SUBSYSTEM_ID: usize = 0x2E;
const INTERRUPT_LINE: usize = 0x3C;

const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

const BAR_MEM_64BIT: u32 = 0b10 << 1;
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;

/// The configuration space of one card.
pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
}

impl Default for PciConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl PciConfigSpace {
    /// The power-on state.
    pub fn new() -> Self {
        let mut c = Self { bytes: [0; CONFIG_SPACE_SIZE], writable: [0; CONFIG_SPACE_SIZE] };
        c.set16(VENDOR_ID, abi::PCI_VENDOR_ID);
        c.set16(DEVICE_ID, abi::PCI_DEVICE_ID);
        c.bytes[REVISION_ID] = abi::PCI_REVISION;
        c.bytes[PROG_IF] = abi::PCI_PROG_IF;
        c.bytes[SUBCLASS] = abi::PCI_SUBCLASS;
        c.bytes[CLASS_CODE] = abi::PCI_CLASS_CODE;
        c.set16(SUBSYSTEM_VENDOR_ID, abi::PCI_SUBSYSTEM_VENDOR_ID);
        c.set16(SUBSYSTEM_ID, abi::PCI_SUBSYSTEM_ID);

        let command_mask = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        c.writable[CACHE_LINE_SIZE] = 0xFF;
        c.writable[INTERRUPT_LINE] = 0xFF;

        // BAR0: 32-bit memory, not prefetchable; address bits below the size are read-only 0.
        let bar0 = BAR0 + 4 * abi::BAR0_INDEX;
        c.writable[bar0..bar0 + 4].copy_from_slice(&(!(abi::BAR0_SIZE as u32 - 1)).to_le_bytes());
        // BAR2/BAR3: one 64-bit prefetchable memory BAR.
        let bar2 = BAR0 + 4 * abi::BAR2_INDEX;
        c.set32(bar2, BAR_MEM_64BIT | BAR_MEM_PREFETCHABLE);
        let mask = !(abi::BAR2_SIZE - 1);
        c.writable[bar2..bar2 + 8].copy_from_slice(&mask.to_le_bytes());
        c.writable[bar2] &= 0xF0;
        c
    }

    /// Reads `out.len()` bytes at `offset`. `None` when out of range.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Option<()> {
        let range = self.range(offset, out.len())?;
        out.copy_from_slice(&self.bytes[range]);
        Some(())
    }

    /// Writes `data` at `offset` through the write mask. `None` when out of range.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<()> {
        let range = self.range(offset, data.len())?;
        for (i, &value) in range.zip(data) {
            let mask = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !mask) | (value & mask);
        }
        Some(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len).filter(|&e| e <= CONFIG_SPACE_SIZE)?;
        Some(start..end)
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &PciConfigSpace, at: u64) -> u32 {
        let mut b = [0; 4];
        c.read(at, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// Sizes a BAR the way firmware does: write all ones, read back, restore.
    fn probe(c: &mut PciConfigSpace, at: u64) -> u32 {
        let old = read32(c, at);
        c.write(at, &u32::MAX.to_le_bytes()).unwrap();
        let v = read32(c, at);
        c.write(at, &old.to_le_bytes()).unwrap();
        v
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = PciConfigSpace::new();
        c.write(0, &[0xFF; 16]).unwrap();
        assert_eq!(read32(&c, 0), (abi::PCI_DEVICE_ID as u32) << 16 | abi::PCI_VENDOR_ID as u32);
        assert_eq!(read32(&c, 8) >> 8, 0x08_80_00);
        assert_eq!(
            read32(&c, 0x2C),
            (abi::PCI_SUBSYSTEM_ID as u32) << 16 | abi::PCI_VENDOR_ID as u32
        );
        assert_eq!(c.command(), 0x0406, "only memory, bus master and INTx-disable stick");
    }

    #[test]
    fn bars_answer_the_size_probe() {
        let mut c = PciConfigSpace::new();
        let bar0 = probe(&mut c, 0x10);
        assert_eq!((!(bar0 & !0xF)).wrapping_add(1) as u64, abi::BAR0_SIZE);
        assert_eq!(bar0 & 0xF, 0, "32-bit, not prefetchable");
        let lo = probe(&mut c, 0x18);
        let hi = probe(&mut c, 0x1C);
        let size = !((hi as u64) << 32 | (lo & !0xF) as u64) + 1;
        assert_eq!(size, abi::BAR2_SIZE);
        assert_eq!(lo & 0xF, 0b1100, "64-bit prefetchable");
        for unused in [0x14, 0x20, 0x24, 0x30] {
            assert_eq!(probe(&mut c, unused), 0);
        }
    }

    #[test]
    fn bar_address_sticks_above_the_size() {
        let mut c = PciConfigSpace::new();
        c.write(0x10, &0xFEBF_1234u32.to_le_bytes()).unwrap();
        assert_eq!(read32(&c, 0x10), 0xFEBF_1000);
    }

    #[test]
    fn out_of_range_is_refused() {
        let mut c = PciConfigSpace::new();
        assert!(c.read(254, &mut [0; 4]).is_none());
        assert!(c.write(u64::MAX, &[0]).is_none());
        assert!(c.read(252, &mut [0; 4]).is_some());
    }
}
