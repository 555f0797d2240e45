//! Events and hooks through the real device-model process, driven over vfio-user as QEMU would.

mod common;

use common::*;
use crashmon_card_abi::{self as abi, DumpIoType};
use crashmon_guest_driver::Card;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_crash_gives_events_and_runs_the_hooks_with_its_details() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("events.jsonl");
    let crash_out = scratch.path().join("on-crash.txt");
    let dump_out = scratch.path().join("on-dump.txt");
    let on_crash = format!(
        "echo \"$CRASHMON_VM $CRASHMON_SESSION $CRASHMON_BUGCHECK_CODE $CRASHMON_BUGCHECK_P4\" > {}",
        crash_out.display()
    );
    let on_dump = format!(
        "echo \"$CRASHMON_STATE $CRASHMON_DUMP $CRASHMON_SIZE $CRASHMON_SHA256\" > {}",
        dump_out.display()
    );
    let mut dev = Device::start(&[
        "--once",
        "--events",
        log.to_str().unwrap(),
        "--on-crash",
        &on_crash,
        "--on-dump",
        &on_dump,
    ]);
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    let params = [1, 2, 3, 0xFFFF_F800_0000_0004];
    card.announce(0xD1, params).unwrap();
    let dump = synthetic_dump(3 * 1024 * 1024, 0xD1, params);
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Header, &dump[..4096]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &dump[4096..]).unwrap();
    // One refused doorbell: a slot that does not exist.
    card.dump_io(u64::MAX - 1, DumpIoType::Body, &[0; 8]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap_err();
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());

    let dumps = dev.files(".dmp");
    assert_eq!(dumps.len(), 1);
    let sc = sidecar_of(&dumps[0]);
    let ev = events(&log);
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"armed"), "{kinds:?}");
    assert!(kinds.contains(&"bugcheck") && kinds.contains(&"complete"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "chunk-refused").count(), 2, "first + summary");
    let bc = ev.iter().find(|e| e["event"] == "bugcheck").unwrap();
    assert_eq!(bc["code"], "0x000000d1");
    assert_eq!(bc["parameters"][3], "0xfffff80000000004");
    assert_eq!(bc["source"], "announced");
    assert_eq!(bc["session"], sc.session_id.to_string());
    assert!(ev.iter().all(|e| e["vm"] == "itest" && e["time"].is_string()));
    let done = ev.iter().find(|e| e["event"] == "complete").unwrap();
    assert_eq!(done["dump"], dumps[0].to_str().unwrap());
    assert_eq!(done["size"], dump.len() as u64);
    assert_eq!(done["sha256"], sc.sha256.clone().unwrap());

    // Hooks run in the hook runner, which outlives nothing it must wait for: wait for files.
    wait_for("on-crash", || crash_out.exists());
    wait_for("on-dump", || dump_out.exists());
    assert_eq!(
        std::fs::read_to_string(&crash_out).unwrap(),
        format!("itest {} 0x000000d1 0xfffff80000000004\n", sc.session_id)
    );
    assert_eq!(
        std::fs::read_to_string(&dump_out).unwrap(),
        format!("complete {} {} {}\n", dumps[0].display(), dump.len(), sc.sha256.unwrap())
    );
}

#[test]
fn an_unannounced_dump_reports_the_crash_from_its_header_and_empty_sessions_leave_no_file() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("events.jsonl");
    let mut dev = Device::start(&["--once", "--events", log.to_str().unwrap()]);
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    // A session with no byte: armed, announced, aborted.
    card.arm().unwrap();
    card.announce(0x80, [0; 4]).unwrap();
    card.abort();
    card.arm().unwrap();
    let dump = synthetic_dump(2 * 1024 * 1024, 0x50, [5, 6, 7, 8]);
    // Body first, then the header: out of order, never announced.
    card.dump_io(4096, DumpIoType::Body, &dump[4096..]).unwrap();
    card.dump_io(0, DumpIoType::Header, &dump[..4096]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());

    assert_eq!(dev.files(".dmp").len(), 1, "only the dump that carried bytes has a file");
    assert_eq!(dev.files(".json").len(), 1);
    let ev = events(&log);
    let empty = ev.iter().find(|e| e["event"] == "empty-session").expect("empty-session event");
    assert_eq!(empty["reason"], "aborted by the guest driver");
    let crashes: Vec<&Value> = ev.iter().filter(|e| e["event"] == "bugcheck").collect();
    assert_eq!(crashes.len(), 2, "the announced one and the one read from the header");
    assert_eq!(crashes[1]["code"], "0x00000050");
    assert_eq!(crashes[1]["source"], "dump-header");
}

#[test]
fn under_systemd_each_event_also_goes_to_the_journal_as_fields() {
    // journald's side: a datagram socket where the device model is told the journal listens
    // (JOURNAL_STREAM is what systemd sets when a service's output goes to the journal).
    let scratch = tempfile::tempdir().unwrap();
    let journal_path = scratch.path().join("journal.sock");
    let journal = std::os::unix::net::UnixDatagram::bind(&journal_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut dev = Device::start_with_env(
        &["--once"],
        &[("JOURNAL_STREAM", "8:123"), ("CRASHMON_JOURNAL_SOCKET", journal_path.to_str().unwrap())],
    );
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    card.announce(0xD1, [1, 2, 3, 4]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &[7u8; 8192]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    while entries.len() < 3 {
        let n = journal.recv(&mut buf).expect("an entry from the device model");
        entries.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let field = |entry: &str, key: &str| {
        entry.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned)
    };
    let kinds: Vec<String> = entries.iter().filter_map(|e| field(e, "CRASHMON_EVENT")).collect();
    assert_eq!(kinds, ["armed", "bugcheck", "complete"], "{entries:#?}");
    let crash = &entries[1];
    assert_eq!(field(crash, "CRASHMON_VM").as_deref(), Some("itest"));
    assert_eq!(field(crash, "CRASHMON_CODE").as_deref(), Some("0x000000d1"));
    assert_eq!(field(crash, "PRIORITY").as_deref(), Some("4"));
    assert!(field(crash, "MESSAGE").unwrap().starts_with("VM itest bug checked: 0x000000d1"));
    let done = &entries[2];
    let dumps = dev.files(".dmp");
    assert_eq!(field(done, "CRASHMON_DUMP").as_deref(), dumps[0].to_str());
    assert_eq!(field(done, "CRASHMON_SIZE").as_deref(), Some("8192"));
}
