//! Turning a stream of chunks into a crash-dump file and its sidecar on the host.
//!
//! One [`Session`] is one crash. Its file is written as chunks arrive (`pwrite` at the chunk's
//! offset, so memory does not grow with the dump), under a `.dmp.partial` name while it streams.
//! On `KbDumpIoComplete` the file is fsync'd and only then renamed to `.dmp`; a session that ends
//! any other way is fsync'd and renamed to `.incomplete.dmp`, holding every byte it received. The
//! sidecar is replaced atomically (write, fsync, rename) when the session opens and when it ends.
//! While a session is open its file is locked (`flock`), so that [`recover_stale`] can tell a
//! partial dump left by a dead device model from one that a live one is still writing.

mod coverage;
mod sidecar;

pub use coverage::Coverage;
pub use sidecar::{
    BugCheckInfo, BugCheckSource, BytesByType, DumpState, Sidecar, WriteOrder, SIDECAR_FORMAT,
};

use crashmon_card_abi::{dump_header64, DumpIoType};
use log::{info, warn};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use uuid::Uuid;

/// Suffix of a dump that is still being written.
pub const PARTIAL_SUFFIX: &str = ".dmp.partial";
/// Suffix of a complete dump.
pub const COMPLETE_SUFFIX: &str = ".dmp";
/// Suffix of a dump whose session ended early.
pub const INCOMPLETE_SUFFIX: &str = ".incomplete.dmp";
/// Suffix of a sidecar.
pub const SIDECAR_SUFFIX: &str = ".json";
/// Holes listed in a sidecar at most.
const MAX_LISTED_HOLES: usize = 64;

/// Where and under what limits dumps are captured.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Folder for dumps and sidecars.
    pub output_dir: PathBuf,
    /// Name of the VM, part of every file name; checked by [`valid_vm_name`].
    pub vm_name: String,
    /// No chunk may end past this many bytes.
    pub max_dump_size: u64,
}

/// Whether a VM name is safe as part of a file name: 1 to 64 of `[A-Za-z0-9._-]`, not starting
/// with a dot or dash.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Why a chunk was not written.
#[derive(Debug, Error)]
pub enum ChunkError {
    /// Offset + length overflows.
    #[error("chunk at {offset:#x} of {len} bytes overflows")]
    Overflow {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// The chunk would end past the maximum dump size.
    #[error("chunk ends at {end:#x}, past the maximum dump size {max:#x}")]
    TooLarge {
        /// Where it would end.
        end: u64,
        /// The limit.
        max: u64,
    },
    /// The host could not write it.
    #[error("writing the dump file failed: {0}")]
    Io(#[from] io::Error),
}

/// What a closed session left on disk.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The dump file.
    pub dump_path: PathBuf,
    /// The sidecar.
    pub sidecar_path: PathBuf,
    /// The sidecar's final content.
    pub sidecar: Sidecar,
}

/// One crash being captured.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    base: String,
    file: File,
    max_dump_size: u64,
    sidecar: Sidecar,
    coverage: Coverage,
    /// Where a sequential (Offset -1) chunk goes: the end of the previous chunk.
    cursor: u64,
    /// SHA-256 of `[0, hashed_upto)` while every chunk so far appended exactly at the end, so a
    /// sequential dump is never read back; `None` once the order broke.
    running_hash: Option<(Sha256, u64)>,
}

