//! Live migration of a VM with the card, on the QEMU the harness runs (11.1).
//!
//! By default (`crashmon-card.args`), QEMU refuses to migrate a VM with the card: a block node
//! QEMU cannot migrate (vvfat, read-write, attached to nothing) is its migration blocker, so
//! `migrate` fails with an error that names `crashmon-card-cannot-migrate`, and the VM stays on
//! the host whose device model captures its crashes. The first test shows that; the second shows
//! why, with the blocker left out:
//!
//! The guest arms card A (device model A) on the source, the VM live-migrates over a unix
//! socket to a destination QEMU started identically but with `-incoming defer` and card B
//! (device model B, its own socket and output folder), and the host's NMI makes the guest bug
//! check on the destination.
//!
//! What QEMU 11.1 does, and what this test pins down: `vfio-user-pci` takes no part in
//! migration. `vfio_user_pci_realize` (hw/vfio-user/pci.c) never calls `vfio_migration_realize`,
//! so there is neither VFIO migration of the device (`"vfio":{"transferred":0}`) nor the
//! migration blocker `vfio_pci_realize` adds for devices that cannot migrate; its
//! `vfio_save_config`/`vfio_load_config` are NULL ("No live migration support yet") and the
//! device has no `vmsd`, so not even its PCI configuration travels. QEMU reports the migration
//! completed, but on the destination the card's BARs are unassigned and memory decoding is off:
//! the guest's accesses to the card reach nothing (reads return 0, which the driver decodes as
//! IDLE; its re-arm cannot take effect), the dump is lost, and neither device model sees a
//! byte. The driver's own record (DRIVER SESSION, and flags in its secondary data) shows the
//! loss, but there is no dump to carry it. Until QEMU migrates vfio-user devices (or at least
//! their configuration space, in which case the driver's re-arm at the first DumpIo makes the
//! dump land on B), a VM with the card must not be live-migrated: QEMU 11.1 will not refuse it.
//!
//! When this test starts failing because the guest's dump reached device model B, QEMU has
//! changed: replace the assertions of the loss with `scenario::complete(destination, &s)`, which
//! verifies the dump exactly as every other scenario does (pmemsave from the destination).

use anyhow::{ensure, Context, Result};
use crashmon_harness::scenario::{self, Rig, Running, Scenario, Trigger, CRASH_TIMEOUT};
use std::path::Path;

fn rig() -> Rig {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(true)
        .try_init();
    Rig::prepare().expect("QEMU, the guest and the device model")
}

/// Files a device model left in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

#[test]
fn live_migration_is_refused_and_the_source_still_captures_the_crash() -> Result<()> {
    let rig = rig();
    let dir = tempfile::Builder::new().prefix("crashmon-no-migration-").tempdir()?;
    let mut s = Scenario::new("no-migrate");
    s.trigger = Trigger::Nmi;
    s.memory_mb = 64;
    let (dumps_a, dumps_b) = (dir.path().join("dumps-a"), dir.path().join("dumps-b"));
    let mut source = Running::start_with_dumps_in(&rig, &s, &dir.path().join("a"), &dumps_a)?;
    source.wait_serial("WAITING nmi", 1, CRASH_TIMEOUT)?;
    let mut destination = Running::start_incoming(&rig, &s, &dir.path().join("b"), &dumps_b)?;
    let uri = format!("unix:{}", dir.path().join("b/migration.sock").display());
    destination.qmp.migrate_incoming(&uri)?;
    let refused = source.qmp.migrate(&uri).expect_err("QEMU migrated a VM with the card");
    let refusal = format!("{refused:#}");
    println!("migrate: {refusal}");
    ensure!(
        refusal.contains("crashmon-card-cannot-migrate") && refusal.contains("live migration"),
        "not the card's refusal: {refusal}"
    );
    ensure!(source.qmp.query_status()?.running, "the source VM no longer runs");
    let _ = destination.qmp.quit();
    drop(destination);
    // The VM never left: its crash is captured on the source and verifies like any other.
    let outcome = scenario::complete(source, &s)?;
    ensure!(outcome.dumps.len() == 1 && outcome.dumps[0].bugcheck.0 == 0x80);
    println!("{}", outcome.dumps[0].report());
    ensure!(files_in(&dumps_b).is_empty(), "the destination's device model got files");
    Ok(())
}

#[test]
fn without_the_blocker_qemu_11_1_migrates_the_vm_but_not_the_card_and_the_crash_is_lost(
) -> Result<()> {
    let rig = rig();
    let dir = tempfile::Builder::new().prefix("crashmon-migration-").tempdir()?;
    let mut s = Scenario::new("migrate");
    s.trigger = Trigger::Nmi;
    s.memory_mb = 64;
    s.migration_blocker = false;
    let (dumps_a, dumps_b) = (dir.path().join("dumps-a"), dir.path().join("dumps-b"));
    let mut source = Running::start_with_dumps_in(&rig, &s, &dir.path().join("a"), &dumps_a)?;
    // The driver armed card A ("DRIVER started") before the guest waits for the NMI.
    source.wait_serial("WAITING nmi", 1, CRASH_TIMEOUT)?;
    ensure!(source.serial().iter().any(|l| l.kind == "DRIVER started"), "{}", source.logs());
    let destination = Running::start_incoming(&rig, &s, &dir.path().join("b"), &dumps_b)?;
    let (mut destination, info) = scenario::migrate(source, destination)?;

    // QEMU calls it a success, with no device state and no blocker.
    ensure!(info.blocked_reasons.unwrap_or_default().is_empty(), "QEMU now blocks migration");
    let vfio = info.vfio.map(|v| v.transferred);
    ensure!(vfio == Some(0), "QEMU now migrates vfio device state: {vfio:?} bytes");
    // The card's configuration did not travel: its BARs are unassigned on the destination.
    let card = destination
        .qmp
        .query_pci()?
        .into_iter()
        .flat_map(|bus| bus.devices)
        .find(|d| d.id.vendor == i64::from(crashmon_card_abi::PCI_VENDOR_ID))
        .context("no card on the destination")?;
    let bars: Vec<(i64, i64)> = card.regions.iter().map(|r| (r.bar, r.address)).collect();
    ensure!(
        bars.iter().all(|&(_, address)| address == -1),
        "the card's BARs are assigned on the destination ({bars:x?}): QEMU now migrates its \
         configuration space, so the driver's re-arm should make the dump land on B; switch this \
         test to scenario::complete"
    );

    // The crash on the destination: the guest writes its whole dump into a card that is not
    // there, and no dump lands anywhere.
    destination.qmp.inject_nmi().context("QMP inject-nmi on the destination")?;
    destination.wait_serial("HALT", 1, CRASH_TIMEOUT)?;
    let lines = destination.serial();
    let session = lines.iter().find(|l| l.kind == "DRIVER SESSION").context("no DRIVER SESSION")?;
    println!("destination: CRASHMON {}", session.text);
    let field = |k: &str| session.fields.get(k).map(String::as_str);
    ensure!(
        field("complete") == Some("0")
            && field("error") == Some("timeout")
            && field("rearmed") == Some("0"),
        "the driver's session on the destination: {}",
        session.text
    );
    ensure!(lines.iter().any(|l| l.kind == "BUGCHECK"), "no bug check on the destination");
    let (on_a, on_b) = (files_in(&dumps_a), files_in(&dumps_b));
    ensure!(on_a.is_empty() && on_b.is_empty(), "files: A {on_a:?}, B {on_b:?}");
    destination.finish()?;
    Ok(())
}
