//! The device model's sandbox, applied once setup is done: the socket is bound, the output
//! folder exists, the data window is mapped, and no thread has been started yet (so every thread
//! the process ever runs — the signal handler, the recovery thread, each session's writer —
//! inherits all of it).
//!
//! What a guest controls (every register, every byte of the data window) and what QEMU controls
//! (every vfio-user message) reach this process; see SECURITY.md. If either finds a hole, the
//! sandbox bounds what it can do with it. In order:
//!
//! 1. **The user.** Started as root with `--user NAME`, the process chowns its socket (and the
//!    output folder, if it created it) to that user, then calls `setgroups([gid])`, `setgid`,
//!    `setuid`. Started as root without `--user` it stays root, with the rest of the sandbox.
//! 2. **`no_new_privs`**, so that nothing it could exec gains privileges (and so that an
//!    unprivileged process may install the seccomp filter).
//! 3. **Landlock**: file access only beneath the output folder (read, write, create, remove,
//!    rename), plus removing a file in the socket's folder (the socket itself, at exit).
//!    Best effort: a kernel without Landlock (or with an older ABI) enforces what it can, and
//!    the log says which.
//! 4. **seccomp** (last: it does not allow the calls above): an allow-list of the syscalls the
//!    device model makes in steady state ([`SYSCALLS`]), for every thread (`TSYNC`). Any other
//!    syscall fails with `EPERM` by default, or kills the process with
//!    `--seccomp-violation kill`.
//!
//! `--no-sandbox` skips all of it, for debugging (strace, gdb, profilers).

use log::warn;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What the seccomp filter does with a syscall outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The call fails with `EPERM`; the process goes on. The default: the process holds a
    /// crash dump that may be the only copy, and a call missing from the list on some rare path
    /// should fail that one operation (reported like any I/O error), not lose the dump.
    Errno,
    /// The kernel kills the process (`SECCOMP_RET_KILL_PROCESS`): louder, for deployments that
    /// prefer to notice at once.
    Kill,
}

impl std::str::FromStr for Violation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "errno" => Ok(Self::Errno),
            "kill" => Ok(Self::Kill),
            _ => Err(format!("'{s}' is neither 'errno' nor 'kill'")),
        }
    }
}

/// What to sandbox.
#[derive(Clone, Debug)]
pub struct Options {
    /// The only folder the process may touch.
    pub output_dir: PathBuf,
    /// The bound vfio-user socket.
    pub socket: PathBuf,
    /// `--user`: the user to drop to (the process must be root).
    pub user: Option<String>,
    /// Whether the process created the output folder (then it is handed to `user`).
    pub created_output_dir: bool,
    /// What a syscall outside the list gets.
    pub violation: Violation,
}

/// What was enforced, for the log.
#[derive(Clone, Debug)]
pub struct Report {
    /// The user dropped to: name, uid, gid.
    pub user: Option<(String, u32, u32)>,
    /// The uid the process runs as from now on.
    pub uid: u32,
    /// How much of the Landlock ruleset the kernel enforces.
    pub landlock: String,
    /// Whether the seccomp filter is installed (false on an architecture without a list).
    pub seccomp: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some((name, uid, gid)) => write!(f, "user {name} (uid {uid}, gid {gid})")?,
            None => write!(f, "user unchanged (uid {})", self.uid)?,
        }
        write!(f, "; no_new_privs; Landlock {}; ", self.landlock)?;
        if self.seccomp {
            write!(f, "seccomp allow-list of {} syscalls", SYSCALLS.len())
        } else {
            write!(f, "no seccomp filter (no list for this architecture)")
        }
    }
}