impl Session {
    /// Opens a session: creates the partial file and writes the first sidecar.
    pub fn open(config: &CaptureConfig, bugcheck: Option<BugCheckInfo>) -> io::Result<Session> {
        let now = chrono::Utc::now();
        let id = Uuid::new_v4();
        let base = format!("{}-{}-{}", config.vm_name, now.format("%Y%m%dT%H%M%SZ"), id);
        let partial = config.output_dir.join(format!("{base}{PARTIAL_SUFFIX}"));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&partial)?;
        // Held until the session closes; see `recover_stale`.
        file.try_lock().map_err(io::Error::other)?;
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.to_owned(),
            session_id: id,
            vm_name: config.vm_name.clone(),
            dump_file: format!("{base}{PARTIAL_SUFFIX}"),
            state: DumpState::Streaming,
            incomplete_reason: None,
            bugcheck,
            started_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ended_at: None,
            size: 0,
            bytes_received: 0,
            bytes_by_type: BytesByType::default(),
            chunks: 0,
            write_order: WriteOrder::None,
            missing_bytes: Some(0),
            missing_ranges: Vec::new(),
            rejected_chunks: 0,
            first_error: None,
            sha256: None,
        };
        let session = Session {
            dir: config.output_dir.clone(),
            base,
            file,
            max_dump_size: config.max_dump_size,
            sidecar,
            coverage: Coverage::default(),
            cursor: 0,
            running_hash: Some((Sha256::new(), 0)),
        };
        session.write_sidecar()?;
        info!("session {} opened: {}", session.sidecar.session_id, partial.display());
        Ok(session)
    }

    /// The sidecar as it stands.
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Path of the file being written.
    pub fn partial_path(&self) -> PathBuf {
        self.dir.join(format!("{}{PARTIAL_SUFFIX}", self.base))
    }

    /// Payload bytes accepted so far.
    pub fn bytes_received(&self) -> u64 {
        self.sidecar.bytes_received
    }

    /// Writes one chunk at `offset`, or after the previous chunk when `offset` is `None`.
    pub fn write(
        &mut self,
        kind: DumpIoType,
        offset: Option<u64>,
        data: &[u8],
    ) -> Result<(), ChunkError> {
        let start = offset.unwrap_or(self.cursor);
        let end = start
            .checked_add(data.len() as u64)
            .ok_or(ChunkError::Overflow { offset: start, len: data.len() })?;
        if end > self.max_dump_size {
            return Err(ChunkError::TooLarge { end, max: self.max_dump_size });
        }
        self.file.write_all_at(data, start)?;

        self.cursor = end;
        self.coverage.insert(start, end);
        self.sidecar.size = self.sidecar.size.max(end);
        self.sidecar.bytes_received += data.len() as u64;
        self.sidecar.chunks += 1;
        match kind {
            DumpIoType::Header => self.sidecar.bytes_by_type.header += data.len() as u64,
            DumpIoType::Body => self.sidecar.bytes_by_type.body += data.len() as u64,
            DumpIoType::SecondaryData => {
                self.sidecar.bytes_by_type.secondary_data += data.len() as u64
            }
            DumpIoType::Invalid | DumpIoType::Complete => {}
        }
        self.sidecar.write_order = match (self.sidecar.write_order, offset.is_some()) {
            (WriteOrder::None | WriteOrder::Sequential, false) => WriteOrder::Sequential,
            (WriteOrder::None | WriteOrder::Explicit, true) => WriteOrder::Explicit,
            _ => WriteOrder::Mixed,
        };
        self.running_hash = match self.running_hash.take() {
            Some((mut hash, upto)) if upto == start && end == self.sidecar.size => {
                hash.update(data);
                Some((hash, end))
            }
            _ => None,
        };
        if self.sidecar.bugcheck.is_none() && kind == DumpIoType::Header && start == 0 {
            self.sidecar.bugcheck = bugcheck_from_header(data);
        }
        Ok(())
    }

    /// Counts a doorbell the card refused during this session.
    pub fn note_refusal(&mut self, what: &str) {
        self.sidecar.rejected_chunks += 1;
        if self.sidecar.first_error.is_none() {
            self.sidecar.first_error = Some(what.to_owned());
        }
    }

    /// Closes the session: complete when `incomplete_reason` is `None`. The file is fsync'd
    /// before it is renamed, and the folder after.
    pub fn finish(mut self, incomplete_reason: Option<&str>) -> io::Result<Finished> {
        self.file.sync_all()?;
        let suffix = if incomplete_reason.is_some() { INCOMPLETE_SUFFIX } else { COMPLETE_SUFFIX };
        let dump_name = format!("{}{suffix}", self.base);
        let dump_path = self.dir.join(&dump_name);

        self.sidecar.sha256 = Some(match self.running_hash.take() {
            Some((hash, upto)) if upto == self.sidecar.size => hex(&hash.finalize()),
            _ => hash_file(&self.file)?,
        });
        self.sidecar.state =
            if incomplete_reason.is_some() { DumpState::Incomplete } else { DumpState::Complete };
        self.sidecar.incomplete_reason = incomplete_reason.map(str::to_owned);
        self.sidecar.ended_at =
            Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        self.sidecar.missing_bytes = self.coverage.covered().map(|c| self.sidecar.size - c);
        self.sidecar.missing_ranges =
            self.coverage.holes(self.sidecar.size, MAX_LISTED_HOLES).unwrap_or_default();

        fs::rename(self.partial_path(), &dump_path)?;
        self.sidecar.dump_file = dump_name;
        self.write_sidecar()?;
        File::open(&self.dir)?.sync_all()?;
        match incomplete_reason {
            None => info!("dump complete: {} ({} bytes)", dump_path.display(), self.sidecar.size),
            Some(why) => warn!(
                "dump incomplete ({why}): {} holds the {} bytes received",
                dump_path.display(),
                self.sidecar.bytes_received
            ),
        }
        Ok(Finished { dump_path, sidecar_path: self.sidecar_path(), sidecar: self.sidecar })
    }

    fn sidecar_path(&self) -> PathBuf {
        self.dir.join(format!("{}{SIDECAR_SUFFIX}", self.base))
    }

    fn write_sidecar(&self) -> io::Result<()> {
        write_json_atomically(&self.sidecar_path(), &self.sidecar)
    }
}

