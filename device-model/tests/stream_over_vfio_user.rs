//! The real device-model process, driven over its vfio-user socket as QEMU would drive it.

mod common;

use common::*;
use crashmon_card_abi::{self as abi, regs, DumpIoType, ErrorCode, SessionState};
use crashmon_device_model::capture::{BugCheckSource, DumpState, HashSource, WriteOrder};
use crashmon_guest_driver::{Card, CardIo};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

const HEADER: usize = 8192;
const SECONDARY: usize = 3000;

fn config_read32(card: &VfioCard, at: u64) -> u32 {
    let mut b = [0u8; 4];
    card.client.borrow_mut().region_read(VFIO_PCI_CONFIG_REGION_INDEX, at, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn config_write32(card: &VfioCard, at: u64, v: u32) {
    card.client
        .borrow_mut()
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, at, &v.to_le_bytes())
        .unwrap();
}

#[test]
fn configuration_space_identifies_the_card_and_sizes_its_bars() {
    let mut dev = Device::start(&["--once"]);
    let card = VfioCard::connect(&dev.socket);
    assert_eq!(
        config_read32(&card, 0),
        (abi::PCI_DEVICE_ID as u32) << 16 | abi::PCI_VENDOR_ID as u32
    );
    assert_eq!(config_read32(&card, 8) >> 16, 0x0880, "class: system peripheral, other");
    assert_eq!(config_read32(&card, 0x3C) >> 8 & 0xFF, 0, "no interrupt pin");
    config_write32(&card, 0x10, u32::MAX);
    assert_eq!(config_read32(&card, 0x10), !(abi::BAR0_SIZE as u32 - 1));
    config_write32(&card, 0x18, u32::MAX);
    config_write32(&card, 0x1C, u32::MAX);
    let bar2 = (config_read32(&card, 0x1C) as u64) << 32 | config_read32(&card, 0x18) as u64;
    assert_eq!(bar2 & 0xF, 0b1100, "64-bit prefetchable");
    assert_eq!(!(bar2 & !0xF) + 1, abi::BAR2_SIZE);
    card.client.borrow().shutdown().unwrap();
    assert!(dev.wait().success());
}

/// Streams `dump` through the card like a DumpIo callback handed buffers of uneven sizes.
fn stream(card: &mut Card<&VfioCard>, dump: &[u8], sequential: bool) {
    let cuts = [HEADER, HEADER + 100_000, HEADER + 2_500_000, dump.len() - SECONDARY];
    let mut pieces: Vec<(usize, usize, DumpIoType)> = vec![(0, HEADER, DumpIoType::Header)];
    for w in cuts.windows(2) {
        pieces.push((w[0], w[1], DumpIoType::Body));
    }
    pieces.push((dump.len() - SECONDARY, dump.len(), DumpIoType::SecondaryData));
    if !sequential {
        pieces.reverse(); // the body lands before the header: out of order
    }
    for (start, end, kind) in pieces {
        let offset = if sequential { abi::OFFSET_SEQUENTIAL } else { start as u64 };
        card.dump_io(offset, kind, &dump[start..end]).unwrap();
    }
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
}

fn streams_a_multi_megabyte_dump(sequential: bool) {
    let mut dev = Device::start(&["--once"]);
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    let params = [0xFFFF_F802_1234_5678, 2, 0, 0xFFFF_F802_0000_1000];
    if sequential {
        card.announce(0x0000_00D1, params).unwrap();
        assert_eq!(card.state(), Some(SessionState::BugCheckAnnounced));
        // The writer creates the file off the message loop: it appears without any byte sent.
        let partial = dev.wait_files(".dmp.partial", 1);
        assert_eq!(partial.len(), 1, "the host knows of the crash before the first byte");
    }
    let dump = synthetic_dump(6 * 1024 * 1024 + 12345, 0xD1, params);
    stream(&mut card, &dump, sequential);
    assert_eq!(card.state(), Some(SessionState::Complete));
    let written = (&vfio).read_register(regs::BYTES_WRITTEN_LO) as usize;
    assert_eq!(written, dump.len());
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success());

    let dumps = dev.files(".dmp");
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    assert!(dev.files(".partial").is_empty());
    let got = std::fs::read(&dumps[0]).unwrap();
    assert!(got == dump, "host file differs from what the guest sent");

    // Private by default: a dump is a copy of the guest's RAM.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dumps[0]), 0o600);
    assert_eq!(mode(&dumps[0].with_extension("").with_extension("json")), 0o600);
    assert_eq!(mode(&dev.out), 0o700, "the output dir it created");

    let sc = sidecar_of(&dumps[0]);
    assert_eq!(sc.format, "crashmon-sidecar/1");
    assert_eq!(
        sc.sha256_source,
        Some(if sequential { HashSource::Streamed } else { HashSource::ReadBack })
    );
    assert!(sc.longest_answer_us.is_some());
    assert_eq!(sc.vm_name, "itest");
    assert_eq!(sc.state, DumpState::Complete);
    assert_eq!(sc.incomplete_reason, None);
    assert_eq!(sc.dump_file, dumps[0].file_name().unwrap().to_str().unwrap());
    assert!(
        sc.dump_file.starts_with("itest-") && sc.dump_file.contains(&sc.session_id.to_string())
    );
    let bc = sc.bugcheck.unwrap();
    assert_eq!(bc.code, "0x000000d1");
    assert_eq!(bc.parameters, params.map(|p| format!("{p:#018x}")));
    assert_eq!(
        bc.source,
        if sequential { BugCheckSource::Announced } else { BugCheckSource::DumpHeader }
    );
    assert_eq!(sc.size, dump.len() as u64);
    assert_eq!(sc.bytes_received, dump.len() as u64);
    assert_eq!(sc.bytes_by_type.header, HEADER as u64);
    assert_eq!(sc.bytes_by_type.secondary_data, SECONDARY as u64);
    assert_eq!(sc.bytes_by_type.body, (dump.len() - HEADER - SECONDARY) as u64);
    assert_eq!(
        sc.write_order,
        if sequential { WriteOrder::Sequential } else { WriteOrder::Explicit }
    );
    assert_eq!(sc.missing_bytes, Some(0));
    assert_eq!(sc.rejected_chunks, 0);
    assert_eq!(sc.sha256.as_deref(), Some(sha256_hex(&dump).as_str()));
    assert!(sc.ended_at.unwrap() >= sc.started_at);
    assert!(sc.chunks >= (dump.len() / abi::SLOT_SIZE as usize) as u64);
}

