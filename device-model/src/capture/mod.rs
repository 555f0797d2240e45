//! Turning a stream of chunks into a crash-dump file and its sidecar on the host.
//!
//! One [`Session`] is one crash. It is owned by its writer thread ([`writer`]), never by the
//! vfio-user message loop: every file operation here may wait for the disk. Its file is written
//! as chunks arrive (`pwrite` at the chunk's offset, so memory does not grow with the dump),
//! under a `.dmp.partial` name while it streams. On `KbDumpIoComplete` the file is fsync'd and
//! only then renamed to `.dmp`; a session that ends any other way is fsync'd and renamed to
//! `.incomplete.dmp`, holding every byte it received. The sidecar is replaced atomically (write,
//! rename) when the session opens and when it ends (then fsync'd too). While a session is open
//! its file is locked (`flock`), so that [`recover_stale`] can tell a partial dump left by a dead
//! device model from one that a live one is still writing.

mod coverage;
mod hash;
pub mod quota;
mod sidecar;
pub mod writer;

pub use coverage::Coverage;
pub use sidecar::{
    time as sidecar_time, BugCheckInfo, BugCheckSource, BytesByType, DumpState, HashSource,
    Sidecar, WriteOrder, SIDECAR_FORMAT,
};

use chrono::{DateTime, Utc};
use crashmon_card_abi::{dump_header64, DumpIoType};
use hash::RunningHash;
use log::{info, warn};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
/// The unit of zero-page skipping: a page of the file, as Windows' dumps are made of pages.
const SPARSE_PAGE: u64 = 4096;

/// Whether `page` is all zeros. Looks at the first bytes first (most pages that are not zero
/// differ there), then ORs the rest a word at a time without branching, which the compiler
/// vectorizes: the check must keep up with the card.
fn is_zero(page: &[u8]) -> bool {
    let (head, rest) = page.split_at(page.len().min(64));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    let mut words = rest.chunks_exact(8);
    let acc = words.by_ref().fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("chunks_exact(8) yields 8 bytes"))
    });
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Mode of dumps and sidecars unless told otherwise: a dump is a copy of the guest's RAM, with
/// its keys and passwords, so only the device model's user may read it.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// Where and under what limits dumps are captured.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Folder for dumps and sidecars.
    pub output_dir: PathBuf,
    /// Name of the VM, part of every file name; checked by [`valid_vm_name`].
    pub vm_name: String,
    /// No chunk may end past this many bytes.
    pub max_dump_size: u64,
    /// Permission bits of dumps and sidecars (at most 0o660).
    pub file_mode: u32,
    /// Group given to dumps and sidecars, if any (for an operators' group).
    pub file_group: Option<u32>,
    /// Where events go (disabled unless `--events` or a hook was given).
    pub events: crate::events::Events,
    /// How much of the disk a VM's dumps may take.
    pub limits: quota::Limits,
    /// Leave all-zero pages out of the file as holes (the default; `--no-sparse` writes every
    /// byte, for filesystems or backup tools that handle sparse files badly).
    pub sparse: bool,
}

impl CaptureConfig {
    /// Dumps of `vm_name` in `output_dir`, each at most `max_dump_size` bytes, private.
    pub fn new(output_dir: impl Into<PathBuf>, vm_name: &str, max_dump_size: u64) -> Self {
        Self {
            output_dir: output_dir.into(),
            vm_name: vm_name.to_owned(),
            max_dump_size,
            file_mode: DEFAULT_FILE_MODE,
            file_group: None,
            events: crate::events::Events::disabled(),
            limits: quota::Limits::default(),
            sparse: true,
        }
    }

    /// Creates `path` (which must not exist) with the configured mode and group.
    fn create_file(&self, path: &Path, read: bool) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        // Exclusively, and never through a link planted under the name.
        let file = OpenOptions::new()
            .read(read)
            .write(true)
            .create_new(true)
            .mode(self.file_mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)?;
        // The umask may have taken bits away; the mode asked for is the mode wanted.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(self.file_mode))?;
        if let Some(gid) = self.file_group {
            std::os::unix::fs::fchown(&file, None, Some(gid))?;
        }
        Ok(file)
    }
}

