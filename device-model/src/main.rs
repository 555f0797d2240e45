//! `crashmon-device`: serves one crash-monitor card to QEMU over vfio-user and writes every
//! crash the guest streams through it to `--output-dir`.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use crashmon_device_model::capture::{self, quota, CaptureConfig};
use crashmon_device_model::card::CrashMonitorCard;
use crashmon_device_model::data_window::DataWindow;
use crashmon_device_model::events::{self, Events, EventsConfig};
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
#[command(name = "crashmon-device", version, about)]
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
    /// Write every byte, zero pages too. By default a whole page of zeros that no earlier chunk
    /// wrote is left as a hole: the file reads the same and takes less disk (Windows keeps free
    /// memory zeroed).
    #[arg(long)]
    no_sparse: bool,
    /// Permission bits of dumps and sidecars, in octal: 0600 (the default: a dump holds the
    /// guest's RAM, keys and passwords) or up to 0660 to let a group of operators read them.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_file_mode)]
    file_mode: u32,
    /// Group of dumps and sidecars (a name or a number), e.g. the operators' group.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    file_group: Option<u32>,
    /// Write one JSON object per line for each event (driver armed, bug check, progress,
    /// complete, incomplete, refusals, quotas) to this file (appended, 0600), or `-` for stdout.
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// Run this shell command when a guest bug checks; CRASHMON_* variables describe the crash.
    #[arg(long, value_name = "CMD")]
    on_crash: Option<String>,
    /// Run this shell command when a dump is durable (complete or incomplete); CRASHMON_*
    /// variables give its path, state, sizes and bug check.
    #[arg(long, value_name = "CMD")]
    on_dump: Option<String>,
    /// Dumps kept per VM, the new one included: to make room, the oldest complete dumps are
    /// removed first, then incomplete ones (0: keep all).
    #[arg(long, value_name = "N", default_value_t = quota::DEFAULT_KEEP)]
    keep: usize,
    /// Total size of a VM's dumps: old dumps make room as with --keep, and a dump that would
    /// still pass it stops there, kept as incomplete (e.g. 200GiB; default: no limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_total_size: Option<u64>,
    /// Free space to leave on the output filesystem: a session is refused, or a dump stops
    /// (kept as incomplete), rather than go below it (0: no limit).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    min_free: u64,
    /// Sessions a VM may open per rolling hour; more are refused (a guest faking crashes).
    #[arg(long, value_name = "N", default_value_t = quota::DEFAULT_SESSIONS_PER_HOUR,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions_per_hour: u32,
    /// Seconds a hook may run before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    hook_timeout: u64,
    /// Permission bits of the socket, in octal, set once it is bound: e.g. 0660 to let
    /// --socket-group connect. Without it the process umask decides.
    #[arg(long, value_name = "MODE", value_parser = parse_socket_mode)]
    socket_mode: Option<u32>,
    /// Group of the socket (a name or a number), e.g. kvm for QEMU under libvirt; the device
    /// model must be a member of it.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    socket_group: Option<u32>,
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

fn parse_file_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{text}' is not an octal mode such as 0600"))?;
    if mode & !0o660 != 0 || mode & 0o600 != 0o600 {
        return Err(format!(
            "'{text}' must give the owner read and write, and nothing beyond 0660 \
             (dumps are never executable or world-readable)"
        ));
    }
    Ok(mode)
}

fn parse_socket_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("'{text}' is not an octal mode such as 0660"))?;
    if mode & !0o660 != 0 || mode & 0o600 != 0o600 {
        return Err(format!(
            "'{text}' must give the owner read and write, and nothing beyond 0660 \
             (the socket is never world-connectable)"
        ));
    }
    Ok(mode)
}

fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named '{text}'")),
        Err(e) => Err(format!("cannot look up group '{text}': {}", e.desc())),
    }
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
    // The hook runner: this executable again, started before the device model sandboxes
    // itself, reading hook requests on stdin (see crashmon_device_model::events).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hook-runner") {
        let timeout = args
            .get(2)
            .and_then(|a| a.strip_prefix("--hook-timeout="))
            .and_then(|t| t.parse().ok())
            .unwrap_or(60);
        let stdin = std::io::BufReader::new(std::io::stdin());
        events::run_hook_runner(stdin, std::time::Duration::from_secs(timeout));
        return;
    }
    let cli: Cli = crashmon_cli::parse("crashmon-device");
    if let Err(e) = run(cli) {
        crashmon_cli::fail("crashmon-device", e, 1);
    }
}