#[test]
fn sequential_dump_arrives_byte_for_byte_with_its_sidecar() {
    streams_a_multi_megabyte_dump(true);
}

#[test]
fn out_of_order_dump_arrives_byte_for_byte_with_its_sidecar() {
    streams_a_multi_megabyte_dump(false);
}

#[test]
fn dropped_connection_leaves_an_incomplete_dump_with_every_byte_sent() {
    let mut dev = Device::start(&["--once"]);
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    let dump = synthetic_dump(3 * 1024 * 1024, 0x80, [0; 4]);
    let sent = 2 * 1024 * 1024 + 777;
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Header, &dump[..HEADER]).unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &dump[HEADER..sent]).unwrap();
    // Every doorbell so far has been answered once a read returns.
    let _ = (&vfio).read_register(regs::STATUS);
    drop(vfio); // the connection drops mid-stream, as when QEMU dies
    assert!(dev.wait().success());

    let dumps = dev.files(".incomplete.dmp");
    assert_eq!(dumps.len(), 1);
    assert_eq!(std::fs::read(&dumps[0]).unwrap(), &dump[..sent]);
    let sc = sidecar_of(&dumps[0]);
    assert_eq!(sc.state, DumpState::Incomplete);
    assert_eq!(
        sc.incomplete_reason.as_deref(),
        Some("VM disconnected while the dump was streaming")
    );
    assert_eq!(sc.bytes_received, sent as u64);
    assert_eq!(sc.bugcheck.unwrap().code, "0x00000080", "read from the header it did receive");
    assert_eq!(sc.sha256.as_deref(), Some(sha256_hex(&dump[..sent]).as_str()));
}

#[test]
fn sigterm_mid_stream_keeps_the_bytes_and_removes_the_socket() {
    let mut dev = Device::start(&[]);
    let vfio = VfioCard::connect(&dev.socket);
    let mut card = Card::probe(&vfio).unwrap();
    card.reset();
    card.arm().unwrap();
    card.dump_io(0, DumpIoType::Body, &[0xAB; 5000]).unwrap();
    let _ = (&vfio).read_register(regs::STATUS);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    assert!(dev.wait().success());
    assert!(!dev.socket.exists());
    let dumps = dev.files(".incomplete.dmp");
    assert_eq!(std::fs::read(&dumps[0]).unwrap(), vec![0xAB; 5000]);
    assert_eq!(
        sidecar_of(&dumps[0]).incomplete_reason.as_deref(),
        Some("device model stopped while the dump was streaming")
    );
}

