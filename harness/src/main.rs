//! `crashmon-harness`: provisions QEMU, runs the crash-monitor card in a VM, and prints the QEMU
//! options that attach the card to your own VMs.

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use crashmon_harness::progress::DumpProgress;
use crashmon_harness::qemu::{Qemu, QemuSource};
use crashmon_harness::scenario::{self, Rig, Running, Scenario, Trigger};
use crashmon_harness::vm;
use crashmon_harness::{pci, workspace_root};
use std::path::PathBuf;

/// The most RAM `qemu-line` writes options for, in MiB (4 TiB).
const MAX_QEMU_LINE_MB: i64 = 4 << 20;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TriggerArg {
    /// KeBugCheckEx(0xDEAD0001, ...).
    Bugcheck,
    /// QMP inject-nmi from the host: bug check 0x80.
    Nmi,
    /// A read of an unmapped address: bug check 0x50.
    Pagefault,
    /// A divide by zero: bug check 0x8E.
    Divide,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Find a QEMU with vfio-user-pci (CRASHMON_QEMU, then PATH), or provision one into the
    /// cache folder (needs root); print its path and version.
    ProvisionQemu,
    /// The demo: a guest bug checks inside QEMU, its dump streams through the card to the
    /// host, and the dump is verified (kdmp-parser, and every page against QEMU's own memory).
    Demo {
        /// Folder for dumps (in `dumps/`) and the run's logs (in `logs/`).
        #[arg(long, value_name = "DIR", default_value_os_t = workspace_root().join("crashmon-out"))]
        out: PathBuf,
        /// Guest RAM in MiB (16 to 2048).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..=2048))]
        memory_mb: u32,
        /// Name of the demo VM, used in dump file names.
        #[arg(long, default_value = "crashmon-demo")]
        vm_name: String,
        /// What crashes the guest.
        #[arg(long, value_enum, default_value_t = TriggerArg::Bugcheck)]
        trigger: TriggerArg,
        /// Write a bitmap dump (type 5, pages in use) instead of a full dump (type 1).
        #[arg(long)]
        bitmap: bool,
        /// Write with explicit offsets, back to front, instead of Offset -1 in file order.
        #[arg(long)]
        out_of_order: bool,
        /// The guest's driver does not use DMA mode (guest option `dma=off`): the dump goes
        /// through the card's data window (copy mode).
        #[arg(long)]
        copy_mode: bool,
    },
    /// Benchmark crashmon against QEMU's dump-guest-memory (the anchor) in the same run, and
    /// write the table to a file.
    Bench {
        /// Guest RAM sizes in MiB, comma separated (16 to 2048 each).
        #[arg(long, value_delimiter = ',', default_values_t = [512u32, 2048],
              value_parser = clap::value_parser!(u32).range(16..=2048))]
        memory_mb: Vec<u32>,
        /// Runs per size (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
        repeat: u64,
        /// Where the Markdown table goes.
        #[arg(long, value_name = "FILE", default_value_os_t = workspace_root().join("bench/results.md"))]
        table: PathBuf,
    },
    /// Print the QEMU options that attach the card served on SOCKET to a VM.
    QemuLine {
        /// The socket crashmon-device listens on (its --socket).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The VM's RAM in MiB (the options replace its -m): 16 to 4194304 (4 TiB).
        #[arg(long, default_value_t = 1024,
              value_parser = clap::value_parser!(u32).range(16..=MAX_QEMU_LINE_MB))]
        memory_mb: u32,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli: Cli = crashmon_cli::parse("crashmon-harness");
    let result = match cli.command {
        Cmd::ProvisionQemu => provision_qemu(),
        Cmd::Demo { out, memory_mb, vm_name, trigger, bitmap, out_of_order, copy_mode } => {
            let mut scenario = Scenario::new(&vm_name);
            scenario.memory_mb = memory_mb;
            scenario.bitmap = bitmap;
            scenario.guest_dma = !copy_mode;
            scenario.out_of_order = out_of_order;
            match trigger {
                TriggerArg::Bugcheck => {}
                TriggerArg::Nmi => scenario.trigger = Trigger::Nmi,
                TriggerArg::Pagefault => scenario.trigger = Trigger::PageFault,
                TriggerArg::Divide => scenario.trigger = Trigger::Divide,
            }
            demo(out, &scenario)
        }
        Cmd::QemuLine { socket, memory_mb } => qemu_line(socket, memory_mb),
        Cmd::Bench { memory_mb, repeat, table } => bench(&memory_mb, repeat as usize, &table),
    };
    if let Err(e) = result {
        crashmon_cli::fail("crashmon-harness", e, 1);
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

fn bench(sizes: &[u32], repeat: usize, table: &std::path::Path) -> Result<()> {
    let rig = Rig::prepare()?;
    let work = tempfile::Builder::new().prefix("crashmon-bench-").tempdir()?;
    let rows = crashmon_harness::bench::run(&rig, sizes, repeat, work.path())?;
    let text = crashmon_harness::bench::table(&rows, repeat, &rig.qemu.version()?);
    if let Some(dir) = table.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(table, &text).with_context(|| format!("cannot write {}", table.display()))?;
    println!("{text}\nwritten to {}", table.display());
    Ok(())
}

fn qemu_line(socket: PathBuf, memory_mb: u32) -> Result<()> {
    let socket = std::path::absolute(&socket)
        .with_context(|| format!("bad socket path {}", socket.display()))?;
    let no_migration = std::path::Path::new(vm::DEFAULT_NO_MIGRATION_DIR);
    println!("{}", vm::shell_lines(&vm::card_args(&socket, memory_mb, Some(no_migration))?));
    Ok(())
}

fn demo(out: PathBuf, scenario: &Scenario) -> Result<()> {
    if !crashmon_device_model::capture::valid_vm_name(&scenario.name) {
        bail!("--vm-name '{}' must be 1-64 of [A-Za-z0-9._-]", scenario.name);
    }
    let out = std::path::absolute(&out)
        .with_context(|| format!("bad output folder {}", out.display()))?;
    let (dumps, logs) = (out.join("dumps"), out.join("logs"));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    // Sockets and QEMU's RAM image live in a private temporary folder.
    let runtime = tempfile::Builder::new()
        .prefix("crashmon-demo-")
        .tempdir()
        .context("cannot create a runtime folder")?;

    let rig = Rig::prepare()?;
    println!("QEMU:         {} ({})", rig.qemu.version()?, rig.qemu.binary().display());
    println!("guest kernel: {}", rig.kernel.display());
    // Watching from before the device model starts: the guest may crash as soon as it is up.
    // A full dump holds all of guest RAM (plus a header); a bitmap dump's size is not known.
    let expected = (!scenario.bitmap).then_some(u64::from(scenario.memory_mb) << 20);
    let progress = DumpProgress::watch(&dumps, &scenario.name, expected);
    let mut r = Running::start_with_dumps_in(&rig, scenario, runtime.path(), &dumps)?;
    println!("device model: pid {}, card on {}", r.card.pid(), r.card.socket().display());
    println!("guest:        -m {} -append '{}'", scenario.memory_mb, scenario.append());

    // Once the guest is up, its firmware has placed the card's BARs: show what QEMU sees.
    r.wait_serial("READY", 1, scenario::CRASH_TIMEOUT)?;
    let buses = r.qmp.query_pci()?;
    let Some(found) = pci::find_card(&buses) else {
        bail!("the card is not on the VM's PCI bus\n{}", r.logs());
    };
    println!("\nThe card on the VM's PCI bus (QMP query-pci):\n{}", pci::describe(found));
    if let [first, ..] = pci::datasheet_mismatches(found).as_slice() {
        bail!("the card does not match the datasheet: {first}");
    }
    println!("\nCrashing the guest with {} ...", scenario.describe_trigger());
    let serial = r.vm.serial_log().to_owned();
    let outcome = scenario::complete(r, scenario);
    progress.finish();
    std::fs::copy(&serial, logs.join("serial.log")).ok();
    std::fs::copy(runtime.path().join("device.log"), logs.join("device.log")).ok();
    std::fs::copy(runtime.path().join("qemu.log"), logs.join("qemu.log")).ok();
    let outcome = outcome?;
    for d in &outcome.dumps {
        println!("\nThe dump is on the host and verified:\n{}", d.report());
    }
    println!("Whole run: {:.1} s. Logs: {}", outcome.elapsed.as_secs_f64(), logs.display());
    // What an operator's own tool says of it: `crashmon-dump inspect`, built beside this binary.
    for d in &outcome.dumps {
        let tool = std::env::current_exe()?.with_file_name("crashmon-dump");
        let shown = std::process::Command::new(&tool)
            .arg("inspect")
            .arg(&d.path)
            .output()
            .with_context(|| format!("cannot run {}", tool.display()))?;
        ensure!(
            shown.status.success(),
            "crashmon-dump inspect failed: {}",
            String::from_utf8_lossy(&shown.stderr).trim()
        );
        println!(
            "\n$ crashmon-dump inspect {}\n{}",
            d.path.display(),
            String::from_utf8_lossy(&shown.stdout).trim_end()
        );
    }

    println!("\nTo give your own VM the card, run the device model:");
    let example_socket = PathBuf::from("/run/crashmon/myvm.sock");
    println!(
        "  crashmon-device --socket {} --output-dir /var/lib/crashmon/dumps --vm-name myvm",
        example_socket.display()
    );
    println!("and add these options to its QEMU command line (QEMU 10.1+ with vfio-user-pci):");
    let no_migration = std::path::Path::new(vm::DEFAULT_NO_MIGRATION_DIR);
    let line = vm::shell_lines(&vm::card_args(&example_socket, 4096, Some(no_migration))?);
    println!("  {}", line.replace('\n', "\n  "));
    println!("(qemu-config/ has the same as a libvirt snippet and a systemd unit.)");
    Ok(())
}
