//! The seed corpora in `fuzz/corpus/<target>/`: a handful of meaningful inputs per target.
//!
//! `CRASHMON_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml --lib` (re)writes them;
//! without the variable the test replays every committed seed through its target, as the fuzzer
//! would, so a seed that stops meaning what it says (or crashes) fails here.

use crate::card::{self, Op};
use crate::recovery::{self, Entry};
use crate::vfio::msg;
use crashmon_card_abi::{control, regs, DumpIoType};
use std::path::PathBuf;

fn card_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let arm = Op::Control { value: control::ARM as u8 };
    let announce = Op::Control { value: control::ANNOUNCE as u8 };
    let fill = |slot, seed| Op::Fill { slot, at: 0, len: 4096, seed };
    let seq =
        |slot, len| Op::Chunk { slot, len, kind: DumpIoType::Body as u8, flags: 1, offset: 0 };
    let at =
        |slot, len, offset| Op::Chunk { slot, len, kind: DumpIoType::Body as u8, flags: 0, offset };
    vec![
        (
            "announced-sequential-complete",
            card::encode(
                1,
                &[
                    Op::Reg { reg: 1, value: 0xD1 },
                    arm.clone(),
                    announce.clone(),
                    fill(0, 1),
                    Op::Chunk {
                        slot: 0,
                        len: 4096,
                        kind: DumpIoType::Header as u8,
                        flags: 1,
                        offset: 0,
                    },
                    fill(1, 2),
                    seq(1, 4096),
                    Op::Wait,
                    fill(0, 3),
                    seq(0, 1000),
                    Op::Complete,
                    Op::Wait,
                ],
            ),
        ),
        (
            "explicit-offsets-out-of-order",
            card::encode(
                1,
                &[
                    arm.clone(),
                    fill(2, 9),
                    at(2, 512, 8192),
                    fill(3, 7),
                    at(3, 512, 0),
                    Op::Wait,
                    Op::Complete,
                ],
            ),
        ),
        (
            "refusals-too-large-bad-slot-busy",
            card::encode(
                0,
                &[
                    arm.clone(),
                    fill(0, 5),
                    seq(0, 4000),
                    seq(0, 4000), // slot still owned or past the maximum
                    Op::Chunk { slot: 5, len: 10, kind: 2, flags: 1, offset: 0 },
                    Op::Chunk { slot: 1, len: 10, kind: 0, flags: 1, offset: 0 },
                    Op::Chunk { slot: 1, len: 10, kind: 2, flags: 2, offset: 3 },
                    Op::Chunk { slot: 1, len: 10, kind: 2, flags: 4, offset: 0 },
                    Op::Complete,
                ],
            ),
        ),
        (
            "reset-mid-stream-then-second-session",
            card::encode(
                1,
                &[
                    arm.clone(),
                    fill(0, 1),
                    seq(0, 100),
                    Op::BusReset,
                    arm.clone(),
                    seq(1, 100),
                    Op::Control {
                        value: (control::RESET | control::ARM | control::ANNOUNCE) as u8,
                    },
                    seq(2, 100),
                    Op::Disconnect,
                ],
            ),
        ),
        (
            "guest-rewrites-an-owned-slot",
            card::encode(
                2,
                &[
                    arm.clone(),
                    fill(0, 1),
                    seq(0, 4096),
                    fill(0, 2),
                    seq(1, 10),
                    Op::Fill { slot: 1, at: 5, len: 3, seed: 8 },
                    Op::Complete,
                ],
            ),
        ),
        (
            "raw-register-accesses",
            card::encode(
                0,
                &[
                    Op::Read { offset: regs::STATUS as u16, width: 2 },
                    Op::Write { offset: regs::CHUNK_OFFSET_LO as u16, width: 1, value: u64::MAX },
                    Op::Write {
                        offset: regs::CONTROL as u16,
                        width: 0,
                        value: control::ARM as u64,
                    },
                    Op::Write { offset: regs::DOORBELL as u16, width: 0, value: 1 },
                    Op::Write { offset: 0x8000, width: 0, value: 0 },
                    Op::Read { offset: regs::BYTES_WRITTEN_LO as u16, width: 1 },
                    Op::Control { value: 0xFF },
                    Op::Control { value: control::ABORT as u8 },
                ],
            ),
        ),
        (
            "dma-probe-chunks-guest-writes-unmap",
            card::encode(
                1,
                &[
                    Op::DmaProbe { at: 0x40 },
                    Op::DmaProbe { at: 0xFFF0 }, // runs past guest memory: refused
                    arm.clone(),
                    announce.clone(),
                    Op::DmaChunk {
                        slot: 0,
                        kind: DumpIoType::Header as u8,
                        flags: 1,
                        offset: 0,
                        ranges: vec![(0x1000, 0x1000), (0x100, 0x20)],
                    },
                    Op::GuestWrite { at: 0x1000, len: 64, seed: 3 },
                    Op::DmaChunk {
                        slot: 1,
                        kind: DumpIoType::Body as u8,
                        flags: 1,
                        offset: 0,
                        ranges: vec![(0xF000, 0x2000)], // past the end: BAD_DMA
                    },
                    Op::DmaChunk { slot: 1, kind: 2, flags: 2, offset: 0, ranges: vec![(0, 8)] },
                    Op::DmaChunk { slot: 1, kind: 2, flags: 8, offset: 0, ranges: vec![(0, 8)] },
                    Op::DmaChunk {
                        slot: 2,
                        kind: 2,
                        flags: 0,
                        offset: 0x2000,
                        ranges: vec![(0x20, 0x300)],
                    },
                    Op::Wait,
                    Op::DmaMap { remap: false },
                    Op::DmaChunk { slot: 3, kind: 2, flags: 1, offset: 0, ranges: vec![(0, 8)] },
                    Op::DmaMap { remap: true },
                    fill(3, 4),
                    seq(3, 100),
                    Op::Complete,
                    Op::Wait,
                ],
            ),
        ),
    ]
}

