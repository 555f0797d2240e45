//! Finding a QEMU that can attach the card, i.e. one with the `vfio-user-pci` device.
//!
//! In order: the binary named by `$CRASHMON_QEMU` (used as-is); `qemu-system-x86_64` on `PATH`
//! if it has `vfio-user-pci`; otherwise a QEMU provisioned once into `<cache>/qemu`. Debian 12
//! ships QEMU 7.2, which predates vfio-user, so provisioning builds a minimal Debian trixie tree
//! with debootstrap, installs `qemu-system-x86` from trixie-backports into it, and runs that QEMU
//! in place through the tree's own dynamic loader, without touching the host's packages.

use log::{info, warn};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use thiserror::Error;

/// Environment variable naming a QEMU binary to use as-is.
pub const QEMU_ENV: &str = "CRASHMON_QEMU";
/// The system QEMU looked up on `PATH`.
pub const SYSTEM_QEMU: &str = "qemu-system-x86_64";

/// The Debian suite of the provisioned tree, and where its packages come from.
const SUITE: &str = "trixie";
const BACKPORTS: &str = "trixie-backports";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Written into the provisioned folder last, before it is renamed into place.
const MARKER: &str = "crashmon-provisioned";

/// Why no usable QEMU could be found or provisioned.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The binary could not be started at all.
    #[error("cannot run {binary}")]
    Run { binary: PathBuf, source: io::Error },
    /// The binary runs but cannot attach a vfio-user device.
    #[error("{binary} ({version}) has no vfio-user-pci device; QEMU 10.1 or newer built with vfio-user is needed")]
    NoVfioUser { binary: PathBuf, version: String },
    /// Provisioning runs debootstrap, mount and chroot.
    #[error("provisioning QEMU into {0} needs root (debootstrap, mount, chroot); run it as root, or set CRASHMON_QEMU to a QEMU with vfio-user-pci")]
    NotRoot(PathBuf),
    /// An external command of the provisioning failed.
    #[error("{step} failed ({status}); last lines of {log}:\n{tail}")]
    Step { step: String, status: ExitStatus, log: PathBuf, tail: String },
    /// A file-system operation failed.
    #[error("{context}")]
    Io { context: String, source: io::Error },
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
    let context = context.into();
    move |source| QemuError::Io { context, source }
}

/// Where a [`Qemu`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuSource {
    /// Named by `$CRASHMON_QEMU`.
    Env,
    /// `qemu-system-x86_64` found on `PATH`.
    System,
    /// The tree provisioned into the cache folder.
    Provisioned,
}

/// A QEMU that has `vfio-user-pci`, and how to start it.
#[derive(Clone, Debug)]
pub struct Qemu {
    binary: PathBuf,
    /// The provisioned tree the binary lives in, which supplies its loader, libraries and data.
    tree: Option<PathBuf>,
    source: QemuSource,
}

