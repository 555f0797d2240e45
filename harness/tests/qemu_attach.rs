//! End to end with the real pieces: the `crashmon-device` process serves the card, a real QEMU
//! (provisioned if the machine has none with vfio-user-pci) attaches it, and QEMU's view of the
//! card over QMP must match the datasheet. When QEMU quits, the device model (run with `--once`)
//! must exit cleanly.

use anyhow::{ensure, Context, Result};
use crashmon_card_abi as abi;
use crashmon_harness::device::{self, DeviceConfig, DeviceProcess};
use crashmon_harness::pci;
use crashmon_harness::qemu::Qemu;
use crashmon_harness::qmp::{qmp, QmpClient};
use crashmon_harness::vm::{Vm, VmConfig};
use std::time::Duration;
use tempfile::TempDir;

/// A device model and a VM with its card, with a QMP session to the VM.
struct Rig {
    dir: TempDir,
    card: DeviceProcess,
    vm: Vm,
    qmp: QmpClient,
}

impl Rig {
    fn start(name: &str) -> Result<Rig> {
        // Provisioning takes a while the first time: let people see what is going on.
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .try_init();

        let qemu = Qemu::find_or_provision().context("no QEMU with vfio-user-pci")?;
        let dir = tempfile::tempdir()?;
        let card = DeviceProcess::spawn(
            &DeviceConfig {
                binary: device::locate_binary()?,
                socket: dir.path().join("card.sock"),
                output_dir: dir.path().join("dumps"),
                vm_name: name.into(),
                max_dump_size: None,
                once: true,
                log: dir.path().join("device.log"),
                user: None,
                extra_args: Vec::new(),
                env: Vec::new(),
            },
            Duration::from_secs(30),
        )?;
        let mut vm = Vm::launch(&qemu, &VmConfig::new(name, card.socket(), dir.path()))?;
        let qmp = vm.connect_qmp(Duration::from_secs(60))?;
        Ok(Rig { dir, card, vm, qmp })
    }

    fn logs(&self) -> String {
        format!("device model log:\n{}\nQEMU log:\n{}", self.card.log_tail(), self.vm.log_tail())
    }

    /// `quit`, then both processes must exit successfully.
    fn quit(mut self) -> Result<()> {
        self.qmp.quit()?;
        let qemu_exit = self.vm.wait_timeout(Duration::from_secs(30))?;
        ensure!(qemu_exit.success(), "QEMU exited with {qemu_exit}\n{}", self.logs());
        let device_exit =
            self.card.wait_timeout(Duration::from_secs(30)).with_context(|| self.logs())?;
        ensure!(
            device_exit.success(),
            "the device model exited with {device_exit}\n{}",
            self.logs()
        );
        Ok(())
    }
}

#[test]
fn qemu_sees_the_card_the_datasheet_describes() -> Result<()> {
    let mut rig = Rig::start("qemu-attach")?;
    let buses = rig.qmp.query_pci()?;
    let found = pci::find_card(&buses).with_context(|| {
        let devices: Vec<String> =
            pci::all_devices(&buses).into_iter().map(pci::describe).collect();
        format!(
            "no {:04x}:{:04x} device on the bus: {devices:#?}\n{}",
            abi::PCI_VENDOR_ID,
            abi::PCI_DEVICE_ID,
            rig.logs()
        )
    })?;
    eprintln!("found the card: {}", pci::describe(found));

    let class = (abi::PCI_CLASS_CODE as i64) << 8 | abi::PCI_SUBCLASS as i64;
    assert_eq!(class, 0x0880);
    assert_eq!(found.class_info.class, class, "class code");

    let bar0 = pci::bar(found, abi::BAR0_INDEX).context("the card has no BAR0")?;
    assert_eq!(bar0.type_, "memory", "BAR0 type");
    assert_eq!(bar0.size as u64, abi::BAR0_SIZE, "BAR0 size");
    assert_eq!(abi::BAR0_SIZE, 4 << 10);
    assert_eq!(bar0.mem_type_64, Some(false), "BAR0 is a 32-bit BAR");
    assert_eq!(bar0.prefetch, Some(false), "BAR0 is not prefetchable");

    let bar2 = pci::bar(found, abi::BAR2_INDEX).context("the card has no BAR2")?;
    assert_eq!(bar2.type_, "memory", "BAR2 type");
    assert_eq!(bar2.size as u64, abi::BAR2_SIZE, "BAR2 size");
    assert_eq!(abi::BAR2_SIZE, 4 << 20);
    assert_eq!(bar2.mem_type_64, Some(true), "BAR2 is a 64-bit BAR");
    assert_eq!(bar2.prefetch, Some(true), "BAR2 is prefetchable");
    assert!(pci::bar(found, 3).is_none(), "BAR3 is BAR2's upper half, not a BAR of its own");
    assert_eq!(pci::datasheet_mismatches(found), Vec::<String>::new());

    let status = rig.qmp.query_status()?;
    ensure!(status.running, "the VM is not running: {:?}\n{}", status.status, rig.logs());
    rig.quit()
}

/// The QMP commands the harness offers work against the real QEMU, and the card survives a
/// system reset.
#[test]
fn qmp_drives_a_vm_with_the_card() -> Result<()> {
    let mut rig = Rig::start("qmp-drive")?;

    let info_pci = rig.qmp.human_monitor_command("info pci")?;
    let id = format!("PCI device {:04x}:{:04x}", abi::PCI_VENDOR_ID, abi::PCI_DEVICE_ID);
    ensure!(info_pci.contains(&id), "HMP `info pci` lacks {id:?}:\n{info_pci}");

    // The top 64 KiB below 4 GiB: the end of the BIOS ROM, with the reset vector.
    let dump = rig.dir.path().join("bios.bin");
    rig.qmp.pmemsave(0xFFFF_0000, 0x1_0000, &dump)?;
    let saved =
        std::fs::read(&dump).with_context(|| format!("pmemsave wrote no {}", dump.display()))?;
    assert_eq!(saved.len(), 0x1_0000);
    assert!(saved.iter().any(|&b| b != 0), "the BIOS ROM reads as zeros");

    rig.qmp.inject_nmi()?;
    rig.qmp.system_reset()?;
    let reset = rig.qmp.wait_event("RESET", Duration::from_secs(30))?;
    assert!(matches!(reset.typed(), Some(qmp::Event::RESET { .. })), "{reset:?}");
    let buses = rig.qmp.query_pci()?;
    ensure!(pci::find_card(&buses).is_some(), "the card is gone after a reset\n{}", rig.logs());
    assert!(rig.qmp.query_status()?.running);

    let error = rig.qmp.human_monitor_command("no-such-command")?;
    assert!(error.contains("unknown command"), "{error}");
    rig.quit()
}