#[test]
fn misbehaving_guest_gets_error_codes_and_the_host_survives() {
    let mut dev = Device::start(&["--once", "--max-dump-size", "1MiB"]);
    let vfio = VfioCard::connect(&dev.socket);
    let io = &vfio;
    let error = || ErrorCode::from_u32(io.read_register(regs::ERROR)).unwrap();
    let clear = || io.write_register(regs::CONTROL, abi::control::CLEAR_ERROR);
    let mut card = Card::probe(io).unwrap();
    card.reset();
    // A doorbell before arming.
    io.write_register(regs::DOORBELL, 1);
    assert_eq!(error(), ErrorCode::BadState);
    card.arm().unwrap();
    // A chunk that would end past the 1 MiB limit, then one whose offset wraps.
    assert_eq!(card.dump_io(1024 * 1024 - 10, DumpIoType::Body, &[1; 20]), Ok(()));
    assert_eq!(error(), ErrorCode::TooLarge);
    clear();
    card.dump_io(u64::MAX - 1, DumpIoType::Body, &[1; 3]).unwrap();
    assert_eq!(error(), ErrorCode::BadOffset);
    clear();
    // Wild descriptor values.
    for (reg, v, code) in [
        (regs::CHUNK_SLOT, 77, ErrorCode::BadSlot),
        (regs::CHUNK_LENGTH, u32::MAX, ErrorCode::BadLength),
        (regs::CHUNK_TYPE, 0xFFFF, ErrorCode::BadType),
    ] {
        io.write_register(regs::CHUNK_SLOT, 0);
        io.write_register(regs::CHUNK_LENGTH, 1);
        io.write_register(regs::CHUNK_TYPE, DumpIoType::Body as u32);
        io.write_register(reg, v);
        io.write_register(regs::DOORBELL, 1);
        assert_eq!(error(), code);
        clear();
    }
    // Unaligned, odd-sized and out-of-range register accesses.
    let mut c = vfio.client.borrow_mut();
    c.region_write(0, 0x22, &[1, 2]).unwrap();
    c.region_write(0, 0xFFFF_FFF0, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 3];
    c.region_read(0, 1, &mut b).unwrap();
    drop(c);
    assert_eq!(error(), ErrorCode::BadAccess);
    clear();
    // The session survived all of it: the one good chunk is there and it completes.
    card.dump_io(0, DumpIoType::Body, b"good bytes").unwrap();
    card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
    assert_eq!(card.dump_io(0, DumpIoType::Body, b"after"), Ok(()));
    assert_eq!(error(), ErrorCode::BadState, "no chunks after completion until re-armed");
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success(), "{}", dev.log());
    let dumps = dev.files(".dmp");
    assert_eq!(dumps.len(), 1);
    let sc = sidecar_of(&dumps[0]);
    assert_eq!(sc.state, DumpState::Complete);
    assert_eq!(sc.rejected_chunks, 5);
    assert_eq!(&std::fs::read(&dumps[0]).unwrap()[..10], b"good bytes");
    assert!(!dev.log().contains("panicked"));
}

#[test]
fn a_second_vm_connection_gets_a_second_dump() {
    let dev = Device::start(&[]);
    for round in 0..2u8 {
        let vfio = VfioCard::connect(&dev.socket);
        let mut card = Card::probe(&vfio).unwrap();
        card.reset();
        card.arm().unwrap();
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Body, &[round; 100]).unwrap();
        card.dump_io(abi::OFFSET_SEQUENTIAL, DumpIoType::Complete, &[]).unwrap();
        vfio.client.borrow().shutdown().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dev.files(".dmp").len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dumps = dev.files(".dmp");
    let mut contents: Vec<Vec<u8>> = dumps.iter().map(|d| std::fs::read(d).unwrap()).collect();
    contents.sort();
    assert_eq!(contents, vec![vec![0u8; 100], vec![1u8; 100]]);
    assert_ne!(sidecar_of(&dumps[0]).session_id, sidecar_of(&dumps[1]).session_id);
}

#[test]
fn stale_partials_are_recovered_in_the_background_after_the_socket_listens() {
    // A partial dump left by a device model that was killed: 1 GiB, sparse, two bytes of data.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dumps");
    std::fs::create_dir(&out).unwrap();
    let stale = out.join("itest-20260101T000000Z-0e5e5e5e-0000-4000-8000-000000000000.dmp.partial");
    let file = std::fs::File::create(&stale).unwrap();
    file.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"x", (1 << 30) - 1).unwrap();
    drop(file);

    let mut dev = Device::start_in(dir, &["--once"]);
    // The card answers while the recovery may still be hashing.
    let vfio = VfioCard::connect(&dev.socket);
    assert_eq!((&vfio).read_register(regs::MAGIC), abi::MAGIC_VALUE);
    let recovered = dev.wait_files(".incomplete.dmp", 1);
    assert_eq!(recovered.len(), 1, "{}", dev.log());
    vfio.client.borrow().shutdown().unwrap();
    drop(vfio);
    assert!(dev.wait().success());
    let log = dev.log();
    let listening = log.find("listening on").expect("listening line");
    let closed = log.find("closed a dump left partial").expect("recovery line");
    assert!(listening < closed, "the socket came first:\n{log}");
    assert_eq!(log.matches("closed a dump left partial").count(), 1, "logged once");
    assert!(!stale.exists());
}