/// Why the sandbox could not be applied. The device model does not serve without it (unless
/// `--no-sandbox`).
#[derive(Debug, Error)]
pub enum SandboxError {
    /// `--user` names nobody.
    #[error("--user: no user named '{0}'")]
    NoSuchUser(String),
    /// The user database could not be read.
    #[error("--user: looking up '{name}': {source}")]
    UserLookup {
        /// The name.
        name: String,
        /// Why.
        source: nix::Error,
    },
    /// `--user` without being root.
    #[error("--user needs the device model to start as root (it runs as uid {0})")]
    NotRoot(u32),
    /// A step of dropping privileges failed.
    #[error("cannot drop to user '{name}': {step}: {source}")]
    Drop {
        /// The user.
        name: String,
        /// Which call.
        step: &'static str,
        /// Why.
        source: nix::Error,
    },
    /// prctl(PR_SET_NO_NEW_PRIVS) failed.
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::Error),
    /// Landlock failed (beyond what best effort tolerates).
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    /// A folder of the Landlock ruleset could not be opened.
    #[error("Landlock: {0}")]
    LandlockPath(#[from] landlock::PathFdError),
    /// The seccomp filter could not be built.
    #[error("seccomp filter: {0}")]
    SeccompBuild(#[from] seccompiler::BackendError),
    /// The seccomp filter could not be installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
}

/// Applies the sandbox to the calling process; see the module documentation for the order.
pub fn apply(options: &Options) -> Result<Report, SandboxError> {
    let user = match &options.user {
        Some(name) => Some(drop_to(name, options)?),
        None => {
            if nix::unistd::geteuid().is_root() {
                warn!("running as root: pass --user NAME to drop to an unprivileged user");
            }
            None
        }
    };
    let uid = nix::unistd::getuid().as_raw();
    set_no_new_privs()?;
    let landlock = landlock(options)?;
    let seccomp = match filter(options.violation)? {
        Some(program) => {
            seccompiler::apply_filter_all_threads(&program)?;
            true
        }
        None => false,
    };
    Ok(Report { user, uid, landlock, seccomp })
}

/// Looks `name` up, hands it the socket (and the output folder if this process made it), and
/// becomes it.
fn drop_to(name: &str, options: &Options) -> Result<(String, u32, u32), SandboxError> {
    use nix::unistd::{chown, setgid, setgroups, setuid, Gid, Uid, User};
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(SandboxError::NotRoot(euid.as_raw()));
    }
    let user = User::from_name(name)
        .map_err(|source| SandboxError::UserLookup { name: name.to_owned(), source })?
        .ok_or_else(|| SandboxError::NoSuchUser(name.to_owned()))?;
    let (uid, gid): (Uid, Gid) = (user.uid, user.gid);
    let step = |step: &'static str| {
        move |source| SandboxError::Drop { name: name.to_owned(), step, source }
    };
    // The socket belongs to the user that serves it: a QEMU running as that user can connect
    // (root always can). Its folder is not touched: removing the socket at exit needs that
    // folder to be writable by the user, else the next start finds it and asks for it to go.
    chown(&options.socket, Some(uid), Some(gid)).map_err(step("chown the socket"))?;
    if options.created_output_dir {
        chown(&options.output_dir, Some(uid), Some(gid))
            .map_err(step("chown the output folder"))?;
    }
    setgroups(&[gid]).map_err(step("setgroups"))?;
    setgid(gid).map_err(step("setgid"))?;
    setuid(uid).map_err(step("setuid"))?;
    // setuid from root to a non-root uid drops every capability; check that it stuck.
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::Drop {
            name: name.to_owned(),
            step: "regaining root was possible",
            source: nix::Error::EPERM,
        });
    }
    Ok((name.to_owned(), uid.as_raw(), gid.as_raw()))
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    let rc = unsafe { nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SandboxError::NoNewPrivs(nix::Error::last()));
    }
    Ok(())
}

/// Landlock: everything beneath the output folder, removing files in the socket's folder,
/// nothing else.
fn landlock(options: &Options) -> Result<String, SandboxError> {
    use landlock::{
        Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V6;
    let socket_dir = options
        .socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rule(PathBeneath::new(PathFd::new(&options.output_dir)?, AccessFs::from_all(abi)))?
        .add_rule(PathBeneath::new(PathFd::new(&socket_dir)?, AccessFs::RemoveFile))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!(
            "fully enforced (files only beneath {}; the socket's folder: remove only)",
            options.output_dir.display()
        ),
        RulesetStatus::PartiallyEnforced => format!(
            "partly enforced by this kernel (files only beneath {}, for the access rights it knows)",
            options.output_dir.display()
        ),
        RulesetStatus::NotEnforced => "not available in this kernel: NOT enforced".to_owned(),
    })
}

