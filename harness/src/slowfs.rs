//! The slow-disk fixture: `crashmon-slowfs` (harness/slowfs) mounted over a directory, so that
//! the device model can be run with its output directory on a real, slow filesystem.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use crashmon_harness::slowfs::{SlowFs, SlowFsOptions};
//! use std::{path::Path, time::Duration};
//! let options = SlowFsOptions {
//!     fsync_delay: Duration::from_secs(30),
//!     write_bytes_per_sec: Some(50 << 20),
//!     ..SlowFsOptions::default()
//! };
//! let fs = SlowFs::mount(Path::new("/tmp/backing"), Path::new("/tmp/out"), &options)?;
//! // ... run crashmon-device with --output-dir /tmp/out ...
//! assert!(fs.stats()?.delayed_fsyncs > 0);
//! # Ok(()) }
//! ```
//!
//! Mounting needs root (or a `fusermount3` that allows `allow_other`) and `/dev/fuse`.

use crate::process::{ProcessError, Supervised};
use anyhow::{bail, Context, Result};
pub use crashmon_slowfs::{Stats, FS_NAME, READY_LINE};
use log::{info, warn};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `crashmon-slowfs` binary to use.
pub const SLOWFS_ENV: &str = "CRASHMON_SLOWFS";
/// The fixture's executable name.
pub const SLOWFS_BIN: &str = "crashmon-slowfs";

/// How a [`SlowFs`] is mounted. The default delays nothing.
#[derive(Clone, Debug)]
pub struct SlowFsOptions {
    /// Extra time before every fsync and fdatasync of a file (`--fsync-delay-ms`).
    pub fsync_delay: Duration,
    /// Extra time before every fsync of a directory (`--fsyncdir-delay-ms`); `None`: the same
    /// as `fsync_delay`. While it waits, the kernel keeps that directory locked, so creates and
    /// renames in it wait as well.
    pub fsyncdir_delay: Option<Duration>,
    /// Write throughput limit (`--write-bytes-per-sec`); `None`: unlimited.
    pub write_bytes_per_sec: Option<u64>,
    /// Burst allowed by the throughput limit (`--write-burst-bytes`).
    pub write_burst_bytes: u64,
    /// Extra time before every write request (`--write-delay-ms`).
    pub write_delay: Duration,
    /// Session threads (`--threads`); `None`: the binary's default.
    pub threads: Option<u16>,
    /// The binary; `None`: [`locate_binary`].
    pub binary: Option<PathBuf>,
    /// The stats file; `None`: a file in a temporary folder owned by the [`SlowFs`].
    pub stats: Option<PathBuf>,
    /// The process's log (standard output and error); `None`: next to the stats file.
    pub log: Option<PathBuf>,
    /// How long to wait for the mount to be live.
    pub mount_timeout: Duration,
}

impl Default for SlowFsOptions {
    fn default() -> Self {
        SlowFsOptions {
            fsync_delay: Duration::ZERO,
            fsyncdir_delay: None,
            write_bytes_per_sec: None,
            write_burst_bytes: 0,
            write_delay: Duration::ZERO,
            threads: None,
            binary: None,
            stats: None,
            log: None,
            mount_timeout: Duration::from_secs(10),
        }
    }
}

/// The `crashmon-slowfs` binary to run: `$CRASHMON_SLOWFS`, else as [`crate::binary`] finds
/// this workspace's binaries.
pub fn locate_binary() -> Result<PathBuf> {
    Ok(crate::binary::locate(SLOWFS_BIN, SLOWFS_ENV)?)
}

/// Undoes the octal escapes (`\040` for a space...) of a /proc/self/mountinfo field.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The file-system type and source of the topmost mount on `mountpoint` (an absolute,
/// canonical path), from /proc/self/mountinfo; `None` if nothing is mounted there.
pub fn mount_at(mountpoint: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < dash + 3 || fields.len() < 5 {
            continue;
        }
        if unescape_mountinfo(fields[4]) == mountpoint {
            found = Some((fields[dash + 1].to_owned(), fields[dash + 2].to_owned()));
        }
    }
    found
}

/// A mounted `crashmon-slowfs`. Dropping it unmounts it and reaps the process.
#[derive(Debug)]
pub struct SlowFs {
    process: Supervised,
    mountpoint: PathBuf,
    stats: PathBuf,
    /// Holds the stats file and log when the options named none.
    _scratch: Option<tempfile::TempDir>,
    stopped: bool,
}

