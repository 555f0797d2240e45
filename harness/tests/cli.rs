//! `crashmon-harness` as people run it: the demo, run twice in one output folder, and bad
//! command-line input.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_crashmon-harness");

fn harness(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn fails_in_one_line(args: &[&str], needle: &str) {
    let out = harness(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(out.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("crashmon-harness: "), "{err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn qemu_line_refuses_nonsense_memory_sizes() {
    let sock = ["qemu-line", "--socket", "/run/crashmon/myvm.sock"];
    for (size, needle) in [
        ("0", "not in 16..="),
        ("15", "not in 16..="),
        ("4194305", "not in 16..="),
        ("-5", "--memory-mb"),
        ("lots", "invalid digit"),
        ("99999999999", "--memory-mb"),
    ] {
        let flag = format!("--memory-mb={size}");
        let mut args = sock.to_vec();
        args.push(&flag);
        fails_in_one_line(&args, needle);
    }
    let out = harness(&[&sock[..], &["--memory-mb", "4096"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-m 4096") && text.contains("size=4096M"), "{text}");
    fails_in_one_line(&["no-such-command"], "no-such-command");
}

fn dumps_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".dmp"))
        .collect();
    names.sort();
    names
}

/// README: each `./crashmon demo` adds one dump to `crashmon-out/dumps`. The second run must
/// check its own dump, not count the first run's.
#[test]
fn the_demo_runs_twice_in_one_output_folder() {
    let out = tempfile::Builder::new().prefix("crashmon-demo-twice-").tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let mut before: Vec<String> = Vec::new();
    for (run, memory) in [(1, "16"), (2, "32")] {
        let result = harness(&["demo", "--out", out_dir, "--memory-mb", memory]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "demo run {run} failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("The dump is on the host and verified"), "run {run}: {stdout}");
        // The progress, on stderr (plain lines: stderr is not a terminal here).
        assert!(stderr.contains(": complete, "), "run {run} showed no progress: {stderr}");
        let dumps = dumps_in(&out.path().join("dumps"));
        assert_eq!(dumps.len(), run, "after run {run}: {dumps:?}");
        // The run's report names its own dump: the one this run added. (Not the greatest
        // name: two runs within one second differ only by their session UUIDs.)
        let added: Vec<&String> = dumps.iter().filter(|d| !before.contains(d)).collect();
        assert_eq!(added.len(), 1, "run {run} added {added:?}");
        assert!(stdout.contains(added[0].as_str()), "run {run} reported another dump: {stdout}");
        before = dumps;
    }
}