impl Qemu {
    /// Finds a QEMU with `vfio-user-pci`, provisioning one into `<cache>/qemu` if there is none.
    pub fn find_or_provision() -> Result<Self, QemuError> {
        if let Some(binary) = std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()) {
            let qemu = Qemu { binary: binary.into(), tree: None, source: QemuSource::Env };
            qemu.require_vfio_user()?;
            return Ok(qemu);
        }
        if let Some(binary) = find_in_path(SYSTEM_QEMU) {
            let qemu = Qemu { binary, tree: None, source: QemuSource::System };
            match qemu.require_vfio_user() {
                Ok(()) => return Ok(qemu),
                Err(e) => info!("not using the system QEMU: {e}"),
            }
        }
        Self::provision(&crate::cache_dir())
    }

    /// The QEMU provisioned under `cache`, provisioning it first if it is not there yet.
    ///
    /// Safe to call concurrently: a lock file serialises provisioning, the tree is built in a
    /// temporary folder beside its final place and renamed into place only once it works.
    pub fn provision(cache: &Path) -> Result<Self, QemuError> {
        let dir = cache.join("qemu");
        if let Some(qemu) = Self::provisioned_in(&dir) {
            return Ok(qemu);
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(QemuError::NotRoot(dir));
        }
        fs::create_dir_all(cache)
            .map_err(io_context(format!("cannot create {}", cache.display())))?;
        let _lock = lock_exclusive(&cache.join("qemu.lock"))?;
        // Another process may have finished provisioning while this one waited for the lock.
        if let Some(qemu) = Self::provisioned_in(&dir) {
            return Ok(qemu);
        }
        Provisioner::new(cache).run(&dir)
    }

    /// The QEMU in an already provisioned folder, if it is complete.
    fn provisioned_in(dir: &Path) -> Option<Self> {
        if !dir.join(MARKER).is_file() {
            return None;
        }
        Some(Self::in_tree(dir.join("root"), QemuSource::Provisioned))
    }

    fn in_tree(tree: PathBuf, source: QemuSource) -> Self {
        Qemu { binary: tree.join("usr/bin").join(SYSTEM_QEMU), tree: Some(tree), source }
    }

    /// The QEMU executable (inside the provisioned tree if it was provisioned).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Where this QEMU came from.
    pub fn source(&self) -> QemuSource {
        self.source
    }

    /// A command that starts this QEMU; add the VM's arguments to it.
    ///
    /// A provisioned QEMU is started through its tree's dynamic loader with the tree's library
    /// folders, and told where its firmware (`-L`) and modules (`QEMU_MODULE_DIR`) are.
    pub fn command(&self) -> Command {
        let Some(tree) = &self.tree else {
            return Command::new(&self.binary);
        };
        let libs: Vec<PathBuf> = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| tree.join(d))
            .collect();
        let mut cmd = Command::new(tree.join("lib64/ld-linux-x86-64.so.2"));
        cmd.arg("--library-path")
            .arg(std::env::join_paths(libs).expect("tree paths contain no ':'"))
            .arg(&self.binary)
            .arg("-L")
            .arg(tree.join("usr/share/qemu"))
            .arg("-L")
            .arg(tree.join("usr/share/seabios"))
            .env("QEMU_MODULE_DIR", tree.join("usr/lib/x86_64-linux-gnu/qemu"));
        cmd
    }

    /// The first line of `qemu --version`, e.g. "QEMU emulator version 11.1.3 (Debian ...)".
    pub fn version(&self) -> Result<String, QemuError> {
        let out = self.output(&["--version"])?;
        Ok(out.lines().next().unwrap_or_default().trim().to_owned())
    }

    /// Whether `-device help` lists `vfio-user-pci`.
    pub fn has_vfio_user(&self) -> Result<bool, QemuError> {
        Ok(self.output(&["-device", "help"])?.contains("\"vfio-user-pci\""))
    }

    fn require_vfio_user(&self) -> Result<(), QemuError> {
        if self.has_vfio_user()? {
            return Ok(());
        }
        let version = self.version().unwrap_or_else(|e| e.to_string());
        Err(QemuError::NoVfioUser { binary: self.binary.clone(), version })
    }

    /// Runs QEMU with `args` and returns its standard output.
    fn output(&self, args: &[&str]) -> Result<String, QemuError> {
        let run_error = |source| QemuError::Run { binary: self.binary.clone(), source };
        let out = self.command().args(args).stdin(Stdio::null()).output().map_err(run_error)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let message = format!(
                "`{} {}` exited with {}: {}",
                self.binary.display(),
                args.join(" "),
                out.status,
                stderr.trim()
            );
            return Err(run_error(io::Error::other(message)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The folders a non-login root shell's `PATH` may lack, where the provisioning tools live.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Looks `name` up in `PATH`, then in the sbin folders.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// A command running the host tool `name` with the sbin folders on its `PATH` (debootstrap, a
/// shell script, runs chroot and friends through it).
fn system_tool(name: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(SBIN_DIRS.map(PathBuf::from));
    let mut cmd = Command::new(find_in_path(name).unwrap_or_else(|| name.into()));
    if let Ok(path) = std::env::join_paths(dirs) {
        cmd.env("PATH", path);
    }
    cmd
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Takes an exclusive lock on `path` (created if needed), waiting for it if another process
/// holds it. The lock is released when the file is dropped.
fn lock_exclusive(path: &Path) -> Result<File, QemuError> {
    let file =
        File::create(path).map_err(io_context(format!("cannot create {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            info!("another process is provisioning QEMU; waiting for it ({})", path.display())
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(io_context(format!("cannot lock {}", path.display()))(e))
        }
    }
    file.lock().map_err(io_context(format!("cannot lock {}", path.display())))?;
    Ok(file)
}

/// One provisioning run: builds the tree in a temporary folder, logging every command's output.
struct Provisioner {
    cache: PathBuf,
    log: PathBuf,
}

impl Provisioner {
    fn new(cache: &Path) -> Self {
        Provisioner { cache: cache.to_owned(), log: cache.join("qemu-provision.log") }
    }

    fn run(&self, dir: &Path) -> Result<Qemu, QemuError> {
        info!(
            "no QEMU with vfio-user-pci found: provisioning QEMU from Debian {BACKPORTS} into {} \
             (once; this takes a minute or two; details in {})",
            dir.display(),
            self.log.display()
        );
        File::create(&self.log)
            .map_err(io_context(format!("cannot create {}", self.log.display())))?;
        self.ensure_debootstrap()?;
        self.remove_leftovers()?;

        let temp = self.cache.join(format!("qemu.tmp-{}", std::process::id()));
        let tree = temp.join("root");
        fs::create_dir_all(&temp)
            .map_err(io_context(format!("cannot create {}", temp.display())))?;

        info!("debootstrap: a minimal Debian {SUITE} tree in {}", tree.display());
        self.step(
            &format!("debootstrap {SUITE}"),
            system_tool("debootstrap").args(["--variant=minbase", SUITE]).arg(&tree).arg(MIRROR),
        )?;
        let backports = tree.join("etc/apt/sources.list.d/backports.list");
        fs::write(&backports, format!("deb {MIRROR} {BACKPORTS} main\n"))
            .map_err(io_context(format!("cannot write {}", backports.display())))?;
        {
            let _proc = BindMount::new(Path::new("/proc"), &tree.join("proc"), self)?;
            info!("installing qemu-system-x86 from {BACKPORTS} into the tree");
            self.step("apt-get update (in the tree)", &mut chroot_apt(&tree, &["update"]))?;
            self.step(
                "apt-get install qemu-system-x86 (in the tree)",
                &mut chroot_apt(
                    &tree,
                    &[
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "-t",
                        BACKPORTS,
                        "qemu-system-x86",
                    ],
                ),
            )?;
            self.step("apt-get clean (in the tree)", &mut chroot_apt(&tree, &["clean"]))?;
        }

        let qemu = Qemu::in_tree(tree, QemuSource::Provisioned);
        qemu.require_vfio_user()?;
        let version = qemu.version()?;
        let marker = temp.join(MARKER);
        fs::write(
            &marker,
            format!(
                "{version}\nDebian {SUITE} tree, qemu-system-x86 from {BACKPORTS} ({MIRROR})\n"
            ),
        )
        .map_err(io_context(format!("cannot write {}", marker.display())))?;

        if dir.exists() {
            warn!("replacing the incomplete {}", dir.display());
            remove_tree(dir)?;
        }
        fs::rename(&temp, dir).map_err(io_context(format!(
            "cannot rename {} to {}",
            temp.display(),
            dir.display()
        )))?;
        info!("provisioned {version} in {}", dir.display());
        Ok(Qemu::in_tree(dir.join("root"), QemuSource::Provisioned))
    }

    /// Installs debootstrap with apt if it is missing, updating the package lists only if the
    /// first attempt fails.
    fn ensure_debootstrap(&self) -> Result<(), QemuError> {
        if find_in_path("debootstrap").is_some() {
            return Ok(());
        }
        info!("debootstrap is missing: running `apt-get install -y debootstrap`");
        let install = || {
            let mut cmd = system_tool("apt-get");
            cmd.args(["install", "-y", "debootstrap"]).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        if self.step("apt-get install debootstrap", &mut install()).is_ok() {
            return Ok(());
        }
        info!("that failed: running `apt-get update`, then installing debootstrap again");
        self.step("apt-get update", system_tool("apt-get").arg("update"))?;
        self.step("apt-get install debootstrap", &mut install())
    }

    /// Removes temporary folders left by an interrupted provisioning, unmounting anything still
    /// mounted inside them first.
    fn remove_leftovers(&self) -> Result<(), QemuError> {
        let entries = fs::read_dir(&self.cache)
            .map_err(io_context(format!("cannot list {}", self.cache.display())))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("qemu.tmp-") {
                warn!("removing {} left by an interrupted provisioning", entry.path().display());
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Runs one external command with its output appended to the log.
    fn step(&self, step: &str, cmd: &mut Command) -> Result<(), QemuError> {
        let mut log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .map_err(io_context(format!("cannot open {}", self.log.display())))?;
        let _ = writeln!(log, "\n=== {step}: {cmd:?}");
        let stderr = log.try_clone().map_err(io_context("cannot duplicate the log file"))?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .status()
            .map_err(io_context(format!("cannot run {step}")))?;
        if status.success() {
            return Ok(());
        }
        let tail = crate::log_tail(&self.log, 25);
        Err(QemuError::Step { step: step.to_owned(), status, log: self.log.clone(), tail })
    }
}

/// `apt-get ARGS` inside `tree`, non-interactively.
fn chroot_apt(tree: &Path, args: &[&str]) -> Command {
    let mut cmd = system_tool("chroot");
    cmd.arg(tree)
        .arg("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

/// A bind mount that is undone when dropped.
struct BindMount {
    target: PathBuf,
}

impl BindMount {
    fn new(source: &Path, target: &Path, provisioner: &Provisioner) -> Result<Self, QemuError> {
        provisioner.step(
            &format!("mount --bind {} {}", source.display(), target.display()),
            system_tool("mount").arg("--bind").arg(source).arg(target),
        )?;
        Ok(BindMount { target: target.to_owned() })
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.target) {
            warn!("{e}");
        }
    }
}

fn unmount(target: &Path) -> Result<(), QemuError> {
    let status = system_tool("umount").arg(target).status();
    if matches!(status, Ok(s) if s.success()) {
        return Ok(());
    }
    // Busy (a process started in the chroot is still running): detach it lazily.
    let status = system_tool("umount")
        .arg("-l")
        .arg(target)
        .status()
        .map_err(io_context(format!("cannot run umount {}", target.display())))?;
    if status.success() {
        Ok(())
    } else {
        Err(QemuError::Io {
            context: format!("cannot unmount {}", target.display()),
            source: io::Error::other(format!("umount -l exited with {status}")),
        })
    }
}

/// Removes a provisioning folder, first unmounting anything mounted under it so that the
/// removal can never reach into the host's /proc.
fn remove_tree(dir: &Path) -> Result<(), QemuError> {
    let dir =
        fs::canonicalize(dir).map_err(io_context(format!("cannot resolve {}", dir.display())))?;
    let mut mounts: Vec<PathBuf> =
        mount_points()?.into_iter().filter(|m| m.starts_with(&dir)).collect();
    // Deepest first, so nested mounts come off before their parents.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in &mounts {
        unmount(mount)?;
    }
    fs::remove_dir_all(&dir).map_err(io_context(format!("cannot remove {}", dir.display())))
}

/// Every mount point of this process's mount namespace.
fn mount_points() -> Result<Vec<PathBuf>, QemuError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_context("cannot read /proc/self/mountinfo"))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), OsString::from("/tmp/a b"));
        assert_eq!(unescape_mountinfo(r"/plain"), OsString::from("/plain"));
        assert_eq!(unescape_mountinfo(r"/odd\04"), OsString::from(r"/odd\04"));
    }

    #[test]
    fn provisioned_qemu_runs_through_the_tree_loader() {
        let qemu = Qemu::in_tree(PathBuf::from("/c/qemu/root"), QemuSource::Provisioned);
        let cmd = qemu.command();
        assert_eq!(cmd.get_program(), "/c/qemu/root/lib64/ld-linux-x86-64.so.2");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--library-path",
                "/c/qemu/root/lib/x86_64-linux-gnu:/c/qemu/root/usr/lib/x86_64-linux-gnu",
                "/c/qemu/root/usr/bin/qemu-system-x86_64",
                "-L",
                "/c/qemu/root/usr/share/qemu",
                "-L",
                "/c/qemu/root/usr/share/seabios",
            ]
        );
    }

    #[test]
    fn an_unfinished_folder_is_not_taken_for_a_provisioned_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Qemu::provisioned_in(dir.path()).is_none());
        fs::write(dir.path().join(MARKER), "x").unwrap();
        assert!(Qemu::provisioned_in(dir.path()).is_some());
    }
}
