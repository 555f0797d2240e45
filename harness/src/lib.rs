//! crashmon's harness: everything needed to run the crash-monitor card inside a real QEMU.
//!
//! * [`qemu`]: find a QEMU that has `vfio-user-pci`, or provision one into a cache folder;
//! * [`qmp`]: drive and inspect the running VM over QMP;
//! * [`pci`]: find the card in QEMU's view of the PCI bus.

pub mod pci;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};

/// Environment variable that moves the cache folder away from `<workspace>/.cache`.
pub const CACHE_DIR_ENV: &str = "CRASHMON_CACHE_DIR";

/// The root of the crashmon workspace this harness was built from.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the harness crate is inside the workspace")
}

/// The cache folder for provisioned tools: `$CRASHMON_CACHE_DIR`, or `<workspace>/.cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_DIR_ENV) {
        // Absolute, because provisioning hands it to debootstrap and chroot.
        Some(dir) if !dir.is_empty() => std::path::absolute(&dir).unwrap_or_else(|_| dir.into()),
        _ => workspace_root().join(".cache"),
    }
}

/// The last `lines` lines of a log file, for error messages; empty if it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
