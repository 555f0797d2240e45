//! `crashmon-dump` on genuine dumps: written by crashmon's own dump writer, streamed through the
//! guest driver's card core into the real card and capture code (`CrashMonitorCard`, its session
//! writers), which write the `.dmp` and its sidecar. Then the built binary is run on them.

use crashmon_device_model::capture::{CaptureConfig, DumpState, Finished, Sidecar};
use crashmon_device_model::card::CrashMonitorCard;
use crashmon_device_model::data_window::DataWindow;
use crashmon_dump_writer::{
    self as dw, BugCheck, Context, DumpIoType, DumpKind, DumpPlan, PhysicalMemory, Run,
    SecondaryBlob, WriteOrder,
};
use crashmon_guest_driver::{Card, CardIo};
use serde_json::Value;
use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

const PAGE: usize = 0x1000;
const DRIVER_TAG: &str = "{c4a50d01-6372-4d53-9d6d-6f6e64727631}";
const BIG_TAG: &str = "{0badc0de-1111-2222-3333-444455556666}";
const EMPTY_TAG: &str = "{0badc0de-0000-0000-0000-000000000000}";
const RUNS: [Run; 2] =
    [Run { base_page: 0x1, page_count: 0x9F }, Run { base_page: 0x100, page_count: 0x300 }];
const PARAMS: [u64; 4] = [0xFFFF_F802_1234_5678, 2, 0, 0xFFFF_F802_0000_1000];

/// The card's registers and data window, as the guest driver's core sees them.
struct Bus(RefCell<CrashMonitorCard>);

impl CardIo for &Bus {
    fn read_register(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.0.borrow_mut().read(offset.into(), &mut b);
        u32::from_le_bytes(b)
    }
    fn write_register(&self, offset: u32, value: u32) {
        self.0.borrow_mut().write(offset.into(), &value.to_le_bytes());
    }
    fn write_window(&self, offset: usize, data: &[u8]) {
        self.0.borrow().window().write(offset as u64, data).expect("inside BAR2");
    }
}

/// The dump writer's `KbCallbackDumpIo`: each call goes through the driver core to the card;
/// after `stop_after` calls the guest "dies" (nothing more is sent).
struct Sink<'a> {
    card: Card<&'a Bus>,
    calls: usize,
    stop_after: Option<usize>,
}

impl dw::DumpSink for Sink<'_> {
    fn dump_io(&mut self, offset: u64, buffer: &[u8], kind: DumpIoType) {
        self.calls += 1;
        if self.stop_after.is_some_and(|n| self.calls > n) {
            return;
        }
        self.card.dump_io(offset, kind, buffer).expect("the card takes every chunk");
    }
}

/// 4 MiB of guest memory: pseudo-random words, a few zero pages, page tables not needed.
struct Ram(Vec<u8>);