impl SlowFs {
    /// Mounts a passthrough of `backing` on `mountpoint` (created if missing) with the delays
    /// of `options`, and waits (at most `options.mount_timeout`) until the mount is live: listed
    /// in /proc/self/mountinfo as ours, and the process has said it is serving.
    pub fn mount(backing: &Path, mountpoint: &Path, options: &SlowFsOptions) -> Result<SlowFs> {
        let backing = backing
            .canonicalize()
            .with_context(|| format!("backing directory {}", backing.display()))?;
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("cannot create the mount point {}", mountpoint.display()))?;
        let mountpoint = mountpoint.canonicalize()?;
        if let Some((_, source)) = mount_at(&mountpoint).filter(|(_, s)| s == FS_NAME) {
            bail!("{} is already a {source} mount", mountpoint.display());
        }
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => locate_binary()?,
        };
        let scratch = match (&options.stats, &options.log) {
            (Some(_), Some(_)) => None,
            _ => Some(tempfile::Builder::new().prefix("crashmon-slowfs.").tempdir()?),
        };
        let in_scratch = |name: &str| scratch.as_ref().expect("made when needed").path().join(name);
        let stats = options.stats.clone().unwrap_or_else(|| in_scratch("stats.json"));
        let log = match &options.log {
            Some(log) => log.clone(),
            None => stats.with_extension("log"),
        };

        let mut cmd = Command::new(&binary);
        cmd.arg(&backing).arg(&mountpoint).arg("--stats").arg(&stats);
        cmd.arg("--fsync-delay-ms").arg(options.fsync_delay.as_millis().to_string());
        if let Some(delay) = options.fsyncdir_delay {
            cmd.arg("--fsyncdir-delay-ms").arg(delay.as_millis().to_string());
        }
        if let Some(rate) = options.write_bytes_per_sec {
            cmd.arg("--write-bytes-per-sec").arg(rate.to_string());
            cmd.arg("--write-burst-bytes").arg(options.write_burst_bytes.to_string());
        }
        if !options.write_delay.is_zero() {
            cmd.arg("--write-delay-ms").arg(options.write_delay.as_millis().to_string());
        }
        if let Some(threads) = options.threads {
            cmd.arg("--threads").arg(threads.to_string());
        }
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        info!("mounting the slow filesystem: {}", crate::command_line(&cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let process = Supervised::new(child, SLOWFS_BIN, log);
        let mut fs = SlowFs { process, mountpoint, stats, _scratch: scratch, stopped: false };
        fs.wait_mounted(options.mount_timeout)?;
        Ok(fs)
    }

    fn wait_mounted(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ready = format!("{READY_LINE} ");
        loop {
            if let Some(status) = self.process.try_wait()? {
                self.stopped = true;
                bail!(
                    "{SLOWFS_BIN} exited ({status}) before mounting {}; last lines of its log {}:\n{}",
                    self.mountpoint.display(),
                    self.log_path().display(),
                    self.process.log_tail()
                );
            }
            let listed = mount_at(&self.mountpoint).is_some_and(|(_, source)| source == FS_NAME);
            let serving = std::fs::read_to_string(self.log_path())
                .is_ok_and(|log| log.lines().any(|l| l.starts_with(&ready)));
            if listed && serving {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{SLOWFS_BIN} did not mount {} within {timeout:?}; last lines of its log {}:\n{}",
                    self.mountpoint.display(),
                    self.log_path().display(),
                    self.process.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The stats file.
    pub fn stats_path(&self) -> &Path {
        &self.stats
    }

    /// The process's log.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The counters as last published. Every fsync, fsyncdir and write that has returned to
    /// its caller is counted; so is every delayed operation that has started to wait
    /// (`in_flight_delayed`).
    pub fn stats(&self) -> Result<Stats> {
        Ok(Stats::read(&self.stats)?)
    }

    /// The exit status if the process has exited (by itself, or after SIGTERM).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.process.try_wait()?)
    }

    /// Whether the mount is still listed in /proc/self/mountinfo.
    pub fn is_mounted(&self) -> bool {
        mount_at(&self.mountpoint).is_some_and(|(_, source)| source == FS_NAME)
    }

    /// Unmounts (`fusermount3 -u`, else a lazy unmount) and reaps the process, reporting what
    /// went wrong. Dropping a `SlowFs` does the same, logging instead.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut problems = Vec::new();
        if self.is_mounted() {
            let unmounted = match Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .output()
            {
                Ok(out) if out.status.success() => true,
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    warn!("fusermount3 -u {}: {}", self.mountpoint.display(), stderr.trim());
                    false
                }
                Err(e) => {
                    warn!("cannot run fusermount3: {e}");
                    false
                }
            };
            if !unmounted {
                // Busy (something still has a file open in it): detach it now; it is gone for
                // good once the process below has exited.
                if let Err(e) =
                    nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                {
                    problems.push(format!("cannot unmount {}: {e}", self.mountpoint.display()));
                }
            }
        }
        // Unmounted, the process exits by itself; give it a moment, then ask, then insist.
        if self.process.wait_exit(Duration::from_secs(3))?.is_none() {
            match self.process.terminate(Duration::from_secs(8)) {
                Ok(_) => {}
                Err(e @ ProcessError::StillRunning { .. }) => problems.push(format!("{e}: killed")),
                Err(e) => return Err(e.into()),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!("stopping the slow filesystem on {}: {e:#}", self.mountpoint.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), PathBuf::from(r"/tmp/a b\c"));
        assert_eq!(unescape_mountinfo(r"/plain\0"), PathBuf::from(r"/plain\0"));
    }

    #[test]
    fn the_root_is_mounted() {
        assert!(mount_at(Path::new("/")).is_some());
        assert!(mount_at(Path::new("/no/such/mount/point")).is_none());
    }
}
