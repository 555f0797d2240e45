//! `crashmon-slowfs`: mounts a passthrough of a directory with slow syncs and throttled writes.
//! See the library documentation.

use anyhow::{bail, Context, Result};
use clap::Parser;
use crashmon_slowfs::fs::{SlowFs, SlowFsConfig};
use crashmon_slowfs::stats::{StatsBoard, PUBLISH_INTERVAL};
use crashmon_slowfs::throttle::{Delays, TokenBucket};
use crashmon_slowfs::{DelayConfig, FS_NAME, READY_LINE};
use fuser::{MountOption, Session, SessionACL};
use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// A FUSE passthrough of BACKING mounted on MOUNTPOINT, with slow fsync and throttled writes.
///
/// Prints "mounted MOUNTPOINT" on standard output once serving; unmounts on SIGTERM or SIGINT
/// (and exits when unmounted by someone else, e.g. `fusermount3 -u MOUNTPOINT`).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Directory whose content the mount shows.
    backing: PathBuf,
    /// Directory to mount on.
    mountpoint: PathBuf,
    /// Extra time before every fsync and fdatasync of a file is performed.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    fsync_delay_ms: u64,
    /// Extra time before every fsync of a directory is performed [default: --fsync-delay-ms].
    /// While it waits, the kernel keeps that directory locked: creates and renames in it wait.
    #[arg(long, value_name = "MS")]
    fsyncdir_delay_ms: Option<u64>,
    /// Write throughput limit (a token bucket): each write waits for its share first.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    write_bytes_per_sec: Option<u64>,
    /// Bytes that may be written at once, with no wait, after an idle period.
    #[arg(long, value_name = "BYTES", default_value_t = 0, requires = "write_bytes_per_sec")]
    write_burst_bytes: u64,
    /// Extra time before every write request is performed.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    write_delay_ms: u64,
    /// JSON file for the counters of what was done and delayed; outside the mount.
    #[arg(long, value_name = "PATH")]
    stats: Option<PathBuf>,
    /// File to create once mounted (and to remove on exit); outside the mount.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Threads reading requests from the kernel (delayed operations get threads of their own).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli: Cli = crashmon_cli::parse("crashmon-slowfs");
    if let Err(e) = run(cli) {
        crashmon_cli::fail("crashmon-slowfs", e, 1);
    }
}

/// A directory that must exist, made absolute.
fn existing_dir(path: &Path, what: &str) -> Result<PathBuf> {
    let dir = path.canonicalize().with_context(|| format!("{what} {}", path.display()))?;
    if !dir.is_dir() {
        bail!("{what} {} is not a directory", path.display());
    }
    Ok(dir)
}

/// Checks that a file the filesystem itself writes is not inside the mount, where writing it
/// would go through the filesystem (and could deadlock it).
fn outside_mount(path: &Path, mountpoint: &Path, what: &str) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = existing_dir(parent, &format!("the folder of the {what}"))?;
    if parent.starts_with(mountpoint) {
        bail!("the {what} {} must not be inside the mount point", path.display());
    }
    Ok(())
}

enum Event {
    Signal(i32),
    SessionEnded(std::io::Result<()>),
}

