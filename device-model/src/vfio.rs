//! Bus plumbing: the card as a vfio-user PCI device.
//!
//! Regions follow the vfio PCI layout (BAR0..BAR5, ROM, config, VGA). BAR0 traps every access to
//! [`CrashMonitorCard`]; BAR2 is offered as one sparse-mmap area backed by the data window's
//! memfd, so QEMU maps it into the guest and only falls back to region reads and writes if it
//! cannot. The card has no interrupts. DMA maps go to the card's [`crate::dma::GuestMemory`],
//! which checks them; a refused one is an error reply, never a panic.

use crate::card::CrashMonitorCard;
use crate::pci_config::{PciConfigSpace, CONFIG_SPACE_SIZE};
use crashmon_card_abi as abi;
use log::{debug, info};
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion, SparseArea};

/// The card shared between the vfio-user server thread and the signal handler.
pub type SharedCard = Arc<Mutex<CrashMonitorCard>>;

/// Locks the card even if a previous holder panicked: the card's state stays consistent
/// between register accesses, and losing the capture would be worse.
pub fn lock(card: &SharedCard) -> MutexGuard<'_, CrashMonitorCard> {
    card.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The vfio-user region table.
pub fn regions(card: &SharedCard) -> Vec<ServerRegion> {
    let window_fd = lock(card).window().fd();
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            let mut region_info = vfio_region_info {
                argsz: size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            let mut sparse_areas = Vec::new();
            let mut mmap_fd = None;
            match index {
                VFIO_PCI_BAR0_REGION_INDEX => {
                    region_info.size = abi::BAR0_SIZE;
                    region_info.flags = rw;
                }
                VFIO_PCI_BAR2_REGION_INDEX => {
                    region_info.size = abi::BAR2_SIZE;
                    region_info.flags = rw | VFIO_REGION_INFO_FLAG_MMAP;
                    region_info.offset = 0; // offset of the region in `mmap_fd`
                    sparse_areas.push(SparseArea {
                        area: vfio_region_sparse_mmap_area { offset: 0, size: abi::BAR2_SIZE },
                    });
                    mmap_fd = Some(window_fd);
                }
                VFIO_PCI_CONFIG_REGION_INDEX => {
                    region_info.size = CONFIG_SPACE_SIZE as u64;
                    region_info.flags = rw;
                }
                _ => {}
            }
            ServerRegion { region_info, sparse_areas, mmap_fd }
        })
        .collect()
}

/// The interrupt table. The card raises no interrupts (it is driven with interrupts off), so
/// INTx, MSI and MSI-X have no vectors. The error and request indexes accept an eventfd that is
/// never signalled, only so that QEMU does not warn that it cannot enable error recovery.
pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| match index {
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => {
                IrqInfo { index, flags: VFIO_IRQ_INFO_EVENTFD, count: 1 }
            }
            _ => IrqInfo { index, flags: 0, count: 0 },
        })
        .collect()
}

/// The vfio-user backend of one card.
pub struct CardBackend {
    card: SharedCard,
    config: PciConfigSpace,
}

impl CardBackend {
    /// A backend for `card` with a power-on configuration space.
    pub fn new(card: SharedCard) -> Self {
        Self { card, config: PciConfigSpace::new() }
    }

    /// The client went away: close any open session as incomplete and start afresh for the
    /// next client.
    pub fn disconnected(&mut self) {
        lock(&self.card).disconnect();
        self.config = PciConfigSpace::new();
    }
}

fn out_of_range(region: u32, offset: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("access outside region {region}: offset {offset:#x}, {len} bytes"),
    )
}

impl ServerBackend for CardBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let ok = match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.read(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX => {
                let started = Instant::now();
                let mut card = lock(&self.card);
                card.read(offset, data);
                card.note_answer_time(started.elapsed());
                Some(())
            }
            VFIO_PCI_BAR2_REGION_INDEX => lock(&self.card).window().read(offset, data),
            _ => None,
        };
        ok.ok_or_else(|| out_of_range(region, offset, data.len()))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let ok = match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.write(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX => {
                let started = Instant::now();
                let mut card = lock(&self.card);
                card.write(offset, data);
                card.note_answer_time(started.elapsed());
                Some(())
            }
            VFIO_PCI_BAR2_REGION_INDEX => lock(&self.card).window().write(offset, data),
            _ => None,
        };
        ok.ok_or_else(|| out_of_range(region, offset, data.len()))
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        debug!("dma map: {flags:?} iova {address:#x} size {size:#x} offset {offset:#x}");
        let readable = flags.contains(DmaMapFlags::READ);
        lock(&self.card)
            .dma_map(address, size, offset, fd, readable)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        debug!("dma unmap: {flags:?} iova {address:#x} size {size:#x}");
        let all = flags.contains(DmaUnmapFlags::UNMAP_ALL);
        lock(&self.card)
            .dma_unmap(address, size, all)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn reset(&mut self) -> io::Result<()> {
        info!("device reset from the VM");
        lock(&self.card).bus_reset();
        self.config = PciConfigSpace::new();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        _fds: Vec<File>,
    ) -> io::Result<()> {
        debug!("set_irqs ignored (the card has no interrupts): index {index} flags {flags:#x} start {start} count {count}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CaptureConfig;
    use crate::data_window::DataWindow;

    fn backend() -> (CardBackend, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig::new(dir.path().to_owned(), "t", 1 << 20);
        let card = Arc::new(Mutex::new(CrashMonitorCard::new(config, DataWindow::new().unwrap())));
        (CardBackend::new(card), dir)
    }

    #[test]
    fn out_of_range_region_accesses_are_errors_not_panics() {
        let (mut b, _dir) = backend();
        let cfg = VFIO_PCI_CONFIG_REGION_INDEX;
        assert!(b.region_read(cfg, 252, &mut [0; 8]).is_err());
        assert!(b.region_write(cfg, u64::MAX, &[0; 4]).is_err());
        assert!(b
            .region_read(VFIO_PCI_BAR2_REGION_INDEX, abi::BAR2_SIZE - 2, &mut [0; 4])
            .is_err());
        assert!(b.region_write(VFIO_PCI_BAR2_REGION_INDEX, u64::MAX - 1, &[0; 4]).is_err());
        assert!(b.region_read(1, 0, &mut [0; 4]).is_err());
        assert!(b.region_write(9, 0, &[0; 4]).is_err());
        // BAR0 refuses inside the register file (an ERROR code), not on the bus.
        assert!(b.region_write(VFIO_PCI_BAR0_REGION_INDEX, 1 << 40, &[0; 4]).is_ok());
        let mut status = [0u8; 4];
        b.region_read(VFIO_PCI_BAR0_REGION_INDEX, abi::regs::ERROR as u64, &mut status).unwrap();
        assert_eq!(u32::from_le_bytes(status), abi::ErrorCode::BadAccess as u32);
    }

    #[test]
    fn region_table_offers_bar2_as_one_mmap_area() {
        let (b, _dir) = backend();
        let regions = regions(&b.card);
        assert_eq!(regions.len(), VFIO_PCI_NUM_REGIONS as usize);
        let bar2 = &regions[VFIO_PCI_BAR2_REGION_INDEX as usize];
        assert_ne!(bar2.region_info.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
        assert_eq!(bar2.sparse_areas.len(), 1);
        assert!(bar2.mmap_fd.is_some());
        assert_eq!(regions[VFIO_PCI_BAR0_REGION_INDEX as usize].region_info.size, abi::BAR0_SIZE);
        assert_eq!(regions[1].region_info.size, 0);
    }
}
