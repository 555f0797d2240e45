//! The device model's sandbox during a real crash: QEMU, the test guest bug checking, the real
//! `crashmon-device` started as root with `--user nobody` (a user every Debian system has).
//! While the dump streams, every thread of the device model must be under its seccomp filter,
//! with no_new_privs, as nobody; what the sandbox must refuse is refused; and the dump still
//! arrives whole and verified.

use anyhow::{ensure, Context, Result};
use crashmon_harness::scenario::{self, Rig, Running, Scenario};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

/// The user the device model drops to.
const USER: &str = "nobody";

/// A field of a `/proc/PID/status` file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or("")
}

/// What every thread of the sandboxed device model must show in its `/proc` status.
struct Sandboxed {
    uid: u32,
    gid: u32,
}

impl Sandboxed {
    /// Checks every thread of process `pid` now; returns their names.
    fn check_threads(&self, pid: u32) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let status = match task.and_then(|t| std::fs::read_to_string(t.path().join("status"))) {
                Ok(s) => s,
                Err(_) => continue, // a thread that just ended
            };
            let name = field(&status, "Name").to_owned();
            ensure!(
                field(&status, "Seccomp") == "2",
                "{name}: not under a seccomp filter:\n{status}"
            );
            ensure!(field(&status, "NoNewPrivs") == "1", "{name}: no no_new_privs:\n{status}");
            let uid = self.uid.to_string();
            let uids: Vec<&str> = field(&status, "Uid").split_whitespace().collect();
            ensure!(uids == [uid.as_str(); 4], "{name}: uids {uids:?}, not {USER}'s");
            let gids: Vec<&str> = field(&status, "Gid").split_whitespace().collect();
            ensure!(gids.iter().all(|g| *g == self.gid.to_string()), "{name}: gids {gids:?}");
            ensure!(field(&status, "CapEff") == "0000000000000000", "{name}: capabilities left");
            names.push(name);
        }
        Ok(names)
    }
}

#[test]
fn the_device_model_is_sandboxed_during_a_real_crash() -> Result<()> {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(true)
        .try_init();
    ensure!(nix::unistd::geteuid().is_root(), "this test starts the device model as root");
    let nobody = nix::unistd::User::from_name(USER)?.context("no user 'nobody'")?;
    let rig = Rig::prepare().context("QEMU, the guest and the device model")?;

    let dir = tempfile::Builder::new().prefix("crashmon-sandbox-").tempdir()?;
    // The run's folder holds the socket and the dumps folder: nobody must be able to reach them.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let forbidden = dir.path().join("written-outside-the-output-dir");
    let mut s = Scenario::new("sandbox");
    s.memory_mb = 64;
    let dumps = dir.path().join("dumps");
    let mut r = Running::start_with_device(&rig, &s, dir.path(), &dumps, |d| {
        d.user = Some(USER.into());
        // TEST HOOK of the device model (sandbox::self_test).
        d.env.push(("CRASHMON_SANDBOX_SELF_TEST".into(), forbidden.display().to_string()));
    })?;
    r.wait_serial("READY", 1, scenario::CRASH_TIMEOUT)?;

    // During the crash: every thread (the message loop, signals, recovery, the session's writer
    // and the hash thread its 1 MiB chunks start). A session of DMA chunks ends a fraction of a
    // second after it starts, so the threads are looked at every millisecond from before the
    // bug check until the guest's DUMP DONE; the writer and the hash thread must be among them.
    let pid = r.card.pid();
    let expected = Sandboxed { uid: nobody.uid.as_raw(), gid: nobody.gid.as_raw() };
    let mut seen = BTreeSet::new();
    let mut looks_with_writer = 0;
    let deadline = Instant::now() + scenario::CRASH_TIMEOUT;
    for round in 0u64.. {
        let names = expected.check_threads(pid)?;
        looks_with_writer += usize::from(names.iter().any(|n| n.starts_with("writer-")));
        seen.extend(names);
        if round % 50 == 0 {
            let done = r.serial().iter().any(|l| l.kind == "DUMP DONE");
            if done || Instant::now() > deadline {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    ensure!(
        seen.iter().any(|n| n.starts_with("writer-")) && seen.contains("hash"),
        "the session's writer and its hash thread were not both seen among the threads {seen:?}"
    );
    println!("threads seen under the sandbox: {seen:?}; the writer in {looks_with_writer} looks");

    let log_path = r.card.log_path().to_owned();
    let outcome = scenario::complete(r, &s)?;
    ensure!(outcome.dumps.len() == 1, "one dump expected");
    let dump = &outcome.dumps[0];
    ensure!(dump.verified.pages_equal > 10_000, "{:?}", dump.verified);
    ensure!(
        std::fs::metadata(&dump.path)?.uid() == nobody.uid.as_raw(),
        "the dump was not written by {USER}"
    );

    let log = std::fs::read_to_string(&log_path)?;
    ensure!(log.contains(&format!("sandboxed: user {USER}")), "no sandbox line:\n{log}");
    if log.contains("Landlock not available") {
        // Best effort on a kernel without Landlock: the log says so, and nothing else can be
        // checked about files here.
        println!("this kernel has no Landlock: the write outside the output folder is unchecked");
    } else {
        ensure!(log.contains("Landlock fully enforced"), "Landlock only partly here:\n{log}");
        ensure!(
            log.contains(&format!("create {}: refused: errno 13", forbidden.display())),
            "a write outside the output folder was not refused with EACCES:\n{log}"
        );
        ensure!(!forbidden.exists(), "the file outside the output folder exists");
    }
    ensure!(
        log.contains("socket(AF_INET): refused: errno 1"),
        "a syscall outside the allow-list was not refused with EPERM:\n{log}"
    );
    Ok(())
}