impl Ram {
    fn new() -> Self {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut ram: Vec<u8> = (0..0x400 * PAGE / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        for pfn in [0x10, 0x11, 0x200] {
            ram[pfn * PAGE..(pfn + 1) * PAGE].fill(0);
        }
        Ram(ram)
    }
}

impl PhysicalMemory for Ram {
    fn page(&self, pfn: u64) -> &[u8] {
        &self.0[pfn as usize * PAGE..(pfn as usize + 1) * PAGE]
    }
}

fn tag(text: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(text).unwrap().to_bytes_le()
}

fn driver_block() -> Vec<u8> {
    let mut b = b"CMONDRV\0".to_vec();
    b.extend((0..56u8).map(|i| i.wrapping_mul(37)));
    b
}

fn big_block() -> Vec<u8> {
    (0..10_001u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// Bitmap: the pages of the runs except those with `pfn % 4 == 3`.
fn bitmap() -> Vec<u8> {
    let mut b = vec![0u8; 0x400 / 8];
    for r in RUNS {
        for pfn in r.base_page..r.base_page + r.page_count {
            if pfn % 4 != 3 {
                b[pfn as usize / 8] |= 1 << (pfn % 8);
            }
        }
    }
    b
}

/// How a capture goes.
#[derive(Clone, Copy)]
struct Crash {
    code: u32,
    bitmap: bool,
    order: WriteOrder,
    /// The guest stops after this many `dump_io` calls and the VM goes away.
    stop_after: Option<usize>,
}

impl Crash {
    fn full() -> Self {
        Self { code: 0xD1, bitmap: false, order: WriteOrder::Sequential, stop_after: None }
    }
}

/// Runs one crash through the real card into `dir` and returns what the capture left there.
fn capture(dir: &Path, vm: &str, crash: Crash) -> Finished {
    let config = CaptureConfig::new(dir, vm, 1 << 30);
    let bus = Bus(RefCell::new(CrashMonitorCard::new(config, DataWindow::new().unwrap())));
    let mut card = Card::probe(&bus).unwrap();
    card.reset();
    card.arm().unwrap();
    if crash.order == WriteOrder::Sequential {
        card.announce(crash.code, PARAMS).unwrap();
    }
    let ctx = Context::zeroed();
    let (driver, big) = (driver_block(), big_block());
    let blobs = [
        SecondaryBlob { guid: tag(DRIVER_TAG), data: &driver },
        SecondaryBlob { guid: tag(BIG_TAG), data: &big },
        SecondaryBlob { guid: tag(EMPTY_TAG), data: &[] },
    ];
    let bits = bitmap();
    let plan = DumpPlan {
        kind: if crash.bitmap { DumpKind::Bitmap { bitmap: &bits } } else { DumpKind::Full },
        order: crash.order,
        bugcheck: BugCheck { code: crash.code, parameters: PARAMS },
        context: &ctx,
        directory_table_base: 0x1AD000,
        runs: &RUNS,
        number_processors: 2,
        kd_debugger_data_block: 0,
        ps_loaded_module_list: 0xFFFF_F802_1000_0000,
        ps_active_process_head: 0xFFFF_F802_1000_0100,
        pfn_database: 0xFFFF_FA80_0000_0000,
        secondary: &blobs,
        // 2026-11-23 08:00:00 UTC as a FILETIME.
        system_time: (1_795_420_800 + 11_644_473_600) * 10_000_000,
        system_up_time: 0,
        chunk_size: 0x10000,
    };
    let mut scratch = vec![0u8; dw::scratch_size(&plan)];
    let mut sink = Sink { card, calls: 0, stop_after: crash.stop_after };
    dw::write_dump(&plan, &Ram::new(), &mut scratch, &mut sink).unwrap();
    let mut c = bus.0.borrow_mut();
    if crash.stop_after.is_some() {
        c.disconnect();
    }
    let finished = c.wait_writers();
    assert_eq!(finished.len(), 1);
    finished.into_iter().next().unwrap()
}

fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crashmon-dump")).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_sidecar(f: &Finished) -> Sidecar {
    serde_json::from_slice(&std::fs::read(&f.sidecar_path).unwrap()).unwrap()
}

fn write_sidecar(f: &Finished, sc: &Sidecar) {
    std::fs::write(&f.sidecar_path, serde_json::to_vec_pretty(sc).unwrap()).unwrap();
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// `verify`'s lines as (status, check name).
fn verdicts(o: &Output) -> Vec<(String, String)> {
    stdout(o)
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_owned(), w.next().unwrap().to_owned())
        })
        .collect()
}

fn failed_checks(o: &Output) -> Vec<String> {
    verdicts(o).into_iter().filter(|(s, _)| s == "FAIL").map(|(_, n)| n).collect()
}