/// The syscalls the device model makes once sandboxed, found by running the test suites and the
/// QEMU end-to-end tests under `strace -f` (see SECURITY.md, "Deriving the syscall list"):
/// serving vfio-user (accept, messages with fds), the writers (files, fsync, rename, flock,
/// hashing with SEEK_DATA), recovery (listing the folder), threads and their stacks, memory,
/// time, randomness for session ids, signals, logging, and exiting.
#[cfg(target_arch = "x86_64")]
pub const SYSCALLS: &[(&str, i64)] = {
    use nix::libc::*;
    &[
        // vfio-user: the socket, messages and fds.
        ("accept4", SYS_accept4),
        ("recvmsg", SYS_recvmsg),
        ("recvfrom", SYS_recvfrom),
        ("sendmsg", SYS_sendmsg),
        ("sendto", SYS_sendto),
        ("read", SYS_read),
        ("write", SYS_write),
        ("writev", SYS_writev),
        ("close", SYS_close),
        // The vfio-user handshake's deadline (SO_RCVTIMEO/SO_SNDTIMEO) and closing a stream.
        ("setsockopt", SYS_setsockopt),
        ("getsockopt", SYS_getsockopt),
        ("shutdown", SYS_shutdown),
        // Files in the output folder (Landlock limits where).
        ("openat", SYS_openat),
        ("pread64", SYS_pread64),
        ("pwrite64", SYS_pwrite64),
        ("lseek", SYS_lseek),
        ("fsync", SYS_fsync),
        ("flock", SYS_flock),
        ("rename", SYS_rename),
        ("renameat", SYS_renameat),
        ("renameat2", SYS_renameat2),
        ("unlink", SYS_unlink),
        ("unlinkat", SYS_unlinkat),
        ("getdents64", SYS_getdents64),
        ("statx", SYS_statx),
        ("newfstatat", SYS_newfstatat),
        ("fstat", SYS_fstat),
        ("fdatasync", SYS_fdatasync),
        // Writeback started while a dump streams (sync_file_range with SYNC_FILE_RANGE_WRITE).
        ("sync_file_range", SYS_sync_file_range),
        // A dump that ends in zero pages left as holes gets its length with set_len.
        ("ftruncate", SYS_ftruncate),
        // Dumps' and sidecars' mode and group (--file-mode, --file-group), on the new file.
        ("fchmod", SYS_fchmod),
        ("fchown", SYS_fchown),
        // Free space for --min-free (statvfs).
        ("statfs", SYS_statfs),
        ("fstatfs", SYS_fstatfs),
        // Memory.
        ("mmap", SYS_mmap),
        ("munmap", SYS_munmap),
        ("mprotect", SYS_mprotect),
        ("mremap", SYS_mremap),
        ("madvise", SYS_madvise),
        ("brk", SYS_brk),
        // Threads (one writer per session, started later).
        ("clone3", SYS_clone3),
        ("clone", SYS_clone),
        ("set_robust_list", SYS_set_robust_list),
        ("rseq", SYS_rseq),
        ("futex", SYS_futex),
        ("sched_getaffinity", SYS_sched_getaffinity),
        ("gettid", SYS_gettid),
        ("getpid", SYS_getpid),
        ("sigaltstack", SYS_sigaltstack),
        ("prctl", SYS_prctl), // PR_SET_NAME only; see `filter`
        ("exit", SYS_exit),
        ("exit_group", SYS_exit_group),
        // Signals (SIGTERM, SIGINT: the signal thread).
        ("rt_sigreturn", SYS_rt_sigreturn),
        ("rt_sigprocmask", SYS_rt_sigprocmask),
        ("rt_sigaction", SYS_rt_sigaction),
        ("tgkill", SYS_tgkill), // this process only; see `filter`
        // Time and randomness; sleeping (the events queue's flush at exit).
        ("clock_gettime", SYS_clock_gettime),
        ("clock_nanosleep", SYS_clock_nanosleep),
        ("nanosleep", SYS_nanosleep),
        ("sched_yield", SYS_sched_yield),
        ("getrandom", SYS_getrandom),
    ]
};

/// No list for other architectures yet: the filter is not installed there.
#[cfg(not(target_arch = "x86_64"))]
pub const SYSCALLS: &[(&str, i64)] = &[];

/// The seccomp program: [`SYSCALLS`] allowed (`prctl` only as `PR_SET_NAME`), anything else
/// refused as `violation` says. `None` where there is no list.
pub fn filter(violation: Violation) -> Result<Option<seccompiler::BpfProgram>, SandboxError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    if SYSCALLS.is_empty() {
        return Ok(None);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in SYSCALLS {
        rules.insert(nr, Vec::new());
    }
    // Threads name themselves with prctl(PR_SET_NAME); no other prctl (PR_SET_DUMPABLE,
    // PR_SET_SECCOMP, ...) is needed.
    rules.insert(
        nix::libc::SYS_prctl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            nix::libc::PR_SET_NAME as u64,
        )?])?],
    );
    // abort() (a double panic, an allocation failure) signals itself with tgkill; no other
    // process may be signalled.
    rules.insert(
        nix::libc::SYS_tgkill,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            std::process::id() as u64,
        )?])?],
    );
    let refuse = match violation {
        Violation::Errno => SeccompAction::Errno(nix::libc::EPERM as u32),
        Violation::Kill => SeccompAction::KillProcess,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(rules, refuse, SeccompAction::Allow, arch)?;
    Ok(Some(filter.try_into()?))
}

