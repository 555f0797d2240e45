//! A child process the harness started and answers for: its log, its exit status once known,
//! bounded waits, SIGTERM then SIGKILL, and a kill when it is dropped so that no test leaves a
//! process behind. QEMU ([`crate::vm::Vm`]), the device model
//! ([`crate::device::DeviceProcess`]) and the slow filesystem ([`crate::slowfs::SlowFs`]) are
//! each one of these plus what is theirs (a QMP socket, a vfio-user socket, a mount).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How many of the log's last lines an error message carries.
pub const LOG_TAIL_LINES: usize = 20;
/// How often a bounded wait looks at the process.
const POLL: Duration = Duration::from_millis(20);

/// What went wrong supervising a process.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// `waitpid` itself failed.
    #[error("cannot check on {what} (pid {pid})")]
    Check {
        what: &'static str,
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// The process did not exit in time.
    #[error("{what} (pid {pid}) did not exit within {timeout:?}")]
    StillRunning { what: &'static str, pid: u32, timeout: Duration },
}

/// A started child process and the file its output goes to.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    /// What it is, for messages ("QEMU", "the device model").
    what: &'static str,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Supervised {
    /// Takes charge of `child`, whose output goes to `log`.
    pub fn new(child: Child, what: &'static str, log: PathBuf) -> Self {
        Supervised { child, what, log, exit: None }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file holding the process's output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the process's output, for error messages.
    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// The exit status if the process has exited (reaped once, remembered after).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|source| ProcessError::Check {
                what: self.what,
                pid: self.child.id(),
                source,
            })?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit by itself: `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; still running is an error.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        self.wait_exit(timeout)?.ok_or(ProcessError::StillRunning {
            what: self.what,
            pid: self.pid(),
            timeout,
        })
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout`; kills it if it does not
    /// stop in time, and then says so with [`ProcessError::StillRunning`].
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        let result = self.wait_timeout(timeout);
        if result.is_err() {
            self.kill();
        }
        result
    }

    /// Kills the process (SIGKILL) if it is still running, and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn start(script: &str) -> (Supervised, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (Supervised::new(child, "the test shell", log), dir)
    }

    #[test]
    fn an_exited_process_is_reaped_once_and_its_log_is_kept() {
        let (mut p, _dir) = start("echo one; echo two; exit 3");
        let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(p.try_wait().unwrap(), Some(status), "remembered after reaping");
        assert_eq!(p.log_tail(), "one\ntwo");
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_and_reported() {
        let (mut p, _dir) = start("trap '' TERM; echo ready; while :; do sleep 0.1; done");
        while p.log_tail().is_empty() {
            std::thread::sleep(POLL);
        }
        assert_eq!(p.wait_exit(Duration::from_millis(50)).unwrap(), None);
        let err = p.terminate(Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ProcessError::StillRunning { what: "the test shell", .. }));
        assert!(err.to_string().starts_with("the test shell (pid "), "{err}");
        assert!(p.try_wait().unwrap().is_some(), "killed and reaped");
    }

    #[test]
    fn dropping_kills() {
        // `exec`: the shell becomes the sleep, so the kill leaves no orphan behind.
        let (p, _dir) = start("exec sleep 600");
        let pid = Pid::from_raw(p.pid() as i32);
        drop(p);
        // Reaped: the pid no longer names our child.
        assert!(nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_err());
    }
}
