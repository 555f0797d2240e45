//! End to end: the test guest really bug checks inside a real QEMU (TCG), the real
//! `crashmon-device` process receives the dump through the card, and every dump is checked with
//! kdmp-parser and against QEMU's own image of guest RAM.

use anyhow::{ensure, Context, Result};
use crashmon_device_model::capture::DumpState;
use crashmon_harness::scenario::{self, Rig, Running, Scenario, Trigger};
use crashmon_harness::verify::{splitmix64, Workload};
use std::time::Duration;

fn rig() -> &'static Rig {
    Rig::shared()
}

/// Runs `scenario` with 64 MiB of guest RAM and prints its report.
fn run(mut scenario: Scenario) -> Result<scenario::Outcome> {
    let dir = tempfile::Builder::new().prefix(&format!("crashmon-{}-", scenario.name)).tempdir()?;
    scenario.memory_mb = 64;
    let outcome = scenario::run(rig(), &scenario, dir.path())?;
    for d in &outcome.dumps {
        println!("{}", d.report());
    }
    // Keep the files of a failing run; a passing one cleans up.
    Ok(outcome)
}

#[test]
fn sequential_full_dump_of_a_bug_check() -> Result<()> {
    let outcome = run(Scenario::new("seq-full"))?;
    let d = &outcome.dumps[0];
    assert_eq!(d.bugcheck.0, 0xDEAD_0001);
    assert_eq!(d.sidecar.write_order, crashmon_device_model::capture::WriteOrder::Sequential);
    assert_eq!(format!("{:?}", d.sidecar.bugcheck.as_ref().unwrap().source), "Announced");
    assert!(d.verified.pages_equal > 15_000, "{:?}", d.verified);
    assert!(d.sidecar.allocated_bytes.is_some(), "{:?}", d.sidecar);
    assert!(d.verified.checks.iter().any(|c| c.contains("through DirectoryTableBase")));
    assert!(
        d.verified.checks.iter().any(|c| c.contains("secondary data block {c4a50d01")),
        "{:?}",
        d.verified.checks
    );
    // Shared guest RAM: the driver proved DMA mode and the card read every data chunk itself.
    // All but one: the buffer that starts at physical page 0, whose address reads as "none"
    // (`MmGetPhysicalAddress` returns 0), goes by copy.
    assert_eq!(d.sidecar.dma_chunks + 1, d.sidecar.chunks, "{:?}", d.sidecar);
    Ok(())
}

#[test]
fn without_shared_guest_memory_the_probe_fails_and_the_dump_goes_by_copy() -> Result<()> {
    // share=off: QEMU passes the memfd, but the guest's writes stay in QEMU's private copies,
    // so the card reads other bytes than the driver's pattern (as behind a vIOMMU).
    let outcome = run(Scenario { shared_memory: false, ..Scenario::new("copy-mode") })?;
    let d = &outcome.dumps[0];
    assert_eq!(d.sidecar.dma_chunks, 0, "{:?}", d.sidecar);
    assert!(d.sidecar.chunks > 0);
    assert!(d.verified.pages_equal > 15_000, "{:?}", d.verified);
    Ok(())
}

#[test]
fn zero_pages_are_holes_in_the_file_and_the_dump_still_checks() -> Result<()> {
    // Half the workload's pages zero, as free memory is on Windows: the verification reads the
    // file as every byte (each zero page checked as zero, every other page against QEMU's RAM).
    let outcome = run(Scenario { zero_percent: 50, ..Scenario::new("half-zero") })?;
    let sc = &outcome.dumps[0].sidecar;
    assert!(sc.zero_bytes_skipped > sc.size * 2 / 5, "{sc:?}");
    assert_eq!(sc.zero_bytes_skipped % 4096, 0);
    let allocated = sc.allocated_bytes.expect("allocated_bytes in a closed dump's sidecar");
    // Allowing for the filesystem's rounding and metadata.
    assert!(allocated <= sc.size - sc.zero_bytes_skipped + (4 << 20), "{sc:?}");
    assert!(outcome.dumps[0].verified.workload_pages > 10_000, "{:?}", outcome.dumps[0].verified);
    Ok(())
}

#[test]
fn out_of_order_bitmap_dump() -> Result<()> {
    let mut s = Scenario::new("ooo-bitmap");
    s.bitmap = true;
    s.out_of_order = true;
    let d = &run(s)?.dumps[0];
    assert_eq!(d.sidecar.write_order, crashmon_device_model::capture::WriteOrder::Explicit);
    assert!(d.verified.checks.iter().any(|c| c.starts_with("bitmap holds exactly")));
    Ok(())
}

#[test]
fn nmi_from_the_host_gives_bug_check_0x80() -> Result<()> {
    let mut s = Scenario::new("nmi");
    s.trigger = Trigger::Nmi;
    let d = &run(s)?.dumps[0];
    assert_eq!(d.bugcheck.0, 0x80);
    Ok(())
}

#[test]
fn page_fault_gives_bug_check_0x50() -> Result<()> {
    let mut s = Scenario::new("pagefault");
    s.trigger = Trigger::PageFault;
    let d = &run(s)?.dumps[0];
    assert_eq!(d.bugcheck.0, 0x50);
    assert_eq!(d.bugcheck.1[0], 0xffff_8000_dead_b000, "parameter 1 is the faulting address");
    Ok(())
}

