//! The test guest kernel (`harness/guest/`): building it.
//!
//! It is its own Cargo workspace with its own target settings in `.cargo/config.toml`, which
//! Cargo reads from the current directory, so it is built from inside its folder.

use std::path::PathBuf;
use std::process::Command;
use thiserror::Error;

/// Building the guest failed.
#[derive(Debug, Error)]
pub enum GuestError {
    /// cargo could not be run.
    #[error("cannot run cargo to build the test guest: {0}")]
    Spawn(#[source] std::io::Error),
    /// cargo failed.
    #[error("building the test guest failed ({0}); run `cd harness/guest && cargo build --release` to see why")]
    Build(std::process::ExitStatus),
}

/// The guest's folder.
pub fn source_dir() -> PathBuf {
    crate::workspace_root().join("harness/guest")
}

/// Builds the guest (release) and returns the kernel ELF to give QEMU's `-kernel`.
pub fn build() -> Result<PathBuf, GuestError> {
    let dir = source_dir();
    log::info!("building the test guest: cd {} && cargo build --release", dir.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(&dir)
        // The root workspace's settings must not leak into the guest's build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(GuestError::Spawn)?;
    if !status.success() {
        return Err(GuestError::Build(status));
    }
    Ok(dir.join("target/x86_64-unknown-linux-gnu/release/crashmon-guest"))
}
