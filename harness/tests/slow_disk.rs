//! End to end on a slow disk: the output folder is a real FUSE filesystem (`crashmon-slowfs`)
//! whose fsyncs take 30 s, or whose writes are throttled to a few MiB/s. QEMU drops a vfio-user
//! card that takes more than 5 s to answer any message; the card must answer from memory while
//! the host's disk crawls, so every dump completes and verifies as on a fast disk, and QEMU keeps
//! the card for the next crash.
//!
//! The longest time the device model took to answer a message is printed (and is in each
//! sidecar); it is a figure to read, not an assertion.

use anyhow::{ensure, Result};
use crashmon_harness::scenario::{self, Outcome, Rig, Running, Scenario};
use crashmon_harness::slowfs::{SlowFs, SlowFsOptions, Stats};
use std::time::Duration;

fn rig() -> &'static Rig {
    Rig::shared()
}

/// Runs `scenario` (64 MiB guest) with its dumps on a slow filesystem; returns the outcome and
/// what the filesystem did.
fn run_on_slow_disk(mut scenario: Scenario, options: SlowFsOptions) -> Result<(Outcome, Stats)> {
    let dir = tempfile::Builder::new().prefix(&format!("crashmon-{}-", scenario.name)).tempdir()?;
    std::fs::create_dir(dir.path().join("backing"))?;
    let fs = SlowFs::mount(&dir.path().join("backing"), &dir.path().join("mnt"), &options)?;
    scenario.memory_mb = 64;
    // Each dump's close waits for several 30 s syncs: the file, the folder, the sidecar.
    scenario.dump_timeout = Duration::from_secs(600);
    let run_dir = dir.path().join("run");
    let dumps = fs.mountpoint().join("dumps");
    let running = Running::start_with_dumps_in(rig(), &scenario, &run_dir, &dumps)?;
    let outcome = scenario::complete(running, &scenario)?;
    let stats = fs.stats()?;
    for d in &outcome.dumps {
        println!("{}", d.report());
        println!(
            "longest answer to a vfio-user message during the session: {} us",
            d.sidecar.longest_answer_us.unwrap_or(0)
        );
    }
    println!("slow filesystem: {stats:?}");
    Ok((outcome, stats))
}

#[test]
fn fsync_taking_30_seconds_loses_nothing_and_qemu_keeps_the_card() -> Result<()> {
    let mut s = Scenario::new("slow-fsync");
    s.bitmap = true;
    s.reboots = 1; // a second crash after the guest reboots: the card must still be there
    let options =
        SlowFsOptions { fsync_delay: Duration::from_secs(30), ..SlowFsOptions::default() };
    let (outcome, stats) = run_on_slow_disk(s, options)?;
    ensure!(outcome.dumps.len() == 2, "{} dumps", outcome.dumps.len());
    // Each dump was fsync'd, and each fsync really waited 30 s.
    ensure!(stats.delayed_fsyncs >= 4, "{stats:?}");
    ensure!(stats.fsync_delay_ns >= 4 * 30_000_000_000, "{stats:?}");
    for d in &outcome.dumps {
        ensure!(d.sidecar.longest_answer_us.is_some(), "{:?}", d.sidecar);
    }
    Ok(())
}

#[test]
fn writes_throttled_to_4_mib_per_second_slow_the_dump_but_lose_nothing() -> Result<()> {
    let s = Scenario::new("slow-writes");
    let options = SlowFsOptions {
        write_bytes_per_sec: Some(4 << 20),
        fsync_delay: Duration::from_secs(2),
        ..SlowFsOptions::default()
    };
    let (outcome, stats) = run_on_slow_disk(s, options)?;
    let d = &outcome.dumps[0];
    ensure!(stats.delayed_writes > 0, "{stats:?}");
    // Zero pages are left out as holes: the dump's other bytes went through the throttled
    // filesystem (within a chunk: the kernel's page cache may merge writes before FUSE sees
    // them, and the count includes the sidecars). The dump's content is checked above.
    let written = d.verified.dump_bytes - d.sidecar.zero_bytes_skipped;
    ensure!(stats.bytes_written + (1 << 20) >= written, "{stats:?} for {written} bytes to write");
    // At 4 MiB/s those bytes (nearly 64 MiB) cannot take less than their time at that rate,
    // less a second: the guest did wait for the disk.
    let floor = written as f64 / (4 << 20) as f64 - 1.0;
    ensure!(floor > 10.0 && d.seconds >= floor, "{} s for {written} bytes", d.seconds);
    Ok(())
}
