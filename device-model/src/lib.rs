//! crashmon's device model: the crash-monitor PCI card served to QEMU over vfio-user, and the
//! host-side capture that turns what the guest streams through it into a crash-dump file.
//!
//! * [`card`]: the card's behaviour (register file, session state machine);
//! * [`capture`]: dump files, reassembly and sidecars;
//! * [`data_window`]: BAR2's shared memory;
//! * [`dma`]: the guest memory QEMU maps for the card (DMA mode);
//! * [`events`]: JSON event lines and the operator's hooks;
//! * [`pci_config`] and [`vfio`]: bus plumbing;
//! * [`size`]: parsing sizes given on the command line;
//! * [`sandbox`]: what the process gives up once set up (user, Landlock, seccomp).

pub mod capture;
pub mod card;
pub mod data_window;
pub mod dma;
pub mod events;
pub mod pci_config;
pub mod sandbox;
pub mod size;
pub mod vfio;