/// Whether a VM name is safe as part of a file name: 1 to 64 of `[A-Za-z0-9._-]`, not starting
/// with a dot or dash.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Why a chunk was not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
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
}

/// Where a chunk goes in the file: checked against the limits from memory alone, so that the
/// card can refuse a bad chunk before it reaches the writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placement {
    /// Where a sequential (Offset -1) chunk goes: the end of the previous chunk.
    cursor: u64,
}

impl Placement {
    /// The absolute `[start, end)` of a chunk of `len` bytes at `offset` (`None`: after the
    /// previous chunk), within `max`; advances the cursor when it fits.
    pub fn place(&mut self, offset: Option<u64>, len: usize, max: u64) -> Result<u64, ChunkError> {
        let start = offset.unwrap_or(self.cursor);
        let end =
            start.checked_add(len as u64).ok_or(ChunkError::Overflow { offset: start, len })?;
        if end > max {
            return Err(ChunkError::TooLarge { end, max });
        }
        self.cursor = end;
        Ok(start)
    }
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

/// Names a session before its file exists: made by the card when the session opens, so that the
/// message loop can log it without touching the disk.
#[derive(Clone, Debug)]
pub struct SessionName {
    /// Unique per crash.
    pub id: Uuid,
    /// When the session opened.
    pub started: DateTime<Utc>,
}

impl SessionName {
    /// A fresh name, now.
    pub fn new() -> Self {
        Self { id: Uuid::new_v4(), started: Utc::now() }
    }
}

impl Default for SessionName {
    fn default() -> Self {
        Self::new()
    }
}

/// How a session ends, as the card tells the writer.
#[derive(Clone, Debug, Default)]
pub struct Closing {
    /// `None` for a complete dump; otherwise why it ended early.
    pub incomplete_reason: Option<String>,
    /// Doorbells the card refused during the session.
    pub rejected_chunks: u64,
    /// The first of them.
    pub first_error: Option<String>,
}

/// One crash being captured. Owned by its writer thread.
#[derive(Debug)]
pub struct Session {
    config: CaptureConfig,
    dir: PathBuf,
    base: String,
    file: File,
    max_dump_size: u64,
    sidecar: Sidecar,
    coverage: Coverage,
    /// The file's length on disk: writes past it extend it, and so does `set_len` when a chunk
    /// ends in skipped zero pages.
    len_on_disk: u64,
    /// SHA-256 of `[0, hashed_upto)` while every chunk so far appended exactly at the end, so a
    /// sequential dump is never read back; `None` once the order broke.
    running_hash: Option<(RunningHash, u64)>,
    /// Bytes written since writeback was last started (see [`WRITEBACK_EVERY`]).
    unkicked: u64,
}

/// How many bytes a writer writes before it asks the kernel to start writing them back
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for them). Without it a big
/// dump sits dirty in the page cache until the final fsync, which then writes all of it while
/// the guest waits: started early, the disk works while the dump streams, and the fsync has
/// little left to do.
pub const WRITEBACK_EVERY: u64 = 16 << 20;

impl Session {
    /// Opens a session: creates the partial file and writes the first sidecar (not fsync'd:
    /// until the session closes the sidecar only says that a capture is under way, and
    /// [`recover_stale`] copes without it).
    pub fn open(
        config: &CaptureConfig,
        name: &SessionName,
        bugcheck: Option<BugCheckInfo>,
    ) -> io::Result<Session> {
        let base =
            format!("{}-{}-{}", config.vm_name, name.started.format("%Y%m%dT%H%M%SZ"), name.id);
        let partial = config.output_dir.join(format!("{base}{PARTIAL_SUFFIX}"));
        let file = {
            let _listing = quota::folder_change();
            config.create_file(&partial, true)?
        };
        // Held until the session closes; see `recover_stale`.
        file.try_lock().map_err(io::Error::other)?;
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.to_owned(),
            session_id: name.id,
            vm_name: config.vm_name.clone(),
            dump_file: format!("{base}{PARTIAL_SUFFIX}"),
            state: DumpState::Streaming,
            incomplete_reason: None,
            bugcheck,
            started_at: sidecar::time::at_millis(name.started),
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
            sha256_source: None,
            write_errors: 0,
            first_write_error: None,
            longest_answer_us: None,
            zero_bytes_skipped: 0,
            dma_chunks: 0,
            allocated_bytes: None,
        };
        let session = Session {
            config: config.clone(),
            dir: config.output_dir.clone(),
            base,
            file,
            max_dump_size: config.max_dump_size,
            sidecar,
            coverage: Coverage::default(),
            len_on_disk: 0,
            running_hash: Some((RunningHash::default(), 0)),
            unkicked: 0,
        };
        session.write_sidecar(false)?;
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