fn run(cli: Cli) -> Result<()> {
    let backing = existing_dir(&cli.backing, "backing directory")?;
    let mountpoint = existing_dir(&cli.mountpoint, "mount point")?;
    for (path, what) in [(&cli.stats, "stats file"), (&cli.ready_file, "ready file")] {
        if let Some(path) = path {
            outside_mount(path, &mountpoint, what)?;
        }
    }
    // The kernel applies the caller's umask before a create or mkdir reaches us: ours must not
    // mask the mode a second time.
    rustix::process::umask(rustix::fs::Mode::empty());

    let fsyncdir_delay_ms = cli.fsyncdir_delay_ms.unwrap_or(cli.fsync_delay_ms);
    let config = DelayConfig {
        fsync_delay_ms: cli.fsync_delay_ms,
        fsyncdir_delay_ms,
        write_bytes_per_sec: cli.write_bytes_per_sec,
        write_burst_bytes: cli.write_burst_bytes,
        write_delay_ms: cli.write_delay_ms,
    };
    let delays = Delays {
        fsync: Duration::from_millis(cli.fsync_delay_ms),
        fsyncdir: Duration::from_millis(fsyncdir_delay_ms),
        per_write: Duration::from_millis(cli.write_delay_ms),
        bucket: cli.write_bytes_per_sec.map(|rate| TokenBucket::new(rate, cli.write_burst_bytes)),
    };
    let board = Arc::new(StatsBoard::new(config, cli.stats.clone()));
    if let Some(path) = &cli.stats {
        // Once synchronously, so that an unwritable stats file is an error at start.
        let stats = board.snapshot();
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("cannot write the stats file {}", path.display()))?;
    }

    let fs = SlowFs::new(SlowFsConfig { backing: backing.clone(), delays }, board.clone())
        .with_context(|| format!("cannot open the backing directory {}", backing.display()))?;
    let signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot set signal handlers")?;

    // Requests are read by `--threads` session threads (fuser's multi-threaded loop, each with
    // its own /dev/fuse descriptor), so one slow operation on the backing disk itself does not
    // stall the others; the configured delays do not occupy these threads at all (see fs.rs).
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName(FS_NAME.to_owned()),
        // The kernel checks permissions against the modes and owners we pass through (this
        // process is root: without it, everyone could do everything).
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    // allow_other: the device model or QEMU may run as another user than the harness. Only
    // as root: for anyone else fusermount3 refuses it unless /etc/fuse.conf has
    // user_allow_other.
    options.acl =
        if rustix::process::geteuid().is_root() { SessionACL::All } else { SessionACL::Owner };
    options.n_threads = Some(usize::from(cli.threads));
    options.clone_fd = true;
    let mut session = Session::new(fs, &mountpoint, &options)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let mut unmounter = session.unmount_callable();

    let (tx, rx) = mpsc::channel();
    let session_tx = tx.clone();
    std::thread::Builder::new().name("session".into()).spawn(move || {
        let _ = session_tx.send(Event::SessionEnded(session.run()));
    })?;
    let signals_handle = signals.handle();
    std::thread::Builder::new().name("signals".into()).spawn({
        let mut signals = signals;
        move || {
            for signal in signals.forever() {
                if tx.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        }
    })?;
    std::thread::Builder::new().name("stats".into()).spawn({
        let board = board.clone();
        move || {
            let mut last = board.snapshot();
            loop {
                std::thread::sleep(PUBLISH_INTERVAL);
                let now = board.snapshot();
                if now != last {
                    board.publish();
                    last = now;
                }
            }
        }
    })?;

    info!(
        "{} mounted on {} (fsync delay {} ms, fsyncdir delay {} ms, write limit {}, write delay {} ms)",
        backing.display(),
        mountpoint.display(),
        cli.fsync_delay_ms,
        fsyncdir_delay_ms,
        cli.write_bytes_per_sec.map_or("none".to_owned(), |r| format!("{r} B/s")),
        cli.write_delay_ms
    );
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{READY_LINE} {}", mountpoint.display())?;
    stdout.flush()?;
    if let Some(path) = &cli.ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot create the ready file {}", path.display()))?;
    }

    let ended = match rx.recv() {
        Ok(Event::Signal(signal)) => {
            info!("signal {signal}: unmounting {}", mountpoint.display());
            if let Err(e) = unmounter.unmount() {
                // Busy (files open in the mount): detach it from the tree now; it goes away
                // when the last file closes, or when this process exits.
                warn!("cannot unmount {} ({e}): detaching it", mountpoint.display());
                if let Err(e) =
                    rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH)
                {
                    error!("cannot detach {}: {e}", mountpoint.display());
                }
            }
            let ended = wait_session_end(&rx, Duration::from_secs(5));
            info!("the FUSE session has ended");
            ended
        }
        Ok(Event::SessionEnded(result)) => {
            info!("{} was unmounted", mountpoint.display());
            Some(result)
        }
        Err(_) => None,
    };
    signals_handle.close();
    board.publish();
    if let Some(path) = &cli.ready_file {
        let _ = std::fs::remove_file(path);
    }
    match ended {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(e).context("the FUSE session failed"),
        None => {
            warn!("the FUSE session did not end in time: exiting, which aborts the connection");
            Ok(())
        }
    }
}

/// Waits up to `timeout` for the session to end, ignoring further signals.
fn wait_session_end(rx: &mpsc::Receiver<Event>, timeout: Duration) -> Option<std::io::Result<()>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::SessionEnded(result)) => return Some(result),
            Ok(Event::Signal(_)) => continue,
            Err(_) => return None,
        }
    }
}
