//! Bad command-line input gets one clear line on stderr and a non-zero exit.

mod common;

use common::{run_cli, Device};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

fn fails_with(args: &[&str], needle: &str) {
    let out = run_cli(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{args:?}: stderr {err:?} lacks {needle:?}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("crashmon-device: "), "{err}");
}

#[test]
fn existing_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("taken");
    std::fs::write(&sock, b"").unwrap();
    let out = dir.path().join("out");
    fails_with(
        &["--socket", sock.to_str().unwrap(), "--output-dir", out.to_str().unwrap()],
        "already exists",
    );
}

#[test]
fn unwritable_output_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    fails_with(
        &["--socket", sock.to_str().unwrap(), "--output-dir", file.join("sub").to_str().unwrap()],
        "output dir",
    );
    fails_with(
        &["--socket", sock.to_str().unwrap(), "--output-dir", file.to_str().unwrap()],
        "is not a folder",
    );
    fails_with(
        &["--socket", sock.to_str().unwrap(), "--output-dir", "/proc/crashmon"],
        "output dir",
    );
    assert!(!sock.exists(), "nothing was left behind");
}

#[test]
fn nonsense_sizes_and_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let base = ["--socket", sock.to_str().unwrap(), "--output-dir", dir.path().to_str().unwrap()];
    for (size, needle) in [
        ("0", "minimum"),
        ("12 parsecs", "unknown unit"),
        ("-5G", "not a size"),
        ("99999999999T", "too large"),
    ] {
        let flag = format!("--max-dump-size={size}");
        let mut args = base.to_vec();
        args.push(&flag);
        fails_with(&args, needle);
    }
    for name in ["../etc", "a/b", "", ".x"] {
        let mut args = base.to_vec();
        args.extend(["--vm-name", name]);
        fails_with(&args, "--vm-name");
    }
    fails_with(&["--output-dir", "/tmp"], "--socket");
}

#[test]
fn a_socket_in_a_missing_folder_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sock = dir.path().join("no-such-folder/card.sock");
    fails_with(
        &["--socket", sock.to_str().unwrap(), "--output-dir", out.to_str().unwrap()],
        "does not exist",
    );
    let err = String::from_utf8_lossy(
        &run_cli(&["--socket", sock.to_str().unwrap(), "--output-dir", out.to_str().unwrap()])
            .stderr,
    )
    .into_owned();
    assert!(!err.contains("os error"), "the cause is said once, in words: {err}");
    assert!(!out.exists(), "the output dir was not created for a command that failed");
}

#[test]
fn usage_errors_name_their_cause_once() {
    let out = run_cli(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("--help").count(), 1, "{err}");
    assert!(!err.contains("error: "), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let base = ["--socket", sock.to_str().unwrap(), "--output-dir", dir.path().to_str().unwrap()];
    for (flag, needle) in [
        ("--file-mode=0644", "nothing beyond 0660"),
        ("--file-mode=0400", "owner read and write"),
        ("--file-mode=rw", "not an octal mode"),
        ("--file-group=no-such-group-here", "no group named"),
        ("--socket-mode=0666", "nothing beyond 0660"),
        ("--socket-mode=0060", "owner read and write"),
        ("--socket-mode=srw", "not an octal mode"),
        ("--socket-group=no-such-group-here", "no group named"),
    ] {
        let mut args = base.to_vec();
        args.push(flag);
        fails_with(&args, needle);
    }
}

#[test]
fn version_names_the_binary() {
    let out = run_cli(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("crashmon-device "), "{text}");
}

#[test]
fn socket_mode_and_group_are_applied_once_bound() {
    // Root may give the socket any group; anyone else, one of their own.
    let gid = if nix::unistd::geteuid().is_root() { 1 } else { nix::unistd::getegid().as_raw() };
    let (mode, group) = ("0660".to_owned(), gid.to_string());
    let device = Device::start(&["--socket-mode", &mode, "--socket-group", &group]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let meta = std::fs::symlink_metadata(&device.socket).unwrap();
        if meta.permissions().mode() & 0o777 == 0o660 && meta.gid() == gid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "socket mode {:o} group {}, wanted 0660 and {gid}:\n{}",
            meta.permissions().mode() & 0o777,
            meta.gid(),
            device.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