fn vfio_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crashmon_card_abi::BAR0_INDEX;
    let bar0 = BAR0_INDEX as u32;
    let cfg = 7u32;
    let w = |id, reg: u32, v: u32| {
        msg::region(id, msg::REGION_WRITE, bar0, reg as u64, 4, &v.to_le_bytes())
    };
    let handshake = [
        msg::version(0),
        msg::words(1, msg::DEVICE_GET_INFO, &[16, 0, 0, 0]),
        msg::words(2, msg::DEVICE_GET_REGION_INFO, &[32, 0, 2, 0, 0, 0, 0, 0]),
        msg::words(3, msg::GET_IRQ_INFO, &[16, 0, 4, 0]),
        msg::region(4, msg::REGION_READ, cfg, 0, 4, &[]),
    ]
    .concat();
    let stream = [
        handshake.clone(),
        w(5, regs::CONTROL, control::ARM),
        w(6, regs::CONTROL, control::ANNOUNCE),
        msg::region(7, msg::REGION_WRITE, 2, 0, 8, b"PAGEDU64"),
        w(8, regs::CHUNK_LENGTH, 8),
        w(9, regs::CHUNK_TYPE, DumpIoType::Header as u32),
        w(10, regs::CHUNK_SLOT, 0),
        msg::region(
            11,
            msg::REGION_WRITE,
            bar0,
            regs::CHUNK_OFFSET_LO as u64,
            8,
            &u64::MAX.to_le_bytes(),
        ),
        w(12, regs::DOORBELL, 1),
        msg::region(13, msg::REGION_READ, bar0, regs::COMPLETED as u64, 4, &[]),
        w(14, regs::CHUNK_LENGTH, 0),
        w(15, regs::CHUNK_TYPE, DumpIoType::Complete as u32),
        w(16, regs::DOORBELL, 1),
        msg::region(17, msg::REGION_READ, bar0, regs::STATUS as u64, 4, &[]),
    ]
    .concat();
    let with = |control: u8, bytes: Vec<u8>| [vec![control], bytes].concat();
    vec![
        ("handshake", with(0, handshake.clone())),
        ("arm-announce-stream-complete", with(0, stream)),
        (
            "dma-map-with-fd-then-unmap",
            with(
                1 + (16 << 1),
                [
                    msg::dma_map(1, 0, 1 << 16),
                    msg::words(2, msg::DMA_UNMAP, &[24, 0, 0, 0, 1 << 16, 0]),
                ]
                .concat(),
            ),
        ),
        (
            "set-irqs-and-reset",
            with(
                0,
                [
                    handshake,
                    msg::words(5, msg::SET_IRQS, &[20, 0x24, 4, 0, 1]),
                    msg::message(6, msg::DEVICE_RESET, &[]),
                ]
                .concat(),
            ),
        ),
        (
            "config-space-writes",
            with(
                0,
                [
                    msg::region(1, msg::REGION_WRITE, cfg, 4, 2, &[6, 0]),
                    msg::region(2, msg::REGION_WRITE, cfg, 0x10, 4, &[0xff; 4]),
                    msg::region(3, msg::REGION_READ, cfg, 0x10, 4, &[]),
                    msg::region(4, msg::REGION_READ, 2, (4 << 20) - 2, 4, &[]),
                ]
                .concat(),
            ),
        ),
    ]
}