/// TEST HOOK (`CRASHMON_SANDBOX_SELF_TEST=PATH`, read only when the sandbox is on): once
/// sandboxed, tries what the sandbox must refuse and logs each result, so that an end-to-end
/// test can read them in the device model's log. It tries to create `PATH` (outside the output
/// folder: Landlock must refuse it) and to open an IPv4 socket (not in the seccomp list).
pub fn self_test(path: &Path) {
    let create = std::fs::OpenOptions::new().write(true).create_new(true).open(path);
    match create {
        Ok(_) => warn!("sandbox self-test: created {}: ALLOWED", path.display()),
        Err(e) => warn!(
            "sandbox self-test: create {}: refused: errno {} ({e})",
            path.display(),
            e.raw_os_error().unwrap_or(0)
        ),
    }
    // SAFETY: socket(2) takes no pointers; a descriptor it returns is closed at once.
    let fd = unsafe { nix::libc::socket(nix::libc::AF_INET, nix::libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket(2) and is not used elsewhere.
        unsafe { nix::libc::close(fd) };
        warn!("sandbox self-test: socket(AF_INET): ALLOWED");
    } else {
        let e = nix::Error::last();
        warn!("sandbox self-test: socket(AF_INET): refused: errno {} ({e})", e as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child and returns how the child ended. The child calls nothing
    /// but raw syscalls after the fork (the test process has threads).
    fn in_child(body: impl FnOnce() -> i32) -> nix::sys::wait::WaitStatus {
        use nix::unistd::{fork, ForkResult};
        // SAFETY: the child runs `body`, which only makes raw syscalls (prctl, seccomp, socket)
        // on data prepared before the fork, then `_exit`s; it never returns into the test
        // harness, allocates or takes locks.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = body();
                // SAFETY: _exit ends the child without running the parent's atexit handlers.
                unsafe { nix::libc::_exit(code) }
            }
            ForkResult::Parent { child } => nix::sys::wait::waitpid(child, None).unwrap(),
        }
    }

    fn install(program: &seccompiler::BpfProgram) -> bool {
        // SAFETY: see `set_no_new_privs`.
        let nnp = unsafe { nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
        nnp && seccompiler::apply_filter(program).is_ok()
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe { nix::libc::socket(nix::libc::AF_INET, nix::libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            0
        } else {
            nix::Error::last() as i32
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_syscall_outside_the_list_gets_eperm() {
        let program = filter(Violation::Errno).unwrap().unwrap();
        let status = in_child(|| if install(&program) { inet_socket() } else { 100 });
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(status.pid().unwrap(), nix::libc::EPERM),
            "socket(AF_INET) must fail with EPERM under the filter"
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_syscall_outside_the_list_kills_with_violation_kill() {
        let program = filter(Violation::Kill).unwrap().unwrap();
        let status = in_child(|| if install(&program) { inet_socket() } else { 100 });
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn listed_syscalls_still_work_and_prctl_is_only_set_name() {
        let program = filter(Violation::Errno).unwrap().unwrap();
        let status = in_child(|| {
            if !install(&program) {
                return 100;
            }
            // SAFETY: getpid and prctl take no pointers here (PR_SET_NAME takes one: a
            // NUL-terminated static string).
            unsafe {
                if nix::libc::getpid() <= 0 {
                    return 101;
                }
                if nix::libc::prctl(nix::libc::PR_SET_NAME, c"sbx".as_ptr(), 0, 0, 0) != 0 {
                    return 102;
                }
                if nix::libc::prctl(nix::libc::PR_SET_DUMPABLE, 1, 0, 0, 0) == 0 {
                    return 103;
                }
            }
            0
        });
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(status.pid().unwrap(), 0));
    }

    #[test]
    fn violation_parses() {
        assert_eq!("kill".parse::<Violation>(), Ok(Violation::Kill));
        assert_eq!("errno".parse::<Violation>(), Ok(Violation::Errno));
        assert!("x".parse::<Violation>().is_err());
    }
}
