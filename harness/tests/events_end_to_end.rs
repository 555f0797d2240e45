//! Events and hooks from a real crash: a real QEMU, the test guest bug checking, and the real
//! device model started with `--events` and both hooks, as an operator would run it.

use anyhow::{ensure, Context, Result};
use crashmon_harness::scenario::{self, Rig, Running, Scenario};
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn a_real_crash_gives_its_events_and_runs_the_hooks() -> Result<()> {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(true)
        .try_init();
    let rig = Rig::prepare().context("QEMU, the guest and the device model")?;
    let dir = tempfile::Builder::new().prefix("crashmon-events-").tempdir()?;
    let mut s = Scenario::new("events");
    s.memory_mb = 64;
    let (events, crashed, dumped) = (
        dir.path().join("events.jsonl"),
        dir.path().join("crash.txt"),
        dir.path().join("dump.txt"),
    );
    let dumps = dir.path().join("dumps");
    let r = Running::start_with_device(&rig, &s, &dir.path().join("run"), &dumps, |d| {
        d.extra_args.extend([
            "--events".into(),
            events.display().to_string(),
            "--on-crash".into(),
            format!("echo \"$CRASHMON_VM $CRASHMON_BUGCHECK_CODE\" > {}", crashed.display()),
            "--on-dump".into(),
            format!(
                "echo \"$CRASHMON_STATE $CRASHMON_DUMP $CRASHMON_SHA256\" > {}",
                dumped.display()
            ),
        ]);
    })?;
    let outcome = scenario::complete(r, &s)?;
    let d = &outcome.dumps[0];

    let lines: Vec<Value> = std::fs::read_to_string(&events)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let kinds: Vec<&str> = lines.iter().filter_map(|e| e["event"].as_str()).collect();
    ensure!(kinds.first() == Some(&"armed"), "{kinds:?}");
    let crash = lines.iter().find(|e| e["event"] == "bugcheck").context("no bugcheck event")?;
    ensure!(
        crash["code"] == "0xdead0001" && crash["parameters"][2] == "0xfffff80012345678",
        "{crash}"
    );
    ensure!(crash["session"] == d.sidecar.session_id.to_string(), "{crash}");
    let done = lines.iter().find(|e| e["event"] == "complete").context("no complete event")?;
    ensure!(done["dump"] == d.path.display().to_string(), "{done}");
    ensure!(done["sha256"] == d.sidecar.sha256.clone().unwrap_or_default(), "{done}");

    // The hooks run in the hook runner, which may finish after the device model exited.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(crashed.exists() && dumped.exists()) {
        ensure!(Instant::now() < deadline, "the hooks did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(std::fs::read_to_string(&crashed)? == "events 0xdead0001\n");
    let want =
        format!("complete {} {}\n", d.path.display(), d.sidecar.sha256.clone().unwrap_or_default());
    ensure!(std::fs::read_to_string(&dumped)? == want);
    Ok(())
}
