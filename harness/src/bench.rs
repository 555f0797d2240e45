//! Benchmark: crashmon in copy mode and in DMA mode against QEMU's own `dump-guest-memory` and
//! against the disk's own limit, all in the same run.
//!
//! For each guest RAM size, three VMs crash and stream a full dump through the card:
//! * **DMA mode** (shared guest RAM, the default): the guest waits for an NMI from the host;
//!   the time from the QMP `inject-nmi` to the device model's first line about the crash is
//!   measured, then the dump. With that guest halted, QEMU's host-side `dump-guest-memory`
//!   (ELF, no paging, fsync'd) writes the same RAM to the same filesystem (the anchor), and
//!   `dd if=/dev/zero conv=fsync` writes as many bytes there (the disk's limit).
//! * **copy mode** (the same shared RAM, the guest's driver told not to use DMA: `dma=off`), the
//!   same dump copied through the data window;
//! * **half zero** (DMA mode, the workload leaves half its pages zero, as free memory is on
//!   Windows): the time and the disk space the sparse dump takes.
//!
//! crashmon's times are the sidecar's, from the bug check announced on the card to the dump
//! fsync'd and renamed on the host. Every crashmon dump is verified as in the tests. Seconds
//! differ between machines; the ratios, measured within seconds of each other, are what to
//! compare.