/// Reads the bug check from a `DUMP_HEADER64` at the start of a header chunk.
fn bugcheck_from_header(data: &[u8]) -> Option<BugCheckInfo> {
    let fields = data.get(..dump_header64::BUGCHECK_FIELDS_END)?;
    if fields[..8] != dump_header64::SIGNATURE {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(fields[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(fields[at..at + 8].try_into().unwrap_or_default());
    let p = dump_header64::BUGCHECK_PARAMETER1;
    Some(BugCheckInfo::new(
        u32_at(dump_header64::BUGCHECK_CODE),
        [u64_at(p), u64_at(p + 8), u64_at(p + 16), u64_at(p + 24)],
        BugCheckSource::DumpHeader,
    ))
}

fn write_json_atomically(path: &Path, value: &Sidecar) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut file, value).map_err(io::Error::other)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

fn hash_file(file: &File) -> io::Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex(&hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Closes partial dumps that a device model which died mid-capture left in `dir`: each one whose
/// lock nobody holds is renamed to `.incomplete.dmp` and its sidecar marked incomplete.
/// Returns what it closed.
pub fn recover_stale(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut recovered = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(base) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
            .map(str::to_owned)
        else {
            continue;
        };
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        if file.try_lock().is_err() {
            continue; // a live device model is writing it
        }
        file.sync_all()?;
        let dump_name = format!("{base}{INCOMPLETE_SUFFIX}");
        let sidecar_path = dir.join(format!("{base}{SIDECAR_SUFFIX}"));
        let size = file.metadata()?.len();
        let sha = hash_file(&file)?;
        fs::rename(&path, dir.join(&dump_name))?;
        if let Some(mut sidecar) =
            fs::read(&sidecar_path).ok().and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
        {
            sidecar.dump_file = dump_name.clone();
            sidecar.state = DumpState::Incomplete;
            sidecar.incomplete_reason = Some("device model exited during capture".to_owned());
            sidecar.size = size;
            sidecar.missing_bytes = None;
            sidecar.sha256 = Some(sha);
            write_json_atomically(&sidecar_path, &sidecar)?;
        }
        warn!("recovered a partial dump left by an earlier run: {dump_name}");
        recovered.push(dir.join(dump_name));
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max: u64) -> CaptureConfig {
        CaptureConfig { output_dir: dir.to_owned(), vm_name: "vm1".into(), max_dump_size: max }
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn read_sidecar(f: &Finished) -> Sidecar {
        serde_json::from_slice(&fs::read(&f.sidecar_path).unwrap()).unwrap()
    }

    #[test]
    fn sequential_dump_is_reassembled_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::open(&config(dir.path(), 1 << 30), None).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        s.write(DumpIoType::Header, None, &data[..4096]).unwrap();
        for c in data[4096..].chunks(1000) {
            s.write(DumpIoType::Body, None, c).unwrap();
        }
        let f = s.finish(None).unwrap();
        assert_eq!(fs::read(&f.dump_path).unwrap(), data);
        assert!(f.dump_path.to_str().unwrap().ends_with(".dmp"));
        let sc = read_sidecar(&f);
        assert_eq!(sc.state, DumpState::Complete);
        assert_eq!(sc.sha256.as_deref(), Some(sha(&data).as_str()));
        assert_eq!(sc.write_order, WriteOrder::Sequential);
        assert_eq!(sc.bytes_by_type.header, 4096);
        assert_eq!(sc.bytes_by_type.body, 100_000 - 4096);
        assert_eq!(sc.missing_bytes, Some(0));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no partial or temp file left");
    }

    #[test]
    fn out_of_order_with_overlap_and_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::open(&config(dir.path(), 1 << 30), None).unwrap();
        s.write(DumpIoType::Body, Some(8192), &[2u8; 4096]).unwrap();
        s.write(DumpIoType::Header, Some(0), &[1u8; 4096]).unwrap();
        s.write(DumpIoType::Body, Some(8192 + 2048), &[3u8; 4096]).unwrap(); // overlaps, later wins
        let f = s.finish(None).unwrap();
        let got = fs::read(&f.dump_path).unwrap();
        let mut want = vec![1u8; 4096];
        want.extend([0u8; 4096]); // the hole reads as zeros
        want.extend([2u8; 2048]);
        want.extend([3u8; 4096]);
        assert_eq!(got, want);
        let sc = read_sidecar(&f);
        assert_eq!(sc.write_order, WriteOrder::Explicit);
        assert_eq!(sc.missing_bytes, Some(4096));
        assert_eq!(sc.missing_ranges, vec![[4096, 8192]]);
        assert_eq!(sc.sha256.as_deref(), Some(sha(&want).as_str()), "hash read back from disk");
    }

    #[test]
    fn limits_refuse_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::open(&config(dir.path(), 8192), None).unwrap();
        s.write(DumpIoType::Body, None, &[9u8; 8192]).unwrap();
        assert!(matches!(
            s.write(DumpIoType::Body, None, &[1u8]),
            Err(ChunkError::TooLarge { end: 8193, max: 8192 })
        ));
        assert!(matches!(
            s.write(DumpIoType::Body, Some(u64::MAX - 1), &[1u8; 4]),
            Err(ChunkError::Overflow { .. })
        ));
        s.note_refusal("too-large");
        let f = s.finish(Some("aborted by guest driver")).unwrap();
        assert!(f.dump_path.to_str().unwrap().ends_with(".incomplete.dmp"));
        assert_eq!(fs::read(&f.dump_path).unwrap(), vec![9u8; 8192]);
        let sc = read_sidecar(&f);
        assert_eq!(sc.state, DumpState::Incomplete);
        assert_eq!(sc.incomplete_reason.as_deref(), Some("aborted by guest driver"));
        assert_eq!(sc.rejected_chunks, 1);
    }

    #[test]
    fn bugcheck_is_read_from_dump_header64() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::open(&config(dir.path(), 1 << 20), None).unwrap();
        let mut header = vec![0u8; 4096];
        header[..8].copy_from_slice(b"PAGEDU64");
        header[0x38..0x3c].copy_from_slice(&0xD1u32.to_le_bytes());
        for i in 0..4 {
            let at = 0x40 + 8 * i;
            header[at..at + 8].copy_from_slice(&(0xfffff800_00000000u64 + i as u64).to_le_bytes());
        }
        s.write(DumpIoType::Header, None, &header).unwrap();
        let sc = s.finish(None).unwrap().sidecar;
        let bc = sc.bugcheck.unwrap();
        assert_eq!(bc.code, "0x000000d1");
        assert_eq!(bc.parameters[3], "0xfffff80000000003");
        assert_eq!(bc.source, BugCheckSource::DumpHeader);
    }

    #[test]
    fn two_sessions_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let a = Session::open(&config(dir.path(), 1 << 20), None).unwrap();
        let b = Session::open(&config(dir.path(), 1 << 20), None).unwrap();
        assert_ne!(a.partial_path(), b.partial_path());
    }

    #[test]
    fn stale_partials_are_recovered_but_live_ones_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = Session::open(&config(dir.path(), 1 << 20), None).unwrap();
        live.write(DumpIoType::Body, None, b"live").unwrap();
        // A dead device model: the file exists but nobody holds its lock.
        let mut dead = Session::open(&config(dir.path(), 1 << 20), None).unwrap();
        dead.write(DumpIoType::Body, None, b"dead bytes").unwrap();
        let dead_partial = dead.partial_path();
        std::mem::drop(dead);
        let recovered = recover_stale(dir.path()).unwrap();
        assert_eq!(recovered.len(), 1);
        assert!(!dead_partial.exists());
        assert_eq!(fs::read(&recovered[0]).unwrap(), b"dead bytes");
        assert!(live.partial_path().exists());
    }

    #[test]
    fn vm_names() {
        assert!(valid_vm_name("win11-ci_03.a"));
        for bad in ["", "../x", "a/b", ".hidden", "-x", "sp ace", &"x".repeat(65)] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }
}
