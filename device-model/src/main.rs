//! `crashmon-device`: serves one crash-monitor card to QEMU over vfio-user and writes every
//! crash the guest streams through it to `--output-dir`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use crashmon_device_model::capture::{self, CaptureConfig};
use crashmon_device_model::card::CrashMonitorCard;
use crashmon_device_model::data_window::DataWindow;
use crashmon_device_model::sandbox::{self, Violation};
use crashmon_device_model::size::parse_size;
use crashmon_device_model::vfio::{self, CardBackend, SharedCard};
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vfio_user::Server;

/// The crashmon crash-monitor card, served to QEMU over vfio-user.
///
/// Attach it with: -device '{"driver":"vfio-user-pci","socket":{"path":"SOCKET","type":"unix"}}'
/// (guest RAM must be a shared memory backend, e.g. memory-backend-memfd with share=on).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Unix socket to listen on; must not exist yet.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Folder for dumps and their JSON sidecars; created if missing, must be writable.
    #[arg(long, value_name = "DIR")]
    output_dir: PathBuf,
    /// Name of the VM, used in every file name: 1-64 of [A-Za-z0-9._-].
    #[arg(long, default_value = "vm")]
    vm_name: String,
    /// Largest dump accepted (e.g. 64GiB, 512M); chunks past it are refused.
    #[arg(long, default_value = "1TiB", value_parser = parse_max_size)]
    max_dump_size: u64,
    /// Exit after the first VM disconnects instead of waiting for the next one.
    #[arg(long)]
    once: bool,
    /// Started as root: once set up, drop to this user (the socket, and the output dir if
    /// created here, are handed to it; an existing output dir must be writable by it).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// What a syscall outside the seccomp allow-list gets: `errno` (EPERM) or `kill`.
    #[arg(long, value_name = "ACTION", default_value = "errno")]
    seccomp_violation: Violation,
    /// Serve without the sandbox (no user drop, Landlock, seccomp): for debugging only.
    #[arg(long, conflicts_with = "user")]
    no_sandbox: bool,
}

fn parse_max_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size < 4096 {
        return Err(format!("'{text}' is below the 4096-byte minimum"));
    }
    Ok(size)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("crashmon-device: {} (see --help)", one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("crashmon-device: {e:#}");
        std::process::exit(1);
    }
}

/// Folds clap's multi-line message into one line, dropping its usage block.
fn one_line(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes the output folder if missing; says whether it did.
fn make_output_dir(dir: &Path) -> Result<bool> {
    let existed = dir.is_dir();
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output dir {}", dir.display()))?;
    Ok(!existed)
}

/// Checks that the output folder is writable, as the process will write it: after the sandbox.
fn check_output_dir(dir: &Path) -> Result<()> {
    let probe = tempfile_in(dir)
        .with_context(|| format!("output dir {} is not writable", dir.display()))?;
    fs::remove_file(probe)?;
    Ok(())
}

fn tempfile_in(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!(".crashmon-write-probe-{}", std::process::id()));
    fs::write(&path, b"")?;
    Ok(path)
}

fn run(cli: Cli) -> Result<()> {
    if !capture::valid_vm_name(&cli.vm_name) {
        bail!(
            "--vm-name '{}' must be 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'",
            cli.vm_name
        );
    }
    if cli.socket.symlink_metadata().is_ok() {
        bail!(
            "socket path {} already exists (another crashmon-device? remove it if it is stale)",
            cli.socket.display()
        );
    }
    let created_output_dir = make_output_dir(&cli.output_dir)?;

    let config = CaptureConfig {
        output_dir: cli.output_dir.clone(),
        vm_name: cli.vm_name.clone(),
        max_dump_size: cli.max_dump_size,
    };
    let window = DataWindow::new().context("cannot create the data window (memfd)")?;
    let card: SharedCard = Arc::new(Mutex::new(CrashMonitorCard::new(config, window)));
    let server = Server::new(&cli.socket, true, vfio::irqs(), vfio::regions(&card))
        .with_context(|| format!("cannot listen on {}", cli.socket.display()))?;
    let signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;

    // Set up: from here on the process only serves. No thread runs yet, so every thread it
    // starts (signals, recovery, one writer per session) inherits the sandbox.
    if cli.no_sandbox {
        warn!("--no-sandbox: serving without user drop, Landlock or seccomp");
    } else {
        let report = sandbox::apply(&sandbox::Options {
            output_dir: cli.output_dir.clone(),
            socket: cli.socket.clone(),
            user: cli.user.clone(),
            created_output_dir,
            violation: cli.seccomp_violation,
        })
        .context("cannot sandbox the device model (--no-sandbox to debug without it)")?;
        info!("sandboxed: {report}");
        // TEST HOOK, for the end-to-end sandbox test only: see `sandbox::self_test`.
        if let Some(path) = std::env::var_os("CRASHMON_SANDBOX_SELF_TEST") {
            sandbox::self_test(Path::new(&path));
        }
    }
    check_output_dir(&cli.output_dir)?;
    // Partial dumps left by a device model that was killed are closed in the background: hashing
    // them reads whole files, and the socket must be there for QEMU at once. The process waits
    // for it before exiting: it renames a dump before rewriting its sidecar, and a later run
    // would not redo the sidecar of a dump that is no longer partial.
    let dir = cli.output_dir.clone();
    let recovery: Recovery = Arc::new(Mutex::new(Some(
        std::thread::Builder::new()
            .name("recover".into())
            .spawn(move || {
                capture::recover_stale(&dir);
            })
            .context("cannot start the recovery thread")?,
    )));
    spawn_signal_handler(signals, card.clone(), cli.socket.clone(), recovery.clone())?;
    info!(
        "crash-monitor card for VM '{}' listening on {}; dumps go to {}",
        cli.vm_name,
        cli.socket.display(),
        cli.output_dir.display()
    );

    let mut backend = CardBackend::new(card.clone());
    loop {
        match server.run(&mut backend) {
            Ok(()) => info!("VM disconnected"),
            Err(e) => error!("VM connection ended with an error: {e}"),
        }
        backend.disconnected();
        if cli.once {
            // Every byte received is written and made durable before the process exits.
            let writers = vfio::lock(&card).take_writers();
            for writer in writers {
                writer.join();
            }
            wait_for_recovery(&recovery);
            return Ok(());
        }
        info!("waiting for the next VM on {}", cli.socket.display());
    }
}

/// On SIGINT or SIGTERM: keep the open dump (as incomplete), remove the socket, exit 0.
/// The recovery thread, joined by whichever exit path comes first.
type Recovery = Arc<Mutex<Option<std::thread::JoinHandle<()>>>>;

fn wait_for_recovery(recovery: &Recovery) {
    let handle = recovery.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(handle) = handle {
        if !handle.is_finished() {
            info!("waiting for the partial dumps of an earlier run to be closed");
        }
        let _ = handle.join();
    }
}

fn spawn_signal_handler(
    mut signals: Signals,
    card: SharedCard,
    socket: PathBuf,
    recovery: Recovery,
) -> Result<()> {
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!("signal {signal}: stopping");
            let writers = {
                let mut card = vfio::lock(&card);
                card.shutdown("device model stopped while the dump was streaming");
                card.take_writers()
            };
            let _ = fs::remove_file(&socket);
            // Every byte received is written and made durable before the process exits; the
            // card is not held meanwhile, so the message loop still answers QEMU.
            if !writers.is_empty() {
                info!("making {} dump(s) durable before exiting", writers.len());
            }
            for writer in writers {
                writer.join();
            }
            wait_for_recovery(&recovery);
            std::process::exit(0);
        }
    })?;
    Ok(())
}