use crate::qmp::qmp;
use crate::scenario::{self, Rig, Running, Scenario, Trigger};
use anyhow::{ensure, Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// One measured row (medians over the runs, except where said).
#[derive(Debug, Clone)]
pub struct Row {
    /// Guest RAM in MiB.
    pub memory_mb: u32,
    /// Bytes of the crashmon dump.
    pub dump_bytes: u64,
    /// Seconds, copy mode.
    pub copy_s: f64,
    /// Seconds, DMA mode.
    pub dma_s: f64,
    /// Seconds, `dump-guest-memory` (ELF).
    pub anchor_s: f64,
    /// Bytes of QEMU's ELF dump.
    pub anchor_bytes: u64,
    /// Seconds, `dd conv=fsync` of `dump_bytes`.
    pub dd_s: f64,
    /// Seconds, DMA mode with half the workload's pages zero.
    pub half_zero_s: f64,
    /// That dump's logical size and the disk space it takes (allocated blocks).
    pub half_zero_bytes: (u64, u64),
    /// Milliseconds from `inject-nmi` to the device model's first line about the crash.
    pub nmi_first_line_ms: f64,
    /// The device model's peak resident memory (`VmHWM`), KiB, the largest over every run.
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

/// Times `dd if=/dev/zero of=file bs=1M conv=fsync` of `bytes` (whole MiB): the filesystem's
/// own limit for writing that much and making it durable.
fn time_dd(file: &Path, bytes: u64) -> Result<f64> {
    let start = Instant::now();
    let status = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={}", bytes.div_ceil(1 << 20)), "conv=fsync", "status=none"])
        .status()
        .context("running dd")?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(status.success(), "dd failed: {status}");
    std::fs::remove_file(file)?;
    Ok(seconds)
}

/// What one crash measured.
struct Crash {
    seconds: f64,
    dump_bytes: u64,
    size_and_allocated: (u64, u64),
    dma_chunks: u64,
}

/// Runs one crash of `s` in `dir`; `halted` runs while the crashed guest is halted.
fn crash(
    rig: &Rig,
    s: &Scenario,
    dir: &Path,
    peak_rss: &mut u64,
    nmi_ms: Option<&mut f64>,
    halted: impl FnOnce(&mut Running) -> Result<()>,
) -> Result<Crash> {
    let mut r = Running::start(rig, s, dir)?;
    if let Some(ms) = nmi_ms {
        *ms = r.inject_nmi_timed()?.as_secs_f64() * 1e3;
    }
    let outcome = scenario::complete_with(r, s, |r| {
        // The dump is on the host: the device model's peak memory is what it needed.
        *peak_rss = (*peak_rss).max(peak_rss_kib(r.card.pid())?);
        halted(r)
    })?;
    let d = &outcome.dumps[0];
    let crash = Crash {
        seconds: d.seconds,
        dump_bytes: d.verified.dump_bytes,
        size_and_allocated: (d.sidecar.size, d.sidecar.allocated_bytes.unwrap_or(0)),
        dma_chunks: d.sidecar.dma_chunks,
    };
    std::fs::remove_dir_all(dir).ok();
    Ok(crash)
}

/// Runs `repeat` rounds of the three crashes per RAM size in `sizes_mb`, in `work_dir`.
pub fn run(rig: &Rig, sizes_mb: &[u32], repeat: usize, work_dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &memory_mb in sizes_mb {
        let mut m: [Vec<f64>; 6] = Default::default();
        let (mut dump_bytes, mut anchor_bytes, mut half_zero_bytes, mut peak) = (0, 0, (0, 0), 0);
        for i in 0..repeat {
            let name = |what: &str| format!("bench-{memory_mb}m-{what}-{i}");
            let sized = |name: String| Scenario { memory_mb, ..Scenario::new(&name) };
            // DMA mode, crashed by an NMI from the host, then the anchors on the halted guest.
            let s = Scenario { trigger: Trigger::Nmi, ..sized(name("dma")) };
            let dir = work_dir.join(&s.name);
            let (mut anchor, mut dd, mut nmi_ms) = ((0.0, 0), 0.0, 0.0);
            let dma = crash(rig, &s, &dir, &mut peak, Some(&mut nmi_ms), |r| {
                anchor = time_anchor(r, &dir.join("qemu-dump.elf"))?;
                let bytes = u64::from(memory_mb) << 20;
                dd = time_dd(&dir.join("dd.bin"), bytes)?;
                Ok(())
            })?;
            ensure!(dma.dma_chunks > 0, "the shared-memory guest did not use DMA mode");
            // Copy mode: the same shared RAM, but the guest's driver does not use DMA (dma=off).
            let s = Scenario { guest_dma: false, ..sized(name("copy")) };
            let copy = crash(rig, &s, &work_dir.join(&s.name), &mut peak, None, |_| Ok(()))?;
            ensure!(copy.dma_chunks == 0, "the dma=off guest used DMA mode");
            // Half the workload's pages zero.
            let s = Scenario { zero_percent: 50, ..sized(name("half-zero")) };
            let half = crash(rig, &s, &work_dir.join(&s.name), &mut peak, None, |_| Ok(()))?;
            log::info!(
                "{memory_mb} MiB: DMA {:.3} s, copy {:.3} s, half zero {:.3} s, \
                 dump-guest-memory {:.3} s, dd {:.3} s, NMI to first line {nmi_ms:.1} ms",
                dma.seconds,
                copy.seconds,
                half.seconds,
                anchor.0,
                dd
            );
            for (v, x) in
                m.iter_mut().zip([dma.seconds, copy.seconds, half.seconds, anchor.0, dd, nmi_ms])
            {
                v.push(x);
            }
            dump_bytes = dma.dump_bytes;
            anchor_bytes = anchor.1;
            half_zero_bytes = half.size_and_allocated;
        }
        let [dma, copy, half, anchor, dd, nmi] = m.map(median);
        rows.push(Row {
            memory_mb,
            dump_bytes,
            copy_s: copy,
            dma_s: dma,
            anchor_s: anchor,
            anchor_bytes,
            dd_s: dd,
            half_zero_s: half,
            half_zero_bytes,
            nmi_first_line_ms: nmi,
            device_peak_rss_kib: peak,
        });
    }
    Ok(rows)
}

/// The targets, as (what, holds) for the rows measured.
pub fn targets(rows: &[Row]) -> Vec<(String, bool)> {
    let mut t = Vec::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if let Some(r) = rows.iter().max_by_key(|r| r.memory_mb) {
        let rate = mib(r.dump_bytes) / r.dma_s;
        t.push((
            format!(
                "DMA mode at {} MiB at most 0.35 x dump-guest-memory: {:.2} x",
                r.memory_mb,
                r.dma_s / r.anchor_s
            ),
            r.dma_s <= 0.35 * r.anchor_s,
        ));
        t.push((
            format!(
                "DMA mode at {} MiB at most 1.5 x the dd limit: {:.2} x",
                r.memory_mb,
                r.dma_s / r.dd_s
            ),
            r.dma_s <= 1.5 * r.dd_s,
        ));
        t.push((
            format!(
                "DMA mode at {} MiB at least 1 GiB/s through the card: {rate:.0} MiB/s",
                r.memory_mb
            ),
            rate >= 1024.0,
        ));
    }
    let worst_nmi = rows.iter().map(|r| r.nmi_first_line_ms).fold(0.0, f64::max);
    t.push((
        format!("inject-nmi to the first host line under 50 ms: {worst_nmi:.1} ms at worst"),
        worst_nmi < 50.0,
    ));
    let worst_rss = rows.iter().map(|r| r.device_peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    t.push((
        format!("device model peak RSS under 64 MiB at every size: {worst_rss:.1} MiB at most"),
        worst_rss < 64.0,
    ));
    t
}

/// The results as a Markdown table, with what was measured and where.
pub fn table(rows: &[Row], repeat: usize, qemu_version: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# crashmon: copy mode, DMA mode, QEMU dump-guest-memory and the disk's limit\n"
    );
    let _ = writeln!(
        t,
        "Measured {} on {} cores, {}; guests under TCG; medians of {repeat} runs per size \
         (`crashmon-harness bench`).\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        qemu_version
    );
    let _ = writeln!(
        t,
        "* **DMA mode**: guest RAM shared with the device model (`memory-backend-memfd,share=on`, \
         as `qemu-config/crashmon-card.args` has it); the driver proved DMA at start, and its \
         DumpIo callback hands the card physical ranges that the card reads with `pread` from \
         the memory QEMU shares, into its data window. **copy mode**: the same VM with the \
         guest's driver told not to use DMA (guest option `dma=off`): it copies every buffer \
         into the card's data window itself (under TCG each of those stores into the \
         window, a `ram_device` region, is emulated one by one). \
         Both: a full Windows dump (type 1); time from the bug check announced on the card to \
         the dump fsync'd under its final name (the sidecar's started_at and ended_at); every \
         dump verified (kdmp-parser; every page against QEMU's memory).\n\
         * **dump-guest-memory**: QEMU's host-side command (ELF, no paging) of the same halted \
         guest to the same filesystem, fsync included. It needs someone on the host to notice \
         the crash and run it; ELF is not a Windows dump (`win-dmp` needs a Windows guest with \
         the FwCfg driver and `-device vmcoreinfo`, which the test guest is not).\n\
         * **dd**: `dd if=/dev/zero bs=1M conv=fsync` of as many bytes to the same filesystem: \
         what the disk itself allows.\n\
         * **half zero**: DMA mode with half the workload's pages zero (free memory, which \
         Windows keeps zeroed); zero pages are holes in the dump file, whose logical size and \
         sha256 are unchanged.\n\
         * **NMI to first line**: from QMP `inject-nmi` to the device model's log line about the \
         bug check (polled every 0.5 ms).\n\
         * **device RSS**: the device model's peak resident memory (`VmHWM`) over every run of \
         the size.\n"
    );
    let _ = writeln!(
        t,
        "| guest RAM | dump | copy mode | DMA mode | DMA rate | dump-guest-memory | DMA / dgm | dd | DMA / dd | half zero: time | half zero: on disk | NMI to first line | device RSS |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for r in rows {
        let _ = writeln!(
            t,
            "| {} MiB | {:.1} MiB | {:.2} s | {:.2} s | {:.0} MiB/s | {:.2} s | {:.2} | {:.2} s | {:.2} | {:.2} s | {:.0} of {:.0} MiB | {:.1} ms | {:.1} MiB |",
            r.memory_mb,
            mib(r.dump_bytes),
            r.copy_s,
            r.dma_s,
            mib(r.dump_bytes) / r.dma_s,
            r.anchor_s,
            r.dma_s / r.anchor_s,
            r.dd_s,
            r.dma_s / r.dd_s,
            r.half_zero_s,
            mib(r.half_zero_bytes.1),
            mib(r.half_zero_bytes.0),
            r.nmi_first_line_ms,
            r.device_peak_rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(t, "\n## Targets\n");
    for (what, holds) in targets(rows) {
        let _ = writeln!(t, "* {}: {what}", if holds { "holds" } else { "**not yet**" });
    }
    t
}
