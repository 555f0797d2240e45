//! `crashmon-harness`: provisions QEMU, runs the crash-monitor card in a VM, and prints the QEMU
//! options that attach the card to your own VMs.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use crashmon_harness::device::{self, DeviceConfig, DeviceProcess};
use crashmon_harness::qemu::{Qemu, QemuSource};
use crashmon_harness::vm::{self, Vm, VmConfig};
use crashmon_harness::{pci, workspace_root};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Find a QEMU with vfio-user-pci (CRASHMON_QEMU, then PATH), or provision one into the
    /// cache folder (needs root); print its path and version.
    ProvisionQemu,
    /// Start the device model and a VM with the card, show the card on the VM's PCI bus, print
    /// how to attach the card to your own VM, and shut everything down.
    Demo {
        /// Folder for dumps (in `dumps/`) and the run's logs (in `logs/`).
        #[arg(long, value_name = "DIR", default_value_os_t = workspace_root().join("crashmon-out"))]
        out: PathBuf,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory_mb: u32,
        /// Name of the demo VM, used in dump file names.
        #[arg(long, default_value = "crashmon-demo")]
        vm_name: String,
    },
    /// Print the QEMU options that attach the card served on SOCKET to a VM.
    QemuLine {
        /// The socket crashmon-device listens on (its --socket).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The VM's RAM in MiB (the options replace its -m).
        #[arg(long, default_value_t = 1024)]
        memory_mb: u32,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::ProvisionQemu => provision_qemu(),
        Cmd::Demo {
            out,
            memory_mb,
            vm_name,
        } => demo(out, memory_mb, &vm_name),
        Cmd::QemuLine { socket, memory_mb } => qemu_line(socket, memory_mb),
    };
    if let Err(e) = result {
        eprintln!("crashmon-harness: {e:#}");
        std::process::exit(1);
    }
}

fn provision_qemu() -> Result<()> {
    let qemu = Qemu::find_or_provision().context("no usable QEMU")?;
    let version = qemu.version()?;
    let origin = match qemu.source() {
        QemuSource::Env => "from CRASHMON_QEMU",
        QemuSource::System => "on PATH",
        QemuSource::Provisioned => "provisioned",
    };
    println!("{}", qemu.binary().display());
    println!("{version} ({origin}, has vfio-user-pci)");
    Ok(())
}

fn qemu_line(socket: PathBuf, memory_mb: u32) -> Result<()> {
    let socket = std::path::absolute(&socket)
        .with_context(|| format!("bad socket path {}", socket.display()))?;
    println!("{}", vm::shell_lines(&vm::card_args(&socket, memory_mb)?));
    Ok(())
}

fn demo(out: PathBuf, memory_mb: u32, vm_name: &str) -> Result<()> {
    let out = std::path::absolute(&out)
        .with_context(|| format!("bad output folder {}", out.display()))?;
    let (dumps, logs) = (out.join("dumps"), out.join("logs"));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    // Sockets live in a private temporary folder: short paths, nothing stale left behind.
    let runtime = tempfile::Builder::new()
        .prefix("crashmon-demo-")
        .tempdir()
        .context("cannot create a runtime folder")?;

    let qemu = Qemu::find_or_provision().context("no usable QEMU")?;
    println!("QEMU: {} ({})", qemu.version()?, qemu.binary().display());
    let device_config = DeviceConfig {
        binary: device::locate_binary()?,
        socket: runtime.path().join("card.sock"),
        output_dir: dumps.clone(),
        vm_name: vm_name.to_owned(),
        max_dump_size: None,
        once: true,
        log: logs.join("device.log"),
    };
    let mut card = DeviceProcess::spawn(&device_config, Duration::from_secs(30))?;
    println!(
        "device model: pid {}, serving the card on {}",
        card.pid(),
        card.socket().display()
    );

    let mut vm_config = VmConfig::new(vm_name, card.socket(), runtime.path());
    vm_config.memory_mb = memory_mb;
    let mut vm = Vm::launch(&qemu, &vm_config)?;
    let mut qmp = vm
        .connect_qmp(Duration::from_secs(60))
        .context("QEMU did not come up")?;
    let status = qmp.query_status()?;
    println!(
        "VM '{vm_name}': QEMU {} over QMP, status {:?}",
        qmp.qemu_version(),
        status.status
    );

    let buses = qmp.query_pci()?;
    let Some(found) = pci::find_card(&buses) else {
        bail!(
            "the card is not on the VM's PCI bus; device model log:\n{}\nQEMU log:\n{}",
            card.log_tail(),
            vm.log_tail()
        );
    };
    println!(
        "\nThe card on the VM's PCI bus (query-pci):\n{}",
        pci::describe(found)
    );
    match pci::datasheet_mismatches(found).as_slice() {
        [] => println!("It matches the datasheet (crashmon_card_abi)."),
        problems => bail!(
            "the card does not match the datasheet: {}",
            problems.join("; ")
        ),
    }

    println!(
        "\nDumps of crashes in this VM would go to {}",
        dumps.display()
    );
    println!("\nTo give your own VM the card, run the device model:");
    let example_socket = PathBuf::from("/run/crashmon/myvm.sock");
    println!(
        "  crashmon-device --socket {} --output-dir /var/lib/crashmon/dumps --vm-name myvm",
        example_socket.display()
    );
    println!("and add these options to its QEMU command line (QEMU 10.1+ with vfio-user-pci):");
    let line = vm::shell_lines(&vm::card_args(&example_socket, 4096)?);
    println!("  {}", line.replace('\n', "\n  "));
    println!("(qemu-config/ has the same as a libvirt snippet and a systemd unit.)");

    println!("\nShutting down: QMP quit");
    qmp.quit()?;
    let qemu_status = vm.wait_timeout(Duration::from_secs(30))?;
    let device_status = card.wait_timeout(Duration::from_secs(30))?;
    if !device_status.success() {
        bail!(
            "the device model exited with {device_status}; its log:\n{}",
            card.log_tail()
        );
    }
    println!(
        "QEMU exited ({qemu_status}); the device model exited cleanly after the VM disconnected."
    );
    println!("Logs: {}", logs.display());
    std::fs::copy(vm.serial_log(), logs.join("serial.log")).ok();
    std::fs::copy(vm.log_path(), logs.join("qemu.log")).ok();
    Ok(())
}