/// Creates the output folder if it is missing (0700, or 0750 when a group may read the dumps)
/// and checks that it is a writable folder.
fn check_output_dir(dir: &Path, group_readable: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!("output dir {} is not a folder", dir.display()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mode = if group_readable { 0o750 } else { 0o700 };
            fs::DirBuilder::new().recursive(true).mode(mode).create(dir).map_err(|e| {
                anyhow!("cannot create output dir {}: {}", dir.display(), io_cause(&e))
            })?;
            // The umask may have taken bits away from the mode asked for.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
        }
        Err(e) => bail!("cannot use output dir {}: {}", dir.display(), io_cause(&e)),
    }
    let probe = dir.join(format!(".crashmon-write-probe-{}", std::process::id()));
    fs::write(&probe, b"")
        .map_err(|e| anyhow!("output dir {} is not writable: {}", dir.display(), io_cause(&e)))?;
    fs::remove_file(probe)?;
    Ok(())
}

/// An I/O error's description without Rust's "(os error N)" suffix.
fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Checks what can be checked about the socket path before anything is created.
fn check_socket_path(socket: &Path) -> Result<()> {
    if socket.symlink_metadata().is_ok() {
        bail!(
            "socket path {} already exists (another crashmon-device? remove it if it is stale)",
            socket.display()
        );
    }
    let parent = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("cannot listen on {}: folder {} does not exist", socket.display(), parent.display());
    }
    Ok(())
}

/// Listens on `socket`, which appears only once it accepts connections and has its mode and
/// group: the listener is bound under a temporary name in the same folder, given
/// `--socket-mode`/`--socket-group`, and renamed into place, so QEMU (or anything waiting for
/// the path to exist) never finds a socket that refuses it.
fn listen(
    socket: &Path,
    mode: Option<u32>,
    group: Option<u32>,
) -> Result<std::os::unix::net::UnixListener> {
    let name = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = socket.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| anyhow!("cannot listen on {}: {}", socket.display(), io_cause(&e)))?;
    let placed = set_socket_access(&tmp, mode, group).and_then(|()| {
        fs::rename(&tmp, socket)
            .map_err(|e| anyhow!("cannot listen on {}: {}", socket.display(), io_cause(&e)))
    });
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("socket {}", socket.display())));
    }
    Ok(listener)
}

/// Whether a connection's error is only its peer going away (reset, closed mid-message).
fn vm_went_away(e: &vfio_user::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            );
        }
        // Messages that carry fds fail with vmm-sys-util's errno type instead.
        if let Some(errno) = s.downcast_ref::<vmm_sys_util::errno::Error>() {
            let kind = std::io::Error::from_raw_os_error(errno.errno()).kind();
            return matches!(kind, ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = s.source();
    }
    false
}