#[test]
fn a_complete_full_dump_is_listed_inspected_verified_and_extracted() {
    let dir = tempfile::tempdir().unwrap();
    let f = capture(dir.path(), "win11", Crash::full());
    let name = f.dump_path.file_name().unwrap().to_str().unwrap().to_owned();

    let o = tool(&["list", s(dir.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let line = out.lines().next().unwrap();
    assert!(line.starts_with("win11  "), "{line}");
    for want in ["0x000000D1 DRIVER_IRQL_NOT_LESS_OR_EQUAL", "complete", &name, "MiB"] {
        assert!(line.contains(want), "{want} in {line}");
    }
    assert_eq!(stderr(&o), "", "nothing foreign here");

    let o = tool(&["list", "--json", s(dir.path())]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["vm"], "win11");
    assert_eq!(v["bugcheck"], "0x000000D1");
    assert_eq!(v["bugcheck_name"], "DRIVER_IRQL_NOT_LESS_OR_EQUAL");
    assert_eq!(v["state"], "complete");
    assert_eq!(v["file"], name.as_str());
    assert_eq!(v["size"], std::fs::metadata(&f.dump_path).unwrap().len());

    let o = tool(&["inspect", s(&f.dump_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "PAGEDU64",
        "1 (Full)",
        "DirectoryTableBase     0x00000000001ad000",
        "PsLoadedModuleList     0xfffff80210000000",
        "0x8664 (AMD64)",
        "NumberProcessors       2",
        "0x000000D1 DRIVER_IRQL_NOT_LESS_OR_EQUAL",
        "0xfffff80212345678 0x0000000000000002",
        "SystemTime             2026-11-23T08:00:00.000Z",
        "pfn 0x100..0x400 (768 pages)",
        "secondary data         3 blocks",
        &format!("{DRIVER_TAG}  64 bytes"),
        &format!("{BIG_TAG}  10001 bytes"),
        &format!("{EMPTY_TAG}  0 bytes"),
        "state                complete",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }

    // The sidecar names the same dump.
    let o = tool(&["inspect", "--json", s(&f.sidecar_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let h = &v["header"];
    assert_eq!(h["dump_type"], 1);
    assert_eq!(h["major_version"], 0xF);
    assert_eq!(h["bugcheck"]["code"], "0x000000D1");
    assert_eq!(h["bugcheck"]["parameters"][3], "0xfffff80200001000");
    assert_eq!(h["required_dump_space"], v["file_size"]);
    assert_eq!(v["physical_memory"]["pages"], 0x39F);
    assert_eq!(v["physical_memory"]["header_runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["secondary_data"][0]["tag"], DRIVER_TAG);
    assert_eq!(v["secondary_data"][1]["size"], 10_001);
    assert_eq!(v["sidecar"]["state"], "complete");

    let o = tool(&["verify", s(&f.dump_path)]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let names: Vec<String> = verdicts(&o).into_iter().map(|(s, n)| format!("{s} {n}")).collect();
    assert_eq!(
        names,
        [
            "ok sidecar",
            "ok sha256",
            "ok parse",
            "ok size",
            "ok holes",
            "ok required-dump-space",
            "ok bugcheck"
        ],
        "{}",
        stdout(&o)
    );

    // Extract: to stdout, to a file, with and without braces, from the dump or its sidecar.
    let o = tool(&["extract", "--tag", DRIVER_TAG, s(&f.dump_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, driver_block());
    assert!(o.stdout.starts_with(b"CMONDRV\0"));
    let out = dir.path().join("big.bin");
    let bare = BIG_TAG.trim_matches(['{', '}']).to_uppercase();
    let o = tool(&["extract", "--tag", &bare, s(&f.sidecar_path), "-o", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), big_block());
    let o = tool(&["extract", "--tag", EMPTY_TAG, s(&f.dump_path)]);
    assert!(o.status.success() && o.stdout.is_empty());
}

#[test]
fn a_bitmap_dump_written_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let crash = Crash { code: 0x80, bitmap: true, order: WriteOrder::OutOfOrder, stop_after: None };
    let f = capture(dir.path(), "vm2", crash);
    let sc = read_sidecar(&f);
    assert_eq!(format!("{:?}", sc.write_order), "Explicit");

    let o = tool(&["verify", s(&f.dump_path)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = tool(&["inspect", "--json", s(&f.dump_path)]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["header"]["dump_type"], 5);
    assert_eq!(v["header"]["bugcheck"]["name"], "NMI_HARDWARE_FAILURE");
    let present = bitmap().iter().map(|b| b.count_ones() as u64).sum::<u64>();
    assert_eq!(v["physical_memory"]["pages"], present);
    assert_eq!(v["physical_memory"]["header_pages"], 0x39F);
    assert_eq!(v["secondary_data"].as_array().unwrap().len(), 3);
    let o = tool(&["extract", "--tag", BIG_TAG, s(&f.dump_path)]);
    assert_eq!(o.stdout, big_block());
    let o = tool(&["list", s(dir.path())]);
    assert!(stdout(&o).contains("0x00000080 NMI_HARDWARE_FAILURE"), "{}", stdout(&o));
}

#[test]
fn verify_catches_a_flipped_byte_a_wrong_sha_an_undeclared_hole_and_more() {
    let dir = tempfile::tempdir().unwrap();
    let f = capture(dir.path(), "lies", Crash::full());
    let original = std::fs::read(&f.dump_path).unwrap();
    let sidecar = read_sidecar(&f);
    let restore = || {
        std::fs::write(&f.dump_path, &original).unwrap();
        write_sidecar(&f, &sidecar);
    };
    let verify = || tool(&["verify", s(&f.dump_path)]);
    assert_eq!(verify().status.code(), Some(0));

    // A flipped byte in a page.
    let mut bytes = original.clone();
    bytes[0x2000 + 0x50 * PAGE + 7] ^= 0x40;
    std::fs::write(&f.dump_path, &bytes).unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(failed_checks(&o), ["sha256"], "{}", stdout(&o));
    restore();

    // A sidecar with the wrong sha.
    let mut sc = sidecar.clone();
    sc.sha256 = Some("00".repeat(32));
    write_sidecar(&f, &sc);
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(failed_checks(&o), ["sha256"], "{}", stdout(&o));
    restore();

    // An undeclared hole: the same file rewritten without [0x40000, 0x60000), which the
    // filesystem then holds no data for; the sidecar's sha is made to match so that only the
    // hole is wrong.
    let (a, b) = (0x40000usize, 0x60000usize);
    std::fs::remove_file(&f.dump_path).unwrap();
    let file = std::fs::File::create(&f.dump_path).unwrap();
    file.write_all_at(&original[..a], 0).unwrap();
    file.write_all_at(&original[b..], b as u64).unwrap();
    drop(file);
    let mut holed = original.clone();
    holed[a..b].fill(0);
    let mut sc = sidecar.clone();
    sc.sha256 = Some(sha256_hex(&holed));
    write_sidecar(&f, &sc);
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(failed_checks(&o), ["holes"], "{}", stdout(&o));
    assert!(stdout(&o).contains("[0x40000, 0x60000) (131072 bytes) was never written"));
    // Zero pages the device model left out are holes the sidecar accounts for in aggregate:
    // as many bytes of them pass, one byte fewer does not.
    let mut sparse = sc.clone();
    sparse.zero_bytes_skipped = (b - a) as u64;
    write_sidecar(&f, &sparse);
    let o = verify();
    assert_eq!(failed_checks(&o), Vec::<String>::new(), "{}", stdout(&o));
    assert!(stdout(&o).contains("131072 bytes of zero pages left as holes"), "{}", stdout(&o));
    sparse.zero_bytes_skipped = (b - a) as u64 - 1;
    write_sidecar(&f, &sparse);
    assert_eq!(failed_checks(&verify()), ["holes"]);
    // Declared, it is accepted (for a dump that says it is incomplete).
    sc.state = DumpState::Incomplete;
    sc.missing_bytes = Some((b - a) as u64);
    sc.missing_ranges = vec![[a as u64, b as u64]];
    write_sidecar(&f, &sc);
    let o = verify();
    assert_eq!(failed_checks(&o), Vec::<String>::new(), "{}", stdout(&o));
    assert!(stdout(&o).contains("skip  required-dump-space"), "{}", stdout(&o));
    // A complete dump may not declare holes.
    sc.state = DumpState::Complete;
    write_sidecar(&f, &sc);
    assert_eq!(failed_checks(&verify()), ["holes"]);
    restore();

    // A declared hole that holds data.
    let mut sc = sidecar.clone();
    sc.state = DumpState::Incomplete;
    sc.missing_bytes = Some(0x1000);
    sc.missing_ranges = vec![[0x3000, 0x4000]];
    write_sidecar(&f, &sc);
    let o = verify();
    assert_eq!(failed_checks(&o), ["holes"], "{}", stdout(&o));
    assert!(stdout(&o).contains("holds data"), "{}", stdout(&o));
    restore();

    // The sidecar's bug check differs from the header's.
    let mut sc = sidecar.clone();
    sc.bugcheck.as_mut().unwrap().code = "0x0000000a".into();
    write_sidecar(&f, &sc);
    assert_eq!(failed_checks(&verify()), ["bugcheck"]);
    restore();

    // A truncated dump whose sidecar was made to agree on the hash.
    let cut = &original[..original.len() - PAGE];
    std::fs::write(&f.dump_path, cut).unwrap();
    let mut sc = sidecar.clone();
    sc.sha256 = Some(sha256_hex(cut));
    write_sidecar(&f, &sc);
    assert_eq!(failed_checks(&verify()), ["size", "required-dump-space"]);
    restore();

    // No sidecar at all.
    std::fs::remove_file(&f.sidecar_path).unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(failed_checks(&o), ["sidecar"]);
    restore();
    assert_eq!(verify().status.code(), Some(0), "restored");
}

#[test]
fn list_shows_incomplete_and_streaming_dumps_and_skips_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let done = capture(d, "alpha", Crash::full());
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The VM dies after the header and 10 body chunks: an incomplete dump with every byte sent.
    let cut = Crash { stop_after: Some(11), ..Crash::full() };
    let cut = capture(d, "beta", cut);
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Out of order, the VM dies after the back 5 body chunks: holes declared at the front.
    let holed =
        Crash { code: 0x50, stop_after: Some(5), order: WriteOrder::OutOfOrder, ..Crash::full() };
    let holed = capture(d, "gamma", holed);
    std::fs::write(d.join("notes.txt"), "an operator's notes").unwrap();
    std::fs::write(d.join("other.json"), r#"{"hello": "world"}"#).unwrap();
    std::fs::write(d.join("garbage.json"), [0xFF, 0xFE, 0x00]).unwrap();
    std::fs::write(d.join("orphan.dmp"), b"PAGEDU64").unwrap();
    std::fs::create_dir(d.join("subdir")).unwrap();

    let o = tool(&["list", s(d)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("alpha") && lines[0].contains(" complete "), "{out}");
    assert!(lines[1].starts_with("beta ") && lines[1].contains(" incomplete "), "{out}");
    assert!(lines[1].ends_with(".incomplete.dmp"), "{out}");
    // Out of order and cut short, the header (written last) never came, nor an announcement.
    assert!(lines[2].starts_with("gamma") && lines[2].contains("(bug check unknown)"), "{out}");
    let err = stderr(&o);
    for want in [
        "skipping notes.txt: not a crashmon dump or sidecar",
        "skipping other.json: not a crashmon sidecar (missing field `format`",
        "skipping garbage.json:",
        "skipping orphan.dmp: no sidecar",
        "skipping subdir:",
    ] {
        assert!(err.contains(want), "{want} in\n{err}");
    }
    assert_eq!(err.lines().count(), 5, "{err}");

    let o = tool(&["list", "--json", s(d)]);
    let states: Vec<String> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["complete", "incomplete", "incomplete"]);

    // The cut dump is consistent with its sidecar: only RequiredDumpSpace does not apply.
    let sc = read_sidecar(&cut);
    assert_eq!(sc.missing_bytes, Some(0));
    let o = tool(&["verify", s(&cut.dump_path)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("skip  required-dump-space"));
    let o = tool(&["extract", "--tag", DRIVER_TAG, s(&cut.dump_path)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the dump has no secondary data"), "{}", stderr(&o));

    // The holed one: its holes are declared and read as zeros, but with no header it does not
    // parse.
    let sc = read_sidecar(&holed);
    assert!(sc.missing_bytes.unwrap() > 0 && sc.missing_ranges[0][0] == 0, "{sc:?}");
    let o = tool(&["verify", s(&holed.dump_path)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(failed_checks(&o), ["parse"], "{}", stdout(&o));
    assert!(stdout(&o).contains("ok    holes"), "{}", stdout(&o));
    let o = tool(&["inspect", s(&holed.dump_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("kdmp-parser cannot parse it"), "{}", stdout(&o));

    // The complete one still verifies in the crowd.
    assert_eq!(tool(&["verify", s(&done.sidecar_path)]).status.code(), Some(0));
}

#[test]
fn a_dump_still_streaming_is_listed_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let config = CaptureConfig::new(dir.path(), "live", 1 << 30);
    let bus = Bus(RefCell::new(CrashMonitorCard::new(config, DataWindow::new().unwrap())));
    let mut card = Card::probe(&bus).unwrap();
    card.reset();
    card.arm().unwrap();
    card.announce(0xE2, [0; 4]).unwrap();
    card.dump_io(u64::MAX, DumpIoType::Header, &[0u8; 0x2000]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let o = loop {
        let o = tool(&["list", "--json", s(dir.path())]);
        if stdout(&o).contains("\"size\":8192") || std::time::Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["state"], "streaming");
    assert_eq!(v["bugcheck_name"], "MANUALLY_INITIATED_CRASH");
    assert!(v["file"].as_str().unwrap().ends_with(".dmp.partial"));
    assert_eq!(v["size"], 8192);
    assert_eq!(stderr(&o), "");
    let file = dir.path().join(v["file"].as_str().unwrap());
    let o = tool(&["verify", s(&file)]);
    assert_eq!(o.status.code(), Some(1), "no hash yet, no header");
    bus.0.borrow_mut().disconnect();
    bus.0.borrow_mut().wait_writers();
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_status() {
    let dir = tempfile::tempdir().unwrap();
    let f = capture(dir.path(), "cli", Crash::full());
    let one_line = |o: &Output| {
        assert_eq!(stderr(o).lines().count(), 1, "{}", stderr(o));
        assert!(stderr(o).starts_with("crashmon-dump: "), "{}", stderr(o));
        o.status.code()
    };
    assert_eq!(one_line(&tool(&["frobnicate"])), Some(2));
    assert_eq!(one_line(&tool(&["inspect"])), Some(2));
    assert_eq!(one_line(&tool(&["verify", "/nonexistent/x.dmp"])), Some(2));
    assert_eq!(one_line(&tool(&["extract", "--tag", "nope", s(&f.dump_path)])), Some(2));
    let o = tool(&["extract", "--tag", "{11111111-2222-3333-4444-555555555555}", s(&f.dump_path)]);
    assert_eq!(one_line(&o), Some(1));
    for t in [DRIVER_TAG, BIG_TAG, EMPTY_TAG] {
        assert!(stderr(&o).contains(t), "{t} listed in {}", stderr(&o));
    }
    let o = tool(&["list", "/nonexistent-dir"]);
    assert_eq!(one_line(&o), Some(1));
    assert_eq!(stderr(&o).matches("No such file").count(), 1, "said once: {}", stderr(&o));
    std::fs::write(dir.path().join("x.json"), "{}").unwrap();
    assert_eq!(one_line(&tool(&["inspect", s(&dir.path().join("x.json"))])), Some(1));
    assert!(tool(&["--help"]).status.success());
}
