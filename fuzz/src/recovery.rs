//! The `recovery` target: what an earlier run (or anything else with write access) left in the
//! output folder, and `capture::recover_stale` closing it at startup.
//!
//! The input is a list of entries ([`Entry`]): partial dumps, sidecars (well-formed with fuzzed
//! fields, or raw bytes), symbolic links pointing out of the folder, folders and FIFOs with dump
//! names, a partial that a live device model still holds locked, and odd names. Beside the output
//! folder sit sentinel files that the links point at.
//!
//! Invariants: no panic and no hang (libFuzzer's timeout); the sentinels outside the folder are
//! untouched and no file appears beside them; a locked partial is left alone; every sidecar that
//! recovery wrote parses and says `incomplete`; every dump it reports is a regular file in the
//! folder.

use crate::Input;
use crashmon_device_model::capture::{self, DumpState, Sidecar};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Entries per input at most.
const MAX_ENTRIES: usize = 24;
/// Sentinels outside the output folder, and what they hold.
const SENTINELS: [&str; 3] = ["outside", "outside.json", "outside.json.tmp"];
const SENTINEL_BYTES: &[u8] = b"outside the output folder: never written by recovery\n";

/// One thing in the output folder. `base` picks the name's stem; names are
/// `base + suffix`.
#[derive(Clone, Debug)]
pub enum Entry {
    /// A partial dump of `len` bytes of a pattern; `sparse` pushes its size to `len * 4` (at
    /// most 256 KiB: recovery hashes the holes' zeros, and at 4 MiB hashing took half of every
    /// execution without reaching any other code).
    Partial { base: Vec<u8>, len: u16, seed: u8, sparse: bool },
    /// A sidecar made from the given fields (a well-formed one, for recovery to rewrite).
    Sidecar { base: Vec<u8>, size: u64, state: u8, dump_file: Vec<u8> },
    /// Raw bytes as `base.json`.
    RawSidecar { base: Vec<u8>, bytes: Vec<u8> },
    /// A symbolic link named `base + suffix` to a sentinel outside the folder.
    Link { base: Vec<u8>, suffix: u8, target: u8 },
    /// A folder named `base + suffix`.
    Dir { base: Vec<u8>, suffix: u8 },
    /// A FIFO named `base + suffix`.
    Fifo { base: Vec<u8>, suffix: u8 },
    /// A partial dump held locked, as a live device model holds its own.
    Locked { base: Vec<u8> },
}

const SUFFIXES: [&str; 6] = [".dmp.partial", ".json", ".json.tmp", ".incomplete.dmp", ".dmp", ""];

impl Entry {
    const COUNT: u8 = 7;

    fn decode(i: &mut Input) -> Entry {
        let kind = i.u8() % Self::COUNT;
        let base_len = (i.u8() % 24) as usize;
        let base = i.bytes(base_len).to_vec();
        match kind {
            0 => Entry::Partial { base, len: i.u16(), seed: i.u8(), sparse: i.u8() & 1 != 0 },
            1 => {
                let (size, state) = (i.u64(), i.u8());
                let n = (i.u8() % 40) as usize;
                Entry::Sidecar { base, size, state, dump_file: i.bytes(n).to_vec() }
            }
            2 => {
                let n = i.u16() as usize % 2048;
                Entry::RawSidecar { base, bytes: i.bytes(n).to_vec() }
            }
            3 => Entry::Link { base, suffix: i.u8(), target: i.u8() },
            4 => Entry::Dir { base, suffix: i.u8() },
            5 => Entry::Fifo { base, suffix: i.u8() },
            _ => Entry::Locked { base },
        }
    }

    /// The bytes that decode to this entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let head = |out: &mut Vec<u8>, kind: u8, base: &[u8]| {
            out.push(kind);
            out.push(base.len() as u8);
            out.extend(base);
        };
        match self {
            Entry::Partial { base, len, seed, sparse } => {
                head(out, 0, base);
                out.extend(len.to_le_bytes());
                out.extend([*seed, *sparse as u8]);
            }
            Entry::Sidecar { base, size, state, dump_file } => {
                head(out, 1, base);
                out.extend(size.to_le_bytes());
                out.extend([*state, dump_file.len() as u8]);
                out.extend(dump_file);
            }
            Entry::RawSidecar { base, bytes } => {
                head(out, 2, base);
                out.extend((bytes.len() as u16).to_le_bytes());
                out.extend(bytes);
            }
            Entry::Link { base, suffix, target } => {
                head(out, 3, base);
                out.extend([*suffix, *target]);
            }
            Entry::Dir { base, suffix } => {
                head(out, 4, base);
                out.push(*suffix);
            }
            Entry::Fifo { base, suffix } => {
                head(out, 5, base);
                out.push(*suffix);
            }
            Entry::Locked { base } => head(out, 6, base),
        }
    }
}

/// An input made of `entries`.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode(&mut out);
    }
    out
}

/// A file name from fuzzed bytes: '/' and NUL cannot be in one.
fn name(base: &[u8], suffix: &str) -> PathBuf {
    let mut bytes: Vec<u8> =
        base.iter().map(|&b| if b == b'/' || b == 0 { b'_' } else { b }).collect();
    bytes.extend(suffix.as_bytes());
    if bytes.is_empty() || bytes == b"." || bytes == b".." {
        bytes.push(b'x');
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&bytes))
}

