//! This workspace's own executables (the device model, the slow filesystem, the dump tool) as
//! the harness finds them, by one rule:
//!
//! 1. the path in the binary's environment variable (`CRASHMON_DEVICE`...), which must exist;
//! 2. under cargo (`cargo test`, `cargo run`), a release build made now so that it is never
//!    stale (a quick no-op when it is up to date), once per process;
//! 3. the one next to the running executable (`target/<profile>/`, also seen from
//!    `target/<profile>/deps/`);
//! 4. a fresh release build.
//!
//! Builds run `cargo build --release --workspace --bin NAME`: `--workspace` so that dependency
//! features are unified as in `cargo build --workspace` and `cargo test --workspace`
//! (`-p PACKAGE` would resolve features for that package alone and put a second variant of the
//! binary in place). The executable is the one cargo's JSON messages report.

use cargo_metadata::Message;
use log::{debug, info};
use std::collections::BTreeMap;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use thiserror::Error;

/// Why a binary could not be found or built.
#[derive(Debug, Error)]
pub enum BinaryError {
    /// The environment variable names a file that is not there.
    #[error("{env}={} does not exist", path.display())]
    EnvMissing { env: &'static str, path: PathBuf },
    /// cargo itself could not be started.
    #[error("cannot build {bin}: cannot run {}", cargo.display())]
    Spawn {
        bin: &'static str,
        cargo: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or waiting for cargo failed.
    #[error("cannot build {bin}: reading cargo's output")]
    Read {
        bin: &'static str,
        #[source]
        source: io::Error,
    },
    /// The build failed (cargo printed why).
    #[error("cannot build {bin} (`cargo build --release --workspace --bin {bin}`): cargo exited with {status}")]
    Failed { bin: &'static str, status: ExitStatus },
    /// The build succeeded without naming the executable.
    #[error("cargo reported no {bin} executable")]
    NoExecutable { bin: &'static str },
}

/// The executable `bin`, found by the rule above; `env` is its environment variable.
pub fn locate(bin: &'static str, env: &'static str) -> Result<PathBuf, BinaryError> {
    if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(BinaryError::EnvMissing { env, path }) };
    }
    if std::env::var_os("CARGO").is_some() {
        // Built once per process: a test binary asks for the same executable many times.
        static BUILT: Mutex<BTreeMap<&str, PathBuf>> = Mutex::new(BTreeMap::new());
        let mut built = BUILT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(path) = built.get(bin) {
            return Ok(path.clone());
        }
        info!("running under cargo: making sure {bin} is built and up to date");
        let path = build_release(bin)?;
        built.insert(bin, path.clone());
        return Ok(path);
    }
    if let Some(path) = sibling(bin) {
        debug!("using the {bin} next to this executable: {}", path.display());
        return Ok(path);
    }
    info!("no {bin} next to this executable: building it");
    build_release(bin)
}

fn sibling(bin: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(bin), dir.parent()?.join(bin)].into_iter().find(|p| p.is_file())
}

/// `cargo build --release --workspace --bin BIN` in this workspace; the executable cargo reports.
pub fn build_release(bin: &'static str) -> Result<PathBuf, BinaryError> {
    let cargo = PathBuf::from(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let mut child = Command::new(&cargo)
        .args(["build", "--release", "--message-format=json-render-diagnostics"])
        .args(["--workspace", "--bin", bin])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| BinaryError::Spawn { bin, cargo: cargo.clone(), source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut executable = None;
    for message in Message::parse_stream(BufReader::new(stdout)) {
        let message = message.map_err(|source| BinaryError::Read { bin, source })?;
        if let Message::CompilerArtifact(artifact) = message {
            if artifact.target.name == bin {
                executable = artifact.executable.map(|p| p.into_std_path_buf()).or(executable);
            }
        }
    }
    let status = child.wait().map_err(|source| BinaryError::Read { bin, source })?;
    if !status.success() {
        return Err(BinaryError::Failed { bin, status });
    }
    executable.ok_or(BinaryError::NoExecutable { bin })
}
