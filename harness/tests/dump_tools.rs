//! `crashmon-dump` on a dump from a real crash: the test guest bug checks in QEMU, the real
//! `crashmon-device` captures its dump (checked by the harness as in crash_end_to_end.rs), and
//! then the operator's tool lists, inspects, verifies it and extracts the driver's secondary data
//! block from it.

use anyhow::{bail, ensure, Context, Result};
use crashmon_harness::scenario::{self, Rig, Scenario, DRIVER_GUID};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The driver's block as `extract --tag` takes it.
const DRIVER_TAG: &str = "{C4A50D01-6372-4D53-9D6D-6F6E64727631}";
const TOOL_BIN: &str = "crashmon-dump";

/// `$CRASHMON_DUMP`, else as the harness finds this workspace's binaries.
fn tool_binary() -> Result<PathBuf> {
    Ok(crashmon_harness::binary::locate(TOOL_BIN, "CRASHMON_DUMP")?)
}

fn run(tool: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(tool).args(args).output()?;
    println!("$ crashmon-dump {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

fn ok(tool: &Path, args: &[&str]) -> Result<String> {
    let out = run(tool, args)?;
    if !out.status.success() {
        bail!("crashmon-dump {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn list_inspect_verify_and_extract_a_real_crash_dump() -> Result<()> {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(true)
        .try_init();
    let tool = tool_binary()?;
    let rig = Rig::prepare()?;
    let dir = tempfile::Builder::new().prefix("crashmon-tools-").tempdir()?;
    let mut s = Scenario::new("tools");
    s.memory_mb = 64;
    let outcome = scenario::run(&rig, &s, dir.path())?;
    let d = &outcome.dumps[0];
    println!("{}", d.report());
    let dump = d.path.to_str().context("UTF-8 path")?;
    let dumps_dir = d.path.parent().context("dump folder")?.to_str().context("UTF-8")?;
    let file_name = d.path.file_name().context("name")?.to_str().context("UTF-8")?;

    let list = ok(&tool, &["list", dumps_dir])?;
    let lines: Vec<&str> = list.lines().collect();
    ensure!(lines.len() == 1, "one dump: {list}");
    for want in ["tools ", "0xDEAD0001 (unknown bug check)", " complete ", file_name] {
        ensure!(lines[0].contains(want), "{want:?} in {list}");
    }
    let v: Value = serde_json::from_str(ok(&tool, &["list", "--json", dumps_dir])?.trim())?;
    ensure!(v["vm"] == "tools" && v["state"] == "complete" && v["size"] == d.verified.dump_bytes);

    let text = ok(&tool, &["inspect", dump])?;
    for want in [
        "PAGEDU64",
        "1 (Full)",
        "0xDEAD0001 (unknown bug check)",
        "{c4a50d01-6372-4d53-9d6d-6f6e64727631}  64 bytes",
    ] {
        ensure!(text.contains(want), "{want:?} in\n{text}");
    }
    let v: Value = serde_json::from_str(&ok(&tool, &["inspect", "--json", dump])?)?;
    let h = &v["header"];
    ensure!(h["bugcheck"]["code"] == "0xDEAD0001", "{h}");
    let params: Vec<String> = d.bugcheck.1.iter().map(|p| format!("{p:#018x}")).collect();
    ensure!(h["bugcheck"]["parameters"] == serde_json::json!(params), "{h}");
    ensure!(h["required_dump_space"] == d.verified.dump_bytes, "{h}");
    ensure!(v["physical_memory"]["pages"] == d.verified.pages, "{}", v["physical_memory"]);
    ensure!(v["sidecar"]["session_id"] == d.sidecar.session_id.to_string());

    let out = run(&tool, &["verify", dump])?;
    ensure!(out.status.code() == Some(0), "verify failed");
    let verdict = String::from_utf8(out.stdout)?;
    ensure!(verdict.lines().count() == 7 && verdict.lines().all(|l| l.starts_with("ok ")));

    let block = dir.path().join("driver-block.bin");
    let block_path = block.to_str().context("UTF-8")?;
    ok(&tool, &["extract", "--tag", DRIVER_TAG, dump, "-o", block_path])?;
    let bytes = std::fs::read(&block)?;
    let want = crashmon_dump_writer::find_secondary_blob(&std::fs::read(&d.path)?, &DRIVER_GUID)
        .context("the harness finds the driver block")?
        .to_vec();
    ensure!(bytes.len() == 64 && bytes.starts_with(b"CMONDRV\0"), "{bytes:02x?}");
    ensure!(bytes == want, "extract gives the block the harness reads");
    let stdout = Command::new(&tool).args(["extract", "--tag", DRIVER_TAG, dump]).output()?;
    ensure!(stdout.status.success() && stdout.stdout == want, "the same bytes on stdout");
    Ok(())
}
