//! The device-model process, `crashmon-device`, which serves the card to QEMU over vfio-user:
//! finding (or building) its binary, starting it and waiting until its socket is there,
//! stopping it.

use log::{debug, info};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

use crate::process::{ProcessError, Supervised};

/// Environment variable naming the `crashmon-device` binary to use.
pub const DEVICE_ENV: &str = "CRASHMON_DEVICE";
/// The device model's executable name.
pub const DEVICE_BIN: &str = "crashmon-device";

/// What went wrong with the device-model process.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// `$CRASHMON_DEVICE` names something that is not there.
    #[error("{DEVICE_ENV}={0} does not exist")]
    EnvMissing(PathBuf),
    /// Building it with cargo failed.
    #[error("cannot build the device model (`cargo build --release --workspace --bin {DEVICE_BIN}`): {0}")]
    Build(String),
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

/// The `crashmon-device` binary to run: `$CRASHMON_DEVICE`; else, when running under cargo
/// (`cargo test`, `cargo run`), a release build made now so that it is never stale (a quick
/// no-op when it is up to date); else the one built next to the running executable
/// (`target/<profile>/`, also seen from `target/<profile>/deps/`); else a fresh release build.
pub fn locate_binary() -> Result<PathBuf, DeviceError> {
    if let Some(path) = std::env::var_os(DEVICE_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(DeviceError::EnvMissing(path)) };
    }
    if std::env::var_os("CARGO").is_some() {
        info!("running under cargo: making sure {DEVICE_BIN} is built and up to date");
        return build_release();
    }
    if let Some(path) = sibling_binary() {
        debug!("using the device model next to this executable: {}", path.display());
        return Ok(path);
    }
    info!("no {DEVICE_BIN} binary next to this executable: building it");
    build_release()
}

fn sibling_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(DEVICE_BIN), dir.parent()?.join(DEVICE_BIN)].into_iter().find(|p| p.is_file())
}

/// Builds the device model in release and returns the path of the binary cargo reports.
///
/// It runs `cargo build --release --workspace --bin crashmon-device`: the binary of
/// `crashmon-device-model`, with dependency features unified across the workspace as in
/// `cargo build --workspace` and `cargo test --workspace`. (`-p crashmon-device-model` would
/// resolve features for that package alone and put a second variant of the binary in place.)
pub fn build_release() -> Result<PathBuf, DeviceError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(["build", "--release", "--message-format=json-render-diagnostics"])
        .args(["--workspace", "--bin", DEVICE_BIN])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            DeviceError::Build(format!("cannot run {}: {e}", Path::new(&cargo).display()))
        })?;
    let mut executable = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| DeviceError::Build(format!("reading cargo's output: {e}")))?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == DEVICE_BIN {
            if let Some(path) = message["executable"].as_str() {
                executable = Some(PathBuf::from(path));
            }
        }
    }
    let status = child.wait().map_err(|e| DeviceError::Build(e.to_string()))?;
    if !status.success() {
        return Err(DeviceError::Build(format!("cargo exited with {status}")));
    }
    executable.ok_or_else(|| DeviceError::Build("cargo reported no executable".into()))
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