    /// The file's size so far: the end of the furthest chunk.
    pub fn size(&self) -> u64 {
        self.sidecar.size
    }

    /// Payload bytes written so far.
    pub fn bytes_received(&self) -> u64 {
        self.sidecar.bytes_received
    }

    /// Writes one chunk at `start`; `explicit` says whether the guest gave the offset (rather
    /// than Offset -1). The card has already placed it within the limits; they are checked
    /// again here all the same, so the file can never grow past them.
    pub fn write(
        &mut self,
        kind: DumpIoType,
        start: u64,
        explicit: bool,
        data: &[u8],
    ) -> io::Result<()> {
        let end = Placement { cursor: start }
            .place(None, data.len(), self.max_dump_size)
            .map(|s| s + data.len() as u64)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if let Err(e) = self.write_sparse(start, data) {
            self.sidecar.write_errors += 1;
            self.sidecar
                .first_write_error
                .get_or_insert_with(|| format!("{} bytes at {start:#x}: {e}", data.len()));
            return Err(e);
        }

        self.coverage.insert(start, end);
        self.unkicked += data.len() as u64;
        if self.unkicked >= WRITEBACK_EVERY {
            self.unkicked = 0;
            self.start_writeback();
        }
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
        self.sidecar.write_order = match (self.sidecar.write_order, explicit) {
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

    /// Counts the chunk just written as one the card read from guest memory (DMA mode).
    pub fn note_dma_chunk(&mut self) {
        self.sidecar.dma_chunks += 1;
    }

    /// Starts writeback of the file's dirty pages without waiting for it (the final fsync is
    /// what makes the dump durable; this only gets the disk going earlier). A filesystem that
    /// does not support it changes nothing.
    fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor this session owns; no memory is passed.
        let r = unsafe {
            nix::libc::sync_file_range(
                self.file.as_raw_fd(),
                0,
                0,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            log::debug!("sync_file_range: {}", io::Error::last_os_error());
        }
    }

    /// Writes `data` at `start`, leaving out every whole page (4 KiB of the file) that is all
    /// zeros and that no earlier chunk wrote: the file keeps a hole there, which reads as zeros.
    /// A page an earlier chunk wrote is written again, zeros or not (a hole would not erase what
    /// is there). Windows keeps free memory zeroed, so a full dump is largely such pages.
    fn write_sparse(&mut self, start: u64, data: &[u8]) -> io::Result<()> {
        let end = start + data.len() as u64;
        let mut pending: Option<(u64, u64)> = None; // a run of bytes still to write
        let mut written_end = 0;
        let mut at = start;
        while at < end {
            let page_end = ((at / SPARSE_PAGE) + 1) * SPARSE_PAGE;
            let piece_end = page_end.min(end);
            let piece = &data[(at - start) as usize..(piece_end - start) as usize];
            let skip = at.is_multiple_of(SPARSE_PAGE)
                && piece.len() as u64 == SPARSE_PAGE
                && self.config.sparse
                && is_zero(piece)
                && !self.coverage.touches(at, piece_end);
            if skip {
                if let Some((s, e)) = pending.take() {
                    self.file.write_all_at(&data[(s - start) as usize..(e - start) as usize], s)?;
                    written_end = e;
                }
                self.sidecar.zero_bytes_skipped += SPARSE_PAGE;
            } else {
                pending = Some(pending.map_or((at, piece_end), |(s, _)| (s, piece_end)));
            }
            at = piece_end;
        }
        if let Some((s, e)) = pending {
            self.file.write_all_at(&data[(s - start) as usize..(e - start) as usize], s)?;
            written_end = e;
        }
        self.len_on_disk = self.len_on_disk.max(written_end);
        if end > self.len_on_disk {
            // Skipped pages at the end leave the file short: its length is the dump's.
            self.file.set_len(end)?;
            self.len_on_disk = end;
        }
        Ok(())
    }

    /// Counts a chunk whose bytes the writer could not take (the file could not be created).
    pub fn note_lost(&mut self, what: &str) {
        self.sidecar.write_errors += 1;
        self.sidecar.first_write_error.get_or_insert_with(|| what.to_owned());
    }

    /// Whether no byte of the dump arrived (nor failed to be written): nothing worth keeping.
    pub fn is_empty(&self) -> bool {
        self.sidecar.bytes_received == 0 && self.sidecar.write_errors == 0
    }

    /// Closes a session that carried no dump bytes: its empty file and its sidecar are removed,
    /// so that a guest opening sessions in a loop leaves no files behind.
    pub fn discard(self) -> io::Result<()> {
        let _listing = quota::folder_change();
        fs::remove_file(self.partial_path())?;
        fs::remove_file(self.sidecar_path())
    }

    /// First half of closing: makes the dump durable under its final name (fsync the file,
    /// rename it, fsync the folder). Once this returns the dump is safe on disk.
    pub fn make_durable(&mut self, incomplete_reason: Option<&str>) -> io::Result<PathBuf> {
        self.file.sync_all()?;
        let suffix = if incomplete_reason.is_some() { INCOMPLETE_SUFFIX } else { COMPLETE_SUFFIX };
        let dump_name = format!("{}{suffix}", self.base);
        let dump_path = self.dir.join(&dump_name);
        {
            let _listing = quota::folder_change();
            fs::rename(self.partial_path(), &dump_path)?;
        }
        File::open(&self.dir)?.sync_all()?;
        self.sidecar.dump_file = dump_name;
        Ok(dump_path)
    }

    /// Second half of closing, after [`Session::make_durable`]: the hash (from the running
    /// hash of an in-order dump, or read back from the durable file), and the final sidecar,
    /// fsync'd.
    pub fn finish(
        mut self,
        closing: &Closing,
        longest_answer_us: Option<u64>,
    ) -> io::Result<Finished> {
        let dump_path = self.dir.join(&self.sidecar.dump_file);
        let streamed = match self.running_hash.take() {
            Some((hash, upto)) if upto == self.sidecar.size => hash.finish(),
            _ => None,
        };
        let (sha, source) = match streamed {
            Some(sha) => (sha, HashSource::Streamed),
            None => (hash_file(&self.file)?, HashSource::ReadBack),
        };
        self.sidecar.sha256 = Some(sha);
        self.sidecar.sha256_source = Some(source);
        let incomplete = closing.incomplete_reason.as_deref();
        self.sidecar.state =
            if incomplete.is_some() { DumpState::Incomplete } else { DumpState::Complete };
        self.sidecar.incomplete_reason = closing.incomplete_reason.clone();
        self.sidecar.rejected_chunks = closing.rejected_chunks;
        self.sidecar.first_error = closing.first_error.clone();
        self.sidecar.longest_answer_us = longest_answer_us;
        self.sidecar.ended_at = Some(sidecar::time::now());
        self.sidecar.missing_bytes = self.coverage.covered().map(|c| self.sidecar.size - c);
        self.sidecar.allocated_bytes = {
            use std::os::unix::fs::MetadataExt;
            self.file.metadata().ok().map(|m| m.blocks() * 512)
        };
        self.sidecar.missing_ranges =
            self.coverage.holes(self.sidecar.size, MAX_LISTED_HOLES).unwrap_or_default();
        self.write_sidecar(true)?;
        File::open(&self.dir)?.sync_all()?;
        match incomplete {
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

    fn write_sidecar(&self, durable: bool) -> io::Result<()> {
        write_json_atomically(&self.config, &self.sidecar_path(), &self.sidecar, durable)
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

fn write_json_atomically(
    config: &CaptureConfig,
    path: &Path,
    value: &Sidecar,
    durable: bool,
) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    // A file left under the temporary name (by a crash mid-write, or planted as a link out of
    // the folder) is replaced, never written through: unlinking removes a link itself, and the
    // new file is created exclusively, without following links.
    let _ = fs::remove_file(&tmp);
    // Serialized in memory and written at once: serde_json into a bare `File` makes one write
    // per token (hundreds of syscalls per sidecar; on a slow disk each one waits).
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut file = config.create_file(&tmp, false)?;
    file.write_all(&bytes)?;
    if durable {
        file.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// SHA-256 of a file, read back. Holes are not read from the disk (`SEEK_DATA`/`SEEK_HOLE`):
/// their zeros are hashed from memory, so a sparse dump costs only its data's reads.
fn hash_file(file: &File) -> io::Result<String> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let size = file.metadata()?.len();
    let mut hash = Sha256::new();
    // At most 1 MiB, and no more than the file: a small dump does not zero a large buffer.
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    let mut at = 0u64;
    let fd = file.as_raw_fd();
    while at < size {
        // The next data at or after `at`; a filesystem without SEEK_DATA reports all data.
        let data = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(size),
            Err(nix::errno::Errno::ENXIO) => size, // only a hole remains
            Err(_) => at,
        };
        while at < data {
            let n = (data - at).min(ZEROS.len() as u64) as usize;
            hash.update(&ZEROS[..n]);
            at += n as u64;
        }
        if at >= size {
            break;
        }
        let hole = match lseek(fd, at as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).clamp(at, size),
            Err(_) => size,
        };
        let hole = if hole == at { size } else { hole };
        while at < hole {
            let want = (hole - at).min(buf.len() as u64) as usize;
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                // The file shrank under us: hash what it says now.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while hashed",
                ));
            }
            hash.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(hex::encode(hash.finalize()))
}

/// Closes partial dumps that a device model which died mid-capture left in `dir`: each one whose
/// lock nobody holds is fsync'd, renamed to `.incomplete.dmp` and its sidecar marked incomplete.
/// Runs in the background at startup (it reads whole files to hash them); each dump it closes,
/// and each it cannot, is logged once. Returns what it closed.
pub fn recover_stale(dir: &Path) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!("cannot look for partial dumps left in {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut recovered = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(base) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
            .map(str::to_owned)
        else {
            continue;
        };
        match recover_one(dir, &path, &base) {
            Ok(Some(done)) => {
                warn!("closed a dump left partial by an earlier run: {}", done.display());
                recovered.push(done);
            }
            Ok(None) => {} // a live device model is writing it
            Err(e) => warn!("cannot close the partial dump {}: {e}", path.display()),
        }
    }
    recovered
}

/// Opens an existing regular file of the output folder, never through a symbolic link and never
/// waiting on a FIFO: a name there says nothing about what the file is.
fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// The sidecar at `path`, if it is a regular file holding one (sidecars are a few KiB: a
/// bigger file is not one, and is not read into memory).
fn read_sidecar(path: &Path) -> Option<Sidecar> {
    use std::io::Read;
    const MAX_SIDECAR: u64 = 1 << 20;
    let file = open_regular(path, false).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_SIDECAR + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_SIDECAR {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Closes one stale partial: hash, then the sidecar (already naming the final file), then the
/// rename. A device model killed in the middle leaves a `.partial` that the next one recovers
/// again, never a renamed dump whose sidecar still says it is streaming.
fn recover_one(dir: &Path, path: &Path, base: &str) -> io::Result<Option<PathBuf>> {
    let file = open_regular(path, true)?;
    if file.try_lock().is_err() {
        return Ok(None);
    }
    file.sync_all()?;
    let dump_name = format!("{base}{INCOMPLETE_SUFFIX}");
    let sidecar_path = dir.join(format!("{base}{SIDECAR_SUFFIX}"));
    let size = file.metadata()?.len();
    let sha = hash_file(&file)?;
    if let Some(mut sidecar) = read_sidecar(&sidecar_path) {
        sidecar.dump_file = dump_name.clone();
        sidecar.state = DumpState::Incomplete;
        sidecar.incomplete_reason = Some("device model exited during capture".to_owned());
        sidecar.size = size;
        sidecar.missing_bytes = None;
        sidecar.sha256 = Some(sha);
        sidecar.sha256_source = Some(HashSource::ReadBack);
        sidecar.allocated_bytes =
            file.metadata().ok().map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
        // Rewritten with the mode and group the old sidecar had.
        let meta = fs::symlink_metadata(&sidecar_path)?;
        let config = CaptureConfig {
            file_mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            file_group: Some(std::os::unix::fs::MetadataExt::gid(&meta)),
            ..CaptureConfig::new(dir, "", 0)
        };
        write_json_atomically(&config, &sidecar_path, &sidecar, true)?;
    }
    {
        let _listing = quota::folder_change();
        fs::rename(path, dir.join(&dump_name))?;
    }
    File::open(dir)?.sync_all()?;
    Ok(Some(dir.join(dump_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max: u64) -> CaptureConfig {
        CaptureConfig::new(dir, "vm1", max)
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn read_sidecar(f: &Finished) -> Sidecar {
        serde_json::from_slice(&fs::read(&f.sidecar_path).unwrap()).unwrap()
    }

    /// A session as the card and its writer drive it: chunks placed, then written.
    struct Rig {
        session: Session,
        placement: Placement,
        max: u64,
    }

    impl Rig {
        fn open(dir: &Path, max: u64) -> Rig {
            let session = Session::open(&config(dir, max), &SessionName::new(), None).unwrap();
            Rig { session, placement: Placement::default(), max }
        }
        fn write(
            &mut self,
            kind: DumpIoType,
            offset: Option<u64>,
            data: &[u8],
        ) -> Result<(), ChunkError> {
            let start = self.placement.place(offset, data.len(), self.max)?;
            self.session.write(kind, start, offset.is_some(), data).unwrap();
            Ok(())
        }
        fn finish(mut self, incomplete: Option<&str>) -> Finished {
            self.session.make_durable(incomplete).unwrap();
            let closing =
                Closing { incomplete_reason: incomplete.map(str::to_owned), ..Closing::default() };
            self.session.finish(&closing, None).unwrap()
        }
    }

    /// `pages` pages of 4 KiB: page i is zeros where `zero(i)`, else a pattern.
    fn pages(count: usize, zero: impl Fn(usize) -> bool) -> Vec<u8> {
        (0..count * 4096)
            .map(|i| if zero(i / 4096) { 0 } else { (i as u8).wrapping_mul(31) | 1 })
            .collect()
    }

    #[test]
    fn zero_pages_become_holes_and_the_file_reads_the_same() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 1 << 30);
        // 256 pages, three in four zero, ending in zeros: the file must still be 1 MiB long.
        let data = pages(256, |i| i % 4 != 0 || i >= 250);
        // Chunks of 40 KiB + 100 bytes: most start off a page boundary, so the partial pages
        // at their edges are written even when zero.
        for c in data.chunks(41_060) {
            s.write(DumpIoType::Body, None, c).unwrap();
        }
        let f = s.finish(None);
        let on_disk = fs::read(&f.dump_path).unwrap();
        assert_eq!(on_disk.len(), data.len());
        assert!(on_disk == data, "the file reads as every byte sent");
        let sc = read_sidecar(&f);
        assert_eq!(sc.sha256.as_deref(), Some(sha(&data).as_str()));
        assert_eq!(sc.size, data.len() as u64);
        assert!(sc.zero_bytes_skipped >= 150 * 4096, "{}", sc.zero_bytes_skipped);
        assert!(sc.zero_bytes_skipped.is_multiple_of(4096));
        let allocated = fs::metadata(&f.dump_path).unwrap().blocks() * 512;
        assert_eq!(sc.allocated_bytes, Some(allocated));
        assert!(allocated <= data.len() as u64 - sc.zero_bytes_skipped + 16 * 4096, "{allocated}");
    }

    #[test]
    fn zeros_over_bytes_already_written_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 1 << 30);
        let first = pages(8, |_| false);
        s.write(DumpIoType::Body, Some(0), &first).unwrap();
        // The guest rewrites pages 2..6 as zeros: a hole would leave the old bytes.
        s.write(DumpIoType::Body, Some(2 * 4096), &[0u8; 4 * 4096]).unwrap();
        // Past the end, zeros are skipped and the file grows to their end.
        s.write(DumpIoType::Body, Some(8 * 4096), &[0u8; 3 * 4096]).unwrap();
        let f = s.finish(None);
        let mut want = first.clone();
        want[2 * 4096..6 * 4096].fill(0);
        want.extend([0u8; 3 * 4096]);
        assert!(fs::read(&f.dump_path).unwrap() == want);
        let sc = read_sidecar(&f);
        assert_eq!(sc.zero_bytes_skipped, 3 * 4096);
        assert_eq!(sc.sha256.as_deref(), Some(sha(&want).as_str()));
    }

    #[test]
    fn no_sparse_writes_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let config = CaptureConfig { sparse: false, ..config(dir.path(), 1 << 30) };
        let mut session = Session::open(&config, &SessionName::new(), None).unwrap();
        let data = pages(16, |i| i != 3);
        session.write(DumpIoType::Body, 0, false, &data).unwrap();
        session.make_durable(None).unwrap();
        let f = session.finish(&Closing::default(), None).unwrap();
        assert!(fs::read(&f.dump_path).unwrap() == data);
        assert_eq!(f.sidecar.zero_bytes_skipped, 0);
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0u8; 4096]));
        for at in [0, 1, 63, 64, 65, 4000, 4095] {
            let mut page = [0u8; 4096];
            page[at] = 0x80;
            assert!(!is_zero(&page), "{at}");
        }
        assert!(is_zero(&[]) && is_zero(&[0; 67]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn sequential_dump_is_reassembled_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 1 << 30);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        s.write(DumpIoType::Header, None, &data[..4096]).unwrap();
        for c in data[4096..].chunks(1000) {
            s.write(DumpIoType::Body, None, c).unwrap();
        }
        let f = s.finish(None);
        assert_eq!(fs::read(&f.dump_path).unwrap(), data);
        assert!(f.dump_path.to_str().unwrap().ends_with(".dmp"));
        let sc = read_sidecar(&f);
        assert_eq!(sc.state, DumpState::Complete);
        assert_eq!(sc.sha256.as_deref(), Some(sha(&data).as_str()));
        assert_eq!(sc.write_order, WriteOrder::Sequential);
        assert_eq!(sc.sha256_source, Some(HashSource::Streamed), "never read back");
        assert_eq!(sc.bytes_by_type.header, 4096);
        assert_eq!(sc.bytes_by_type.body, 100_000 - 4096);
        assert_eq!(sc.missing_bytes, Some(0));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no partial or temp file left");
    }

