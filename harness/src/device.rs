//! The device-model process, `crashmon-device`, which serves the card to QEMU over vfio-user:
//! finding (or building) its binary, starting it and waiting until its socket is there,
//! stopping it.

use log::info;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::binary::BinaryError;
use crate::process::{ProcessError, Supervised};

/// Environment variable naming the `crashmon-device` binary to use.
pub const DEVICE_ENV: &str = "CRASHMON_DEVICE";
/// The device model's executable name.
pub const DEVICE_BIN: &str = "crashmon-device";

/// What went wrong with the device-model process.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// `$CRASHMON_DEVICE` names something that is not there, or building it failed.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// The process could not be started.
    #[error("cannot start {binary}")]
    Spawn { binary: PathBuf, source: io::Error },
    /// It exited before it was ready.
    #[error("the device model exited ({status}) before creating its socket {socket}; last lines of its log {log}:\n{tail}")]
    ExitedEarly { status: ExitStatus, socket: PathBuf, log: PathBuf, tail: String },
    /// It did not become ready in time.
    #[error("the device model did not create its socket {socket} within {timeout:?}; last lines of its log {log}:\n{tail}")]
    NoSocket { socket: PathBuf, timeout: Duration, log: PathBuf, tail: String },
    /// It did not exit in time.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Another I/O error.
    #[error("{context}")]
    Io { context: String, source: io::Error },
}

/// The `crashmon-device` binary to run: `$CRASHMON_DEVICE`, else as [`crate::binary`] finds
/// this workspace's binaries.
pub fn locate_binary() -> Result<PathBuf, DeviceError> {
    Ok(crate::binary::locate(DEVICE_BIN, DEVICE_ENV)?)
}

/// How to run one device model.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The `crashmon-device` binary.
    pub binary: PathBuf,
    /// The vfio-user socket to create; must not exist yet.
    pub socket: PathBuf,
    /// Where dumps and their sidecars go.
    pub output_dir: PathBuf,
    /// The VM's name, used in dump file names.
    pub vm_name: String,
    /// `--max-dump-size`, e.g. "4GiB"; the device model's default if `None`.
    pub max_dump_size: Option<String>,
    /// `--once`: exit when the first VM disconnects.
    pub once: bool,
    /// File that receives the process's standard error (its log).
    pub log: PathBuf,
    /// `--user`: the unprivileged user the device model drops to once set up.
    pub user: Option<String>,
    /// Extra arguments, after the others (e.g. `--no-sandbox`).
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. the sandbox's test hook).
    pub env: Vec<(String, String)>,
}

impl DeviceConfig {
    /// The device model's command line.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--output-dir")
            .arg(&self.output_dir)
            .arg("--vm-name")
            .arg(&self.vm_name);
        if let Some(size) = &self.max_dump_size {
            cmd.arg("--max-dump-size").arg(size);
        }
        if self.once {
            cmd.arg("--once");
        }
        if let Some(user) = &self.user {
            cmd.arg("--user").arg(user);
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// What messages call the device model's process.
const WHAT: &str = "the device model";

/// A running device model. Dropping it kills the process if it is still running.
pub struct DeviceProcess {
    process: Supervised,
    socket: PathBuf,
}

impl DeviceProcess {
    /// Starts the device model and waits up to `timeout` for its socket to appear.
    pub fn spawn(config: &DeviceConfig, timeout: Duration) -> Result<Self, DeviceError> {
        let log = File::create(&config.log).map_err(|source| DeviceError::Io {
            context: format!("cannot create {}", config.log.display()),
            source,
        })?;
        let mut cmd = config.command();
        info!("starting the device model: {}", crate::command_line(&cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| DeviceError::Spawn { binary: config.binary.clone(), source })?;
        let mut device = DeviceProcess {
            process: Supervised::new(child, WHAT, config.log.clone()),
            socket: config.socket.clone(),
        };
        device.wait_for_socket(timeout)?;
        Ok(device)
    }

    fn wait_for_socket(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(DeviceError::ExitedEarly {
                    status,
                    socket: self.socket.clone(),
                    log: self.log_path().to_owned(),
                    tail: self.log_tail(),
                });
            }
            if self.socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DeviceError::NoSocket {
                    socket: self.socket.clone(),
                    timeout,
                    log: self.log_path().to_owned(),
                    tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vfio-user socket the device model listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The file holding the process's log.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, DeviceError> {
        Ok(self.process.try_wait()?)
    }

    /// Waits up to `timeout` for the process to exit by itself (as it does with `--once`).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, DeviceError> {
        Ok(self.process.wait_timeout(timeout)?)
    }

    /// Asks the process to stop (SIGTERM: it keeps any open dump and removes its socket) and
    /// waits up to `timeout`; kills it if it does not stop in time.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, DeviceError> {
        let result = self.process.terminate(timeout);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.socket);
        }
        Ok(result?)
    }

    /// Kills the process (if it is still running), reaps it and removes its stale socket.
    pub fn kill(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            self.process.kill();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_follows_the_device_model_contract() {
        let config = DeviceConfig {
            binary: "/bin/crashmon-device".into(),
            socket: "/run/x.sock".into(),
            output_dir: "/dumps".into(),
            vm_name: "vm1".into(),
            max_dump_size: Some("4GiB".into()),
            once: true,
            log: "/dev/null".into(),
            user: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        let cmd = config.command();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--socket",
                "/run/x.sock",
                "--output-dir",
                "/dumps",
                "--vm-name",
                "vm1",
                "--max-dump-size",
                "4GiB",
                "--once"
            ]
        );
    }

    #[test]
    fn a_process_that_dies_before_its_socket_appears_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-device");
        std::fs::write(&script, "#!/bin/sh\necho 'fake: cannot listen' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = DeviceConfig {
            binary: script,
            socket: dir.path().join("s"),
            output_dir: dir.path().join("out"),
            vm_name: "t".into(),
            max_dump_size: None,
            once: true,
            log: dir.path().join("device.log"),
            user: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        match DeviceProcess::spawn(&config, Duration::from_secs(10)) {
            Err(DeviceError::ExitedEarly { status, tail, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(tail, "fake: cannot listen");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a dead device model was taken for a ready one"),
        }
    }
}