fn sidecar_json(base: &[u8], size: u64, state: u8, dump_file: &[u8]) -> Vec<u8> {
    let state = ["streaming", "complete", "incomplete", "bogus"][state as usize % 4];
    let json = serde_json::json!({
        "format": "crashmon-sidecar/1",
        "session_id": "6a1f3e57-8a59-4c39-9f51-6b1c1e0e0c01",
        "vm_name": String::from_utf8_lossy(base),
        "dump_file": String::from_utf8_lossy(dump_file),
        "state": state,
        "incomplete_reason": null,
        "bugcheck": null,
        "started_at": "2026-01-01T00:00:00.000Z",
        "ended_at": null,
        "size": size,
        "bytes_received": size,
        "bytes_by_type": {"header": 0, "body": size, "secondary_data": 0},
        "chunks": 1,
        "write_order": "sequential",
        "missing_bytes": 0,
        "missing_ranges": [],
        "rejected_chunks": 0,
        "first_error": null,
        "sha256": null
    });
    serde_json::to_vec_pretty(&json).unwrap()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let root = crate::scratch_root("recovery");
    let out = root.join("out");
    crate::fresh_dir(&out);
    for s in SENTINELS {
        fs::write(root.join(s), SENTINEL_BYTES).unwrap();
    }
    let mut input = Input::new(data);
    let mut written: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut locked: Vec<(PathBuf, File)> = Vec::new();
    for _ in 0..MAX_ENTRIES {
        if input.is_empty() {
            break;
        }
        let entry = Entry::decode(&mut input);
        let _ = make(&root, &out, &entry, &mut written, &mut locked);
    }

    let recovered = capture::recover_stale(&out);

    let mut outside = crate::names(&root);
    outside.retain(|n| n != "out");
    assert_eq!(outside, SENTINELS.map(str::to_owned).to_vec(), "a file appeared outside");
    for s in SENTINELS {
        assert_eq!(fs::read(root.join(s)).unwrap(), SENTINEL_BYTES, "{s} outside was written");
    }
    for (path, _) in &locked {
        assert!(path.exists(), "{} is held by a live device model but was moved", path.display());
    }
    for path in &recovered {
        assert_eq!(path.parent(), Some(out.as_path()), "{} is outside", path.display());
        let meta = fs::symlink_metadata(path).unwrap();
        assert!(meta.is_file(), "{} recovered is not a regular file", path.display());
    }
    for entry in fs::read_dir(&out).unwrap().flatten() {
        let path = entry.path();
        let is_json = path.extension().is_some_and(|e| e == "json");
        let meta = fs::symlink_metadata(&path).unwrap();
        if !is_json || !meta.is_file() {
            continue;
        }
        let now = fs::read(&path).unwrap();
        if written.get(&path) == Some(&now) {
            continue; // left as it was
        }
        let sc: Sidecar = serde_json::from_slice(&now).unwrap_or_else(|e| {
            panic!("{} written by recovery does not parse: {e}", path.display())
        });
        assert_eq!(sc.state, DumpState::Incomplete, "{}", path.display());
    }
    drop(locked);
}

fn make(
    root: &Path,
    out: &Path,
    entry: &Entry,
    written: &mut BTreeMap<PathBuf, Vec<u8>>,
    locked: &mut Vec<(PathBuf, File)>,
) -> std::io::Result<()> {
    match entry {
        Entry::Partial { base, len, seed, sparse } => {
            let path = out.join(name(base, capture::PARTIAL_SUFFIX));
            let data: Vec<u8> =
                (0..*len as usize).map(|i| seed.wrapping_add(i as u8).rotate_left(3)).collect();
            let file = create(&path, &data)?;
            if *sparse {
                file.set_len(*len as u64 * 4)?;
            }
        }
        Entry::Sidecar { base, size, state, dump_file } => {
            let path = out.join(name(base, capture::SIDECAR_SUFFIX));
            let bytes = sidecar_json(base, *size, *state, dump_file);
            create(&path, &bytes)?;
            written.insert(path, bytes);
        }
        Entry::RawSidecar { base, bytes } => {
            let path = out.join(name(base, capture::SIDECAR_SUFFIX));
            create(&path, bytes)?;
            written.insert(path, bytes.clone());
        }
        Entry::Link { base, suffix, target } => {
            let path = out.join(name(base, SUFFIXES[*suffix as usize % SUFFIXES.len()]));
            let target = root.join(SENTINELS[*target as usize % SENTINELS.len()]);
            std::os::unix::fs::symlink(target, path)?;
        }
        Entry::Dir { base, suffix } => {
            fs::create_dir(out.join(name(base, SUFFIXES[*suffix as usize % SUFFIXES.len()])))?;
        }
        Entry::Fifo { base, suffix } => {
            let path = out.join(name(base, SUFFIXES[*suffix as usize % SUFFIXES.len()]));
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        }
        Entry::Locked { base } => {
            let path = out.join(name(base, capture::PARTIAL_SUFFIX));
            let file = File::options().read(true).write(true).create_new(true).open(&path)?;
            file.try_lock().map_err(std::io::Error::other)?;
            locked.push((path, file));
        }
    }
    Ok(())
}

/// Creates a new file: never through a link an earlier entry made (the harness must not write
/// outside the folder itself).
fn create(path: &Path, data: &[u8]) -> std::io::Result<File> {
    use std::io::Write;
    let mut file = File::options().write(true).create_new(true).open(path)?;
    file.write_all(data)?;
    Ok(file)
}