    #[test]
    fn out_of_order_with_overlap_and_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 1 << 30);
        s.write(DumpIoType::Body, Some(8192), &[2u8; 4096]).unwrap();
        s.write(DumpIoType::Header, Some(0), &[1u8; 4096]).unwrap();
        s.write(DumpIoType::Body, Some(8192 + 2048), &[3u8; 4096]).unwrap(); // overlaps, later wins
        let f = s.finish(None);
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
        assert_eq!(sc.sha256_source, Some(HashSource::ReadBack));
    }

    #[test]
    fn limits_refuse_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 8192);
        s.write(DumpIoType::Body, None, &[9u8; 8192]).unwrap();
        assert!(matches!(
            s.write(DumpIoType::Body, None, &[1u8]),
            Err(ChunkError::TooLarge { end: 8193, max: 8192 })
        ));
        assert!(matches!(
            s.write(DumpIoType::Body, Some(u64::MAX - 1), &[1u8; 4]),
            Err(ChunkError::Overflow { .. })
        ));
        let f = s.finish(Some("aborted by guest driver"));
        assert!(f.dump_path.to_str().unwrap().ends_with(".incomplete.dmp"));
        assert_eq!(fs::read(&f.dump_path).unwrap(), vec![9u8; 8192]);
        let sc = read_sidecar(&f);
        assert_eq!(sc.state, DumpState::Incomplete);
        assert_eq!(sc.incomplete_reason.as_deref(), Some("aborted by guest driver"));
    }

    #[test]
    fn bugcheck_is_read_from_dump_header64() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Rig::open(dir.path(), 1 << 20);
        let mut header = vec![0u8; 4096];
        header[..8].copy_from_slice(b"PAGEDU64");
        header[0x38..0x3c].copy_from_slice(&0xD1u32.to_le_bytes());
        for i in 0..4 {
            let at = 0x40 + 8 * i;
            header[at..at + 8].copy_from_slice(&(0xfffff800_00000000u64 + i as u64).to_le_bytes());
        }
        s.write(DumpIoType::Header, None, &header).unwrap();
        let sc = s.finish(None).sidecar;
        let bc = sc.bugcheck.unwrap();
        assert_eq!(bc.code, "0x000000d1");
        assert_eq!(bc.parameters[3], "0xfffff80000000003");
        assert_eq!(bc.source, BugCheckSource::DumpHeader);
    }

    #[test]
    fn two_sessions_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let a = Rig::open(dir.path(), 1 << 20);
        let b = Rig::open(dir.path(), 1 << 20);
        assert_ne!(a.session.partial_path(), b.session.partial_path());
    }

    #[test]
    fn stale_partials_are_recovered_but_live_ones_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = Rig::open(dir.path(), 1 << 20);
        live.write(DumpIoType::Body, None, b"live").unwrap();
        // A dead device model: the file exists but nobody holds its lock.
        let mut dead = Rig::open(dir.path(), 1 << 20);
        dead.write(DumpIoType::Body, None, b"dead bytes").unwrap();
        let dead_partial = dead.session.partial_path();
        std::mem::drop(dead);
        let recovered = recover_stale(dir.path());
        assert_eq!(recovered.len(), 1);
        assert!(!dead_partial.exists());
        assert_eq!(fs::read(&recovered[0]).unwrap(), b"dead bytes");
        assert!(live.session.partial_path().exists());
        let sc: Sidecar = serde_json::from_slice(
            &fs::read(recovered[0].to_str().unwrap().replace(INCOMPLETE_SUFFIX, SIDECAR_SUFFIX))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(sc.sha256.as_deref(), Some(sha(b"dead bytes").as_str()));
        assert_eq!(sc.sha256_source, Some(HashSource::ReadBack));
    }

    /// Found by the `recovery` fuzz target: a FIFO under a sidecar's name hung recovery, and a
    /// link under the temporary sidecar name made it write outside the folder.
    #[test]
    fn recovery_neither_follows_links_nor_waits_on_fifos() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        fs::create_dir(&dir).unwrap();
        let outside = root.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("l.dmp.partial")).unwrap();
        fs::write(dir.join("f.dmp.partial"), b"bytes").unwrap();
        nix::unistd::mkfifo(&dir.join("f.json"), nix::sys::stat::Mode::S_IRUSR).unwrap();
        let mut dead = Rig::open(&dir, 1 << 20);
        dead.write(DumpIoType::Body, None, b"dead").unwrap();
        let partial = dead.session.partial_path();
        std::mem::drop(dead);
        let tmp = partial.to_str().unwrap().replace(PARTIAL_SUFFIX, ".json.tmp");
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();

        let recovered = recover_stale(&dir);
        assert_eq!(recovered.len(), 2, "{recovered:?}");
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(fs::symlink_metadata(dir.join("l.dmp.partial")).unwrap().is_symlink());
        let sidecar = partial.to_str().unwrap().replace(PARTIAL_SUFFIX, SIDECAR_SUFFIX);
        let sc: Sidecar = serde_json::from_slice(&fs::read(sidecar).unwrap()).unwrap();
        assert_eq!(sc.state, DumpState::Incomplete);
    }

    #[test]
    fn vm_names() {
        assert!(valid_vm_name("win11-ci_03.a"));
        for bad in ["", "../x", "a/b", ".hidden", "-x", "sp ace", &"x".repeat(65)] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }

    #[test]
    fn sparse_files_hash_their_holes_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"tail", (64 << 20) + 3).unwrap();
        file.set_len((64 << 20) + 4096).unwrap();
        let mut want = vec![0u8; (64 << 20) + 4096];
        want[..4].copy_from_slice(b"head");
        want[(64 << 20) + 3..(64 << 20) + 7].copy_from_slice(b"tail");
        assert_eq!(hash_file(&file).unwrap(), sha(&want));
        let empty = File::create(dir.path().join("empty")).unwrap();
        assert_eq!(hash_file(&empty).unwrap(), sha(b""));
    }
}
