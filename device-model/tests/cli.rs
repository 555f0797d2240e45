//! Bad command-line input gets one clear line on stderr and a non-zero exit.

mod common;

use common::run_cli;

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
        "cannot create output dir",
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