/// How long the exit path waits for the last events to be written.
const EVENTS_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn run(cli: Cli) -> Result<()> {
    if !capture::valid_vm_name(&cli.vm_name) {
        bail!(
            "--vm-name '{}' must be 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'",
            cli.vm_name
        );
    }
    check_socket_path(&cli.socket)?;
    let created_output_dir = !cli.output_dir.exists();
    check_output_dir(&cli.output_dir, cli.file_mode & 0o040 != 0)?;

    // Everything that opens a file outside the output folder, or forks, happens before the
    // sandbox: the events file, and the hook runner (hooks never run in the sandboxed process).
    let events_config = EventsConfig {
        path: cli.events.clone(),
        on_crash: cli.on_crash.clone(),
        on_dump: cli.on_dump.clone(),
        hook_timeout: std::time::Duration::from_secs(cli.hook_timeout),
        journal: events::journal_socket(),
    };
    let hooks = if cli.on_crash.is_some() || cli.on_dump.is_some() {
        let (runner, stdin) = events::spawn_hook_runner(events_config.hook_timeout)
            .context("cannot start the hook runner")?;
        info!("hooks run in process {}", runner.id());
        Some(stdin)
    } else {
        None
    };
    let (events, events_writer) = Events::prepare(&cli.vm_name, &events_config, hooks)
        .with_context(|| {
            let path = cli.events.as_deref().unwrap_or(Path::new(""));
            format!("cannot open the events file {}", path.display())
        })?;
    let config = CaptureConfig {
        file_mode: cli.file_mode,
        file_group: cli.file_group,
        events,
        sparse: !cli.no_sparse,
        limits: quota::Limits {
            keep: (cli.keep > 0).then_some(cli.keep),
            max_total_size: cli.max_total_size,
            min_free: cli.min_free,
            max_sessions_per_hour: cli.max_sessions_per_hour,
        },
        ..CaptureConfig::new(&cli.output_dir, &cli.vm_name, cli.max_dump_size)
    };
    let window = DataWindow::new().context("cannot create the data window (memfd)")?;
    let card: SharedCard = Arc::new(Mutex::new(CrashMonitorCard::new(config, window)));
    let listener = listen(&cli.socket, cli.socket_mode, cli.socket_group)?;
    let server = Server::from_owned_fd(listener.into(), true, vfio::irqs(), vfio::regions(&card));
    let signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    info!(
        "crash-monitor card for VM '{}' listening on {}; dumps go to {}",
        cli.vm_name,
        cli.socket.display(),
        cli.output_dir.display()
    );
    // Ready for QEMU once the socket listens (connections wait in its backlog until the loop
    // below accepts them); a no-op outside systemd.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("cannot tell systemd the card is ready: {e}");
    }

    // Set up: from here on the process only serves. No thread runs yet, so every thread it
    // starts (events, signals, recovery, one writer per session) inherits the sandbox.
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
        // Writable as the process will write it: after the user drop and Landlock.
        check_writable(&cli.output_dir)?;
    }
    if let Some(writer) = events_writer {
        writer.spawn().context("cannot start the events thread")?;
    }
    // Partial dumps left by a device model that was killed are closed in the background: hashing
    // them reads whole files, and QEMU must be answered at once. The process waits for it before
    // exiting.
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

    let mut backend = CardBackend::new(card.clone());
    loop {
        // QEMU killed or gone mid-message is the VM going away, as a clean close is; anything
        // else the client did wrong is an error (logged, and --once's exit status).
        let result =
            server.run(&mut backend).or_else(|e| if vm_went_away(&e) { Ok(()) } else { Err(e) });
        match &result {
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
            vfio::lock(&card).events().flush(EVENTS_FLUSH_TIMEOUT);
            let _ = fs::remove_file(&cli.socket);
            return result.map_err(|e| anyhow!("the VM's connection ended with an error: {e}"));
        }
        info!("waiting for the next VM on {}", cli.socket.display());
    }
}

/// Checks that the output folder is writable by this process as it now is.
fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".crashmon-write-probe-{}", std::process::id()));
    fs::write(&probe, b"")
        .map_err(|e| anyhow!("output dir {} is not writable: {}", dir.display(), io_cause(&e)))?;
    fs::remove_file(probe)?;
    Ok(())
}

/// Gives the bound socket its --socket-group, then its --socket-mode (in that order: a change of
/// owner may clear mode bits). Until then it has the umask's mode, the stricter one in a unit.
fn set_socket_access(socket: &Path, mode: Option<u32>, group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| {
            anyhow!("cannot give socket {} group {gid}: {}", socket.display(), io_cause(&e))
        })?;
    }
    if let Some(mode) = mode {
        fs::set_permissions(socket, fs::Permissions::from_mode(mode)).map_err(|e| {
            anyhow!("cannot set the mode of socket {}: {}", socket.display(), io_cause(&e))
        })?;
    }
    Ok(())
}

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

/// On SIGINT or SIGTERM: keep the open dump (as incomplete), remove the socket, exit 0 once every
/// byte received is durable.
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
            vfio::lock(&card).events().flush(EVENTS_FLUSH_TIMEOUT);
            std::process::exit(0);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_went_away_is_a_disconnect_and_bad_input_is_an_error() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(vm_went_away(&vfio_user::Error::StreamRead(reset)));
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(vm_went_away(&vfio_user::Error::StreamRead(eof)));
        // QEMU killed while a message with fds was being received.
        let fd_reset = vmm_sys_util::errno::Error::new(nix::libc::ECONNRESET);
        assert!(vm_went_away(&vfio_user::Error::ReceiveWithFd(fd_reset)));
        assert!(!vm_went_away(&vfio_user::Error::InvalidInput));
        let bad = std::io::Error::from(std::io::ErrorKind::InvalidData);
        assert!(!vm_went_away(&vfio_user::Error::StreamRead(bad)));
    }
}