fn recovery_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let b = |s: &str| s.as_bytes().to_vec();
    let stem = "vm-20260101T000000Z-6a1f3e57-8a59-4c39-9f51-6b1c1e0e0c01";
    vec![
        (
            "partial-with-sidecar",
            recovery::encode(&[
                Entry::Partial { base: b(stem), len: 5000, seed: 1, sparse: false },
                Entry::Sidecar {
                    base: b(stem),
                    size: 0,
                    state: 0,
                    dump_file: b(&format!("{stem}.dmp.partial")),
                },
            ]),
        ),
        (
            "partial-without-sidecar-and-sparse",
            recovery::encode(&[
                Entry::Partial { base: b("a"), len: 100, seed: 2, sparse: false },
                Entry::Partial { base: b("b"), len: 64, seed: 3, sparse: true },
            ]),
        ),
        (
            "live-partial-is-left",
            recovery::encode(&[
                Entry::Locked { base: b("live") },
                Entry::Sidecar {
                    base: b("live"),
                    size: 0,
                    state: 0,
                    dump_file: b("live.dmp.partial"),
                },
            ]),
        ),
        (
            "garbage-sidecar",
            recovery::encode(&[
                Entry::Partial { base: b("g"), len: 10, seed: 4, sparse: false },
                Entry::RawSidecar { base: b("g"), bytes: b("{\"format\": 3, \"size\": -1") },
            ]),
        ),
        (
            "links-out-of-the-folder",
            recovery::encode(&[
                Entry::Link { base: b("l"), suffix: 0, target: 0 },
                Entry::Partial { base: b("m"), len: 10, seed: 5, sparse: false },
                Entry::Link { base: b("m"), suffix: 1, target: 1 },
                Entry::Link { base: b("m"), suffix: 2, target: 2 },
            ]),
        ),
        (
            "folders-and-fifos-with-dump-names",
            recovery::encode(&[
                Entry::Dir { base: b("d"), suffix: 0 },
                Entry::Partial { base: b("f"), len: 10, seed: 6, sparse: false },
                Entry::Fifo { base: b("f"), suffix: 1 },
                Entry::Partial { base: b("i"), len: 10, seed: 7, sparse: false },
                Entry::Dir { base: b("i"), suffix: 3 },
            ]),
        ),
    ]
}

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

/// A target's name, its named seeds, and its entry point.
type Target = (&'static str, Vec<(&'static str, Vec<u8>)>, fn(&[u8]));

#[test]
fn seed_corpora() {
    let write = std::env::var_os("CRASHMON_WRITE_SEEDS").is_some();
    let targets: [Target; 3] = [
        ("card", card_seeds(), card::run),
        ("vfio_messages", vfio_seeds(), crate::vfio::run),
        ("recovery", recovery_seeds(), recovery::run),
    ];
    for (target, seeds, run) in targets {
        let dir = corpus(target);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            eprintln!("{target}: {}", entry.file_name().to_string_lossy());
            run(&std::fs::read(entry.path()).unwrap());
        }
    }
}
