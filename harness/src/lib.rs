//! crashmon's harness: everything needed to run the crash-monitor card inside a real QEMU.
//!
//! * [`qemu`]: find a QEMU that has `vfio-user-pci`, or provision one into a cache folder;
//! * [`device`]: run the `crashmon-device` process that serves the card;
//! * [`vm`]: launch QEMU with the card attached, from the argument files in `qemu-config/`;
//! * [`qmp`]: drive and inspect the running VM over QMP;
//! * [`pci`]: find the card in QEMU's view of the PCI bus;
//! * [`guest`], [`serial`]: build the test guest and read its serial log;
//! * [`progress`]: show a dump streaming to the host (the demo's progress bar);
//! * [`scenario`]: one crash end to end, checked;
//! * [`bench`]: crashmon against QEMU's `dump-guest-memory`, in the same run;
//! * [`verify`]: check a dump with kdmp-parser and against QEMU's own image of guest RAM.
//!
//! The binary `crashmon-harness` puts these together (`provision-qemu`, `demo`, `qemu-line`);
//! the integration tests use them directly.

pub mod bench;
pub mod binary;
pub mod device;
pub mod guest;
pub mod pci;
pub mod process;
pub mod progress;
pub mod qemu;
pub mod qmp;
pub mod scenario;
pub mod serial;
pub mod slowfs;
pub mod verify;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Quotes `arg` for a POSIX shell if it needs it. Words made only of characters a shell takes
/// literally stay bare, so that QEMU's `key=value,...` options read as users write them (shlex
/// alone quotes every `,` and `=`); anything else is quoted by shlex. No shell word holds a NUL
/// (nor does any argument of a process): one that does is shown Rust-escaped instead.
pub fn shell_quote(arg: &str) -> String {
    let literal = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(literal) {
        return arg.to_owned();
    }
    match shlex::try_quote(arg) {
        Ok(quoted) => quoted.into_owned(),
        Err(_) => format!("{arg:?}"),
    }
}

/// A command as a shell line (environment settings first), for logs and messages.
pub fn command_line(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        Some(format!("{}={}", key.to_string_lossy(), shell_quote(&value?.to_string_lossy())))
    });
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| shell_quote(&w.to_string_lossy()));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("plain/path-1.sock"), "plain/path-1.sock");
        let option = "vfio-user-pci,socket=/run/crashmon/vm1.sock,x-msg-timeout=5000";
        assert_eq!(shell_quote(option), option);
        assert_eq!(shlex::split(option), Some(vec![option.to_owned()]));
        // Whatever the quoting, a shell reads back the very word.
        for word in ["it's", "", "two words", "{\"k\":1}", "$HOME", "a\\b", "tab\there"] {
            let quoted = shell_quote(word);
            assert_eq!(shlex::split(&quoted), Some(vec![word.to_owned()]), "{word:?} as {quoted}");
            assert_ne!(quoted, word, "{word:?} needs quoting");
        }
        let mut cmd = Command::new("/bin/q");
        cmd.env("A", "1 2").args(["-x", "{\"k\":1}"]);
        let line = command_line(&cmd);
        assert_eq!(shlex::split(&line).unwrap(), ["A=1 2", "/bin/q", "-x", "{\"k\":1}"], "{line}");
    }
}