#[test]
fn divide_error_gives_bug_check_0x8e() -> Result<()> {
    let mut s = Scenario::new("divide");
    s.trigger = Trigger::Divide;
    s.out_of_order = true;
    let d = &run(s)?.dumps[0];
    assert_eq!((d.bugcheck.0, d.bugcheck.1[0]), (0x8E, 0xC000_0094));
    Ok(())
}

#[test]
fn callbacks_that_break_the_rules_are_reported() -> Result<()> {
    let mut s = Scenario::new("misbehave");
    s.misbehave = vec!["alloc".into(), "lock".into(), "wait".into()];
    let d = &run(s)?.dumps[0];
    assert_eq!(d.violations.len(), 3, "{:?}", d.violations);
    assert!(d.verified.checks.iter().any(|c| c.contains("{c4a50d02")), "report block checked");
    Ok(())
}

#[test]
fn a_second_crash_after_a_guest_reset_is_a_second_dump() -> Result<()> {
    let mut s = Scenario::new("reboot");
    s.reboots = 1;
    let outcome = run(s)?;
    assert_eq!(outcome.dumps.len(), 2);
    let (a, b) = (&outcome.dumps[0], &outcome.dumps[1]);
    assert_ne!(a.sidecar.session_id, b.sidecar.session_id);
    assert_ne!(a.path, b.path);
    assert!(a.verified.workload_pages > 10_000 && b.verified.pages_equal > 10_000);
    Ok(())
}

/// QEMU killed in the middle of the stream: the host keeps an incomplete dump holding every
/// byte that arrived, and those bytes are the guest's (header, then RAM pages in run order).
#[test]
fn qemu_killed_mid_stream_leaves_an_incomplete_dump_with_every_byte() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("crashmon-killed-").tempdir()?;
    let mut s = Scenario::new("killed");
    s.memory_mb = 128;
    let mut r = Running::start(rig(), &s, dir.path())?;
    r.wait_serial("DUMP START", 1, scenario::CRASH_TIMEOUT)?;
    // Let some megabytes arrive, pause the guest (a DMA dump of 128 MiB takes well under a
    // second, it must not finish while this looks), then kill QEMU without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let partial: u64 = std::fs::read_dir(&r.dumps_dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".dmp.partial"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        if partial > 16 << 20 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the dump never got going\n{}", r.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    r.qmp.stop()?;
    r.vm.kill();
    let status = r.card.wait_timeout(Duration::from_secs(30))?;
    ensure!(status.success(), "device model: {status}\n{}", r.logs());
    ensure!(r.dumps(DumpState::Complete).is_empty(), "nothing may claim to be complete");
    let incomplete = r.dumps(DumpState::Incomplete);
    ensure!(incomplete.len() == 1, "{incomplete:?}");
    let (path, sidecar) = &incomplete[0];
    assert!(path.to_string_lossy().ends_with(".incomplete.dmp"));
    assert_eq!(
        sidecar.incomplete_reason.as_deref(),
        Some("VM disconnected while the dump was streaming")
    );
    let bytes = std::fs::read(path)?;
    assert_eq!(bytes.len() as u64, sidecar.bytes_received, "every byte received is in the file");
    assert_eq!(sidecar.missing_bytes, Some(0));
    assert!(
        bytes.len() > 16 << 20 && bytes.len() < 128 << 20,
        "killed mid-stream: {}",
        bytes.len()
    );
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(sidecar.sha256.as_deref(), Some(sha.as_str()));

    // The bytes are the guest's: a DUMP_HEADER64, then RAM pages in the header's run order.
    assert_eq!(&bytes[..8], b"PAGEDU64");
    assert_eq!(u32::from_le_bytes(bytes[0x38..0x3c].try_into()?), 0xDEAD_0001);
    let boot = &crashmon_harness::serial::boots(&r.serial())[0];
    let (start, end, seed) = boot.workload().context("workload line")?;
    let (_, var_pa, _) = boot.variable().context("var line")?;
    let modified = boot.modified_pfns();
    let workload = Workload { start, end, seed, var_pfn: var_pa / 0x1000, zero_percent: 0 };
    let runs = u32::from_le_bytes(bytes[0x88..0x8c].try_into()?) as usize;
    let mut offset = 0x2000usize;
    let mut checked = 0;
    'runs: for i in 0..runs {
        let at = 0x98 + 16 * i;
        let base = u64::from_le_bytes(bytes[at..at + 8].try_into()?);
        let count = u64::from_le_bytes(bytes[at + 8..at + 16].try_into()?);
        for pfn in base..base + count {
            let Some(page) = bytes.get(offset..offset + 0x1000) else { break 'runs };
            offset += 0x1000;
            if (start / 0x1000..end / 0x1000).contains(&pfn)
                && pfn != workload.var_pfn
                && !modified.contains(&pfn)
            {
                for (j, w) in page.chunks_exact(8).enumerate() {
                    let pa = pfn * 0x1000 + 8 * j as u64;
                    assert_eq!(w, splitmix64(pa ^ seed).to_le_bytes(), "pfn {pfn:#x} word {j}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 3000, "only {checked} workload pages arrived");
    println!(
        "killed after {} bytes; {checked} workload pages verified in the incomplete dump",
        bytes.len()
    );
    Ok(())
}
