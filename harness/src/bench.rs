//! Benchmark: crashmon against QEMU's own `dump-guest-memory`, in the same run.
//!
//! For each guest RAM size one VM crashes and streams a full dump through the card; crashmon's
//! time is the sidecar's, from the bug check announced on the card to the dump fsync'd and
//! renamed on the host. With that same guest halted, QEMU's host-side `dump-guest-memory`
//! (ELF, no paging) writes the same RAM to the same filesystem and is fsync'd too: that is the
//! anchor, measured on the same machine within seconds of crashmon, so the ratio is what to
//! compare across machines, not the seconds. Every crashmon dump is verified as in the tests.

use crate::qmp::qmp;
use crate::scenario::{self, Rig, Running, Scenario};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Guest RAM in MiB.
    pub memory_mb: u32,
    /// Bytes of the crashmon dump.
    pub dump_bytes: u64,
    /// Median seconds, crashmon.
    pub crashmon_s: f64,
    /// Median seconds, `dump-guest-memory` (ELF).
    pub anchor_s: f64,
    /// Bytes of QEMU's ELF dump.
    pub anchor_bytes: u64,
    /// The device model's peak resident memory (`VmHWM`), KiB, the largest over the runs.
    pub device_peak_rss_kib: u64,
}

/// The peak resident set (`VmHWM`, KiB) of process `pid`.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM line")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times QEMU's `dump-guest-memory` of the halted guest into `file`, fsync included.
fn time_anchor(r: &mut Running, file: &Path) -> Result<(f64, u64)> {
    let start = Instant::now();
    r.qmp
        .execute(&qmp::dump_guest_memory {
            paging: false,
            protocol: format!("file:{}", file.display()),
            detach: Some(false),
            begin: None,
            length: None,
            format: Some(qmp::DumpGuestMemoryFormat::elf),
        })
        .context("QMP dump-guest-memory")?;
    let f = std::fs::File::open(file)?;
    f.sync_all()?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = f.metadata()?.len();
    std::fs::remove_file(file)?;
    Ok((seconds, bytes))
}

/// Runs `repeat` crashes per RAM size in `sizes_mb`, in `work_dir`.
pub fn run(rig: &Rig, sizes_mb: &[u32], repeat: usize, work_dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &memory_mb in sizes_mb {
        let (mut ours, mut anchor) = (Vec::new(), Vec::new());
        let (mut dump_bytes, mut anchor_bytes, mut peak_rss) = (0, 0, 0);
        for i in 0..repeat {
            let mut s = Scenario::new(&format!("bench-{memory_mb}m-{i}"));
            s.memory_mb = memory_mb;
            let dir = work_dir.join(&s.name);
            let r = Running::start(rig, &s, &dir)?;
            let elf = dir.join("qemu-dump.elf");
            let mut measured = (0.0, 0);
            let outcome = scenario::complete_with(r, &s, |r| {
                // The dump is on the host: the device model's peak memory is what it needed.
                peak_rss = peak_rss.max(peak_rss_kib(r.card.pid())?);
                measured = time_anchor(r, &elf)?;
                Ok(())
            })?;
            let d = &outcome.dumps[0];
            log::info!(
                "{memory_mb} MiB: crashmon {:.3} s, dump-guest-memory {:.3} s",
                d.seconds,
                measured.0
            );
            ours.push(d.seconds);
            anchor.push(measured.0);
            dump_bytes = d.verified.dump_bytes;
            anchor_bytes = measured.1;
            std::fs::remove_dir_all(&dir).ok();
        }
        rows.push(Row {
            memory_mb,
            dump_bytes,
            crashmon_s: median(ours),
            anchor_s: median(anchor),
            anchor_bytes,
            device_peak_rss_kib: peak_rss,
        });
    }
    Ok(rows)
}

/// The results as a Markdown table, with what was measured and where.
pub fn table(rows: &[Row], repeat: usize, qemu_version: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# crashmon vs QEMU dump-guest-memory\n");
    let _ = writeln!(
        t,
        "Measured {} on {} cores, {}; guests under TCG; medians of {repeat} runs per size.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        qemu_version
    );
    let _ = writeln!(
        t,
        "* **crashmon**: the guest bug checks and its DumpIo callback streams a full Windows dump \
         (type 1) through the card; time from the bug check announced on the card to the dump \
         fsync'd under its final name on the host (the sidecar's started_at and ended_at). Every \
         dump was verified (kdmp-parser; every page against QEMU's memory).\n\
         * **anchor**: QEMU's host-side `dump-guest-memory` (ELF, no paging) of the same halted \
         guest to the same filesystem, fsync included. Like every format of that command it \
         needs someone on the host to notice the crash and run it. ELF is a core of guest \
         physical memory with the vCPUs' registers as notes (gdb, Linux's crash), not a Windows \
         dump; the kdump-compressed formats (zlib, lzo, snappy) compress each page for Linux's \
         crash and are not Windows dumps either. `win-dmp` writes a full Windows dump, but only \
         for a Windows guest running the FwCfg driver on a VM with `-device vmcoreinfo` (QEMU \
         takes the dump header, KDBG and bug check from it): the test guest is not Windows, so \
         it cannot be measured here.\n\
         * **ratio** = crashmon time / anchor time (lower is better for crashmon); compare ratios, \
         not seconds, across machines.\n\
         * **device RSS**: the device model's peak resident memory (`VmHWM`) once the dump is on \
         the host; it must not grow with the dump.\n"
    );
    let _ = writeln!(
        t,
        "| guest RAM | crashmon dump | crashmon | crashmon rate | anchor (ELF) | anchor rate | ratio | device RSS |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let _ = writeln!(
            t,
            "| {} MiB | {:.1} MiB | {:.2} s | {:.0} MiB/s | {:.2} s | {:.0} MiB/s | {:.2} | {:.1} MiB |",
            r.memory_mb,
            mib(r.dump_bytes),
            r.crashmon_s,
            mib(r.dump_bytes) / r.crashmon_s,
            r.anchor_s,
            mib(r.anchor_bytes) / r.anchor_s,
            r.crashmon_s / r.anchor_s,
            r.device_peak_rss_kib as f64 / 1024.0
        );
    }
    t
}
