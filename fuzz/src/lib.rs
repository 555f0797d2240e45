//! crashmon's fuzz targets, as plain functions of the input bytes so that the seed corpora can
//! be made (and replayed) by an ordinary test: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! * [`card`]: the card as a hostile guest drives it, against a model of what must be on disk;
//! * [`vfio`]: raw vfio-user messages from a hostile QEMU to the real server and backend;
//! * [`recovery`]: what a previous run may have left in the output directory.
//!
//! Each target decodes its input with [`Input`], a reader that yields zeros once the bytes run
//! out, so that every input means something and small mutations stay small.

pub mod card;
pub mod recovery;
pub mod vfio;

use std::path::PathBuf;

/// Reads fixed-width little-endian fields; past the end, every field is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// The rest.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn int<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let src = self.bytes(N);
        b[..src.len()].copy_from_slice(src);
        b
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.int::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.int())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.int())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.int())
    }
}

/// A scratch folder for one fuzzing process, on tmpfs when there is one (every input writes
/// files: on a disk the fuzzer would measure the disk), removed and made anew for each input.
/// The process id keeps parallel fuzzers (`-jobs`, `-fork`) apart.
pub fn scratch_root(target: &str) -> PathBuf {
    let base = std::env::var_os("CRASHMON_FUZZ_TMP").map(PathBuf::from).unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    base.join(format!("crashmon-fuzz-{target}-{}", std::process::id()))
}

/// Empties `dir` (made if missing).
pub fn fresh_dir(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("cannot make the fuzzer's scratch folder");
}

/// Every name in `dir`, sorted.
pub fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod seeds;

/// The host's disk limits switched off for fuzzing: every input starts from an empty folder, and
/// a guest opening many sessions in one input is the card's business (HOST_BUSY), not a quota's.
pub const NO_LIMITS: crashmon_device_model::capture::quota::Limits =
    crashmon_device_model::capture::quota::Limits {
        keep: None,
        max_total_size: None,
        min_free: 0,
        max_sessions_per_hour: u32::MAX,
    };
