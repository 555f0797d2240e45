//! The host's limits through the real device-model process, against a guest that floods it.

mod common;

use common::*;
use crashmon_card_abi::{self as abi, DumpIoType, ErrorCode};
use crashmon_device_model::capture::DumpState;
use crashmon_guest_driver::{Card, CardError};

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
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());
    let kept = dev.files(".incomplete.dmp");
    assert_eq!(kept.len(), 4, "--keep 4: {}", dev.log());
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
