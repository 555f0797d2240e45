//! `--min-free` on a real small filesystem: a tmpfs mounted for the test (root; full suite).

mod common;

use common::*;
use crashmon_card_abi::{self as abi, regs, DumpIoType, ErrorCode};
use crashmon_guest_driver::{Card, CardError, CardIo};
use std::process::Command;

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
    let dev = finish(dev, vfio);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2, "still only the first dump");
    assert!(dev.log().contains("refused, no file made"));
}
