//! The host's limits through the real device-model process, against a guest that floods it.

mod common;

use common::*;
use crashmon_card_abi::{self as abi, regs, DumpIoType, ErrorCode};
use crashmon_device_model::capture::DumpState;
use crashmon_guest_driver::{Card, CardError, CardIo};
use std::process::Command;

fn connect(dev: &Device) -> (VfioCard, ()) {
    (VfioCard::connect(&dev.socket), ())
}

/// ARM, ANNOUNCE, one chunk of `bytes` bytes (none if 0), ABORT: a faked crash.
fn fake_crash(card: &mut Card<&VfioCard>, bytes: usize) -> Result<(), CardError> {
    card.arm()?;
    card.announce(0xDEAD, [0; 4])?;
    if bytes > 0 {
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &vec![0x5A; bytes])?;
    }
    card.abort();
    Ok(())
}

#[test]
fn a_guest_flooding_sessions_is_rate_limited_and_keep_bounds_the_files() {
    let mut dev = Device::start(&["--once", "--max-sessions-per-hour", "10", "--keep", "4"]);
    let (vfio, ()) = connect(&dev);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..200 {
        loop {
            match fake_crash(&mut card, 4096) {
                Ok(()) => accepted += 1,
                Err(CardError::Refused(ErrorCode::Quota)) => refused += 1,
                // Earlier sessions still being made durable: refused, not counted as opened;
                // this guest waits for its turn.
                Err(CardError::Refused(ErrorCode::HostBusy)) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("{e:?}"),
            }
            break;
        }
    }
    assert_eq!((accepted, refused), (10, 190), "ten sessions an hour, the rest QUOTA");
    vfio.client.borrow().shutdown().unwrap();
    drop(card);
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());
    let kept = dev.files(".incomplete.dmp");
    assert_eq!(kept.len(), 4, "--keep 4");
    assert_eq!(dev.files(".json").len(), 4, "sidecars went with their dumps");
    for dump in &kept {
        assert_eq!(std::fs::read(dump).unwrap(), vec![0x5A; 4096]);
    }
    let log = dev.log();
    let warns = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count();
    assert!(warns < 60, "a flood is not a flood of log lines: {warns}\n{log}");
    assert_eq!(log.matches("sessions in the last hour").count(), 1, "one line per burst");
}

#[test]
fn sessions_with_no_bytes_leave_no_files() {
    let mut dev = Device::start(&["--once"]);
    let (vfio, ()) = connect(&dev);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    for _ in 0..20 {
        // Earlier sessions may still be closing (HOST_BUSY): a guest that waits gets its turn.
        while let Err(e) = fake_crash(&mut card, 0) {
            assert_eq!(e, CardError::Refused(ErrorCode::HostBusy));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    vfio.client.borrow().shutdown().unwrap();
    drop(card);
    drop(vfio);
    assert!(dev.wait().success());
    let left: Vec<_> = std::fs::read_dir(&dev.out).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(dev.log().matches("carried no dump bytes").count(), 20, "one line each");
}

#[test]
fn max_total_size_rotates_old_dumps_and_stops_one_that_would_pass_it() {
    let mut dev = Device::start(&["--once", "--max-total-size", "5MiB", "--keep", "0"]);
    let (vfio, ()) = connect(&dev);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    for _ in 0..3 {
        card.arm().unwrap_or_else(|e| panic!("{e:?}\n{}", dev.log()));
        card.dump_io(0, DumpIoType::Body, &vec![1u8; 2 << 20]).unwrap();
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
    }
    assert_eq!(dev.wait_files(".dmp", 2).len(), 2, "the oldest made room for the third");
    card.arm().unwrap();
    // 6 MiB cannot fit under 5 MiB whatever is removed: it stops at the limit.
    let _ = card.dump_io(0, DumpIoType::Body, &vec![2u8; 6 << 20]);
    assert_eq!(
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]),
        Err(CardError::Refused(ErrorCode::Quota))
    );
    vfio.client.borrow().shutdown().unwrap();
    drop(card);
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());
    let stopped = dev.files(".incomplete.dmp");
    assert_eq!(stopped.len(), 1);
    let sc = sidecar_of(&stopped[0]);
    assert_eq!(sc.state, DumpState::Incomplete);
    assert!(sc.incomplete_reason.unwrap().contains("--max-total-size"));
    assert!(sc.size <= 5 << 20);
    let total: u64 = std::fs::read_dir(&dev.out)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();
    assert!(total <= (5 << 20) + 64 * 1024, "dumps and sidecars within the limit: {total}");
}

/// A real small filesystem: a 48 MiB tmpfs mounted for the test (the tests run as root).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size_mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0755"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount(8)");
        assert!(status.success(), "mounting a tmpfs needs root, as the full suite runs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn min_free_stops_a_dump_before_the_filesystem_fills_and_refuses_new_sessions() {
    let fs = Tmpfs::mount(48);
    let out = fs.0.path().join("dumps");
    let start = |min_free: &str| {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("card.sock");
        Device::start_at(dir, &socket, &out, &["--once", "--min-free", min_free])
    };
    let finish = |mut dev: Device, vfio: VfioCard| {
        vfio.client.borrow().shutdown().unwrap();
        drop(vfio);
        assert!(dev.wait().success(), "{}", dev.log());
        dev
    };

    // A dump larger than the room above --min-free stops there, kept as incomplete.
    let dev = start("20MiB");
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    card.announce(0x7E, [0; 4]).unwrap();
    let _ = card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &vec![3u8; 40 << 20]);
    assert_eq!(
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]),
        Err(CardError::Refused(ErrorCode::Quota))
    );
    drop(card);
    let dev = finish(dev, vfio);
    let dumps = dev.files(".incomplete.dmp");
    assert_eq!(dumps.len(), 1);
    let sc = sidecar_of(&dumps[0]);
    assert!(sc.incomplete_reason.unwrap().contains("--min-free"));
    assert!(sc.bytes_received > 0 && sc.bytes_received < 40 << 20);
    let free = || {
        let st = nix::sys::statvfs::statvfs(&out).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    };
    assert!(free() >= 20 << 20, "the filesystem kept its free space: {}", free());

    // Already below a larger --min-free: the session is refused outright, with no file.
    let dev = start("40MiB");
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    let _ = card.announce(0x7E, [0; 4]);
    let _ = card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &[1u8; 4096]);
    let _ = card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]);
    assert_eq!(ErrorCode::from_u32((&vfio).read_register(regs::ERROR)), Some(ErrorCode::Quota));
    drop(card);
    let dev = finish(dev, vfio);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2, "still only the first dump");
    assert!(dev.log().contains("refused, no file made"));
}
