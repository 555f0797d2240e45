//! One dump on disk: finding its sidecar, mapping its bytes, reading its header through
//! `kdmp-parser` and walking its secondary data.

use crate::bugcheck;
use crate::ToolError;
use chrono::{DateTime, Utc};
use crashmon_device_model::capture::{
    Sidecar, COMPLETE_SUFFIX, INCOMPLETE_SUFFIX, PARTIAL_SUFFIX, SIDECAR_SUFFIX,
};
use kdmp_parser::parse::KernelDumpParser;
use kdmp_parser::structs::Header64;
use memmap2::Mmap;
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Dump-file suffixes, longest first (`.incomplete.dmp` also ends in `.dmp`).
const DUMP_SUFFIXES: [&str; 3] = [INCOMPLETE_SUFFIX, PARTIAL_SUFFIX, COMPLETE_SUFFIX];

/// The `<vm>-<UTC time>-<uuid>` part of a dump's or sidecar's file name, if it has a known
/// suffix.
pub fn base_name(file_name: &str) -> Option<&str> {
    DUMP_SUFFIXES
        .iter()
        .chain([SIDECAR_SUFFIX].iter())
        .find_map(|s| file_name.strip_suffix(s))
        .filter(|b| !b.is_empty())
}

/// Whether a file name is one of a dump's names.
pub fn is_dump_name(file_name: &str) -> bool {
    DUMP_SUFFIXES.iter().any(|s| file_name.len() > s.len() && file_name.ends_with(s))
}

/// Reads and parses a sidecar.
pub fn read_sidecar(path: &Path) -> Result<Sidecar, ToolError> {
    let bytes = std::fs::read(path).map_err(|e| ToolError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ToolError::BadSidecar { path: path.to_owned(), message: e.to_string() })
}

/// A dump and its sidecar, found from either.
#[derive(Debug)]
pub struct Located {
    /// The dump file.
    pub dump: PathBuf,
    /// The sidecar's path, when there is one.
    pub sidecar_path: Option<PathBuf>,
    /// The sidecar, or why it could not be read.
    pub sidecar: Option<Result<Sidecar, String>>,
}

impl Located {
    /// The sidecar, when it was read.
    pub fn sidecar(&self) -> Option<&Sidecar> {
        self.sidecar.as_ref().and_then(|s| s.as_ref().ok())
    }
}

/// Finds the dump and the sidecar of `path`, which names either. A sidecar that cannot be read is
/// an error when it was named, and is recorded in [`Located::sidecar`] when the dump was.
pub fn locate(path: &Path) -> Result<Located, ToolError> {
    if !path.is_file() {
        return Err(ToolError::NoSuchFile(path.to_owned()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Some(base) = name.strip_suffix(SIDECAR_SUFFIX) {
        let sidecar = read_sidecar(path)?;
        // The dump is renamed when its session closes: follow the sidecar, else the base name.
        let named = dir.join(&sidecar.dump_file);
        let dump = std::iter::once(named.clone())
            .chain(DUMP_SUFFIXES.iter().map(|s| dir.join(format!("{base}{s}"))))
            .find(|p| p.is_file())
            .ok_or(ToolError::DumpMissing { sidecar: path.to_owned(), dump: named })?;
        return Ok(Located {
            dump,
            sidecar_path: Some(path.to_owned()),
            sidecar: Some(Ok(sidecar)),
        });
    }
    let sidecar_path = DUMP_SUFFIXES
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .map(|base| dir.join(format!("{base}{SIDECAR_SUFFIX}")))
        .filter(|p| p.is_file());
    let sidecar = sidecar_path.as_deref().map(|p| read_sidecar(p).map_err(|e| e.to_string()));
    Ok(Located { dump: path.to_owned(), sidecar_path, sidecar })
}

/// A dump file's bytes, mapped read-only.
pub struct DumpBytes {
    /// The open file.
    pub file: File,
    map: Option<Mmap>,
}

impl DumpBytes {
    /// Opens and maps `path`.
    pub fn open(path: &Path) -> Result<Self, ToolError> {
        let file = File::open(path).map_err(|e| ToolError::io(path, e))?;
        let len = file.metadata().map_err(|e| ToolError::io(path, e))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and private to this process. The device model
            // only ever writes a dump at offsets within its final size and never truncates it,
            // so even a dump still streaming stays valid to read (its bytes may change under
            // us, which a reader of a streaming dump must expect anyway).
            Some(unsafe { Mmap::map(&file) }.map_err(|e| ToolError::io(path, e))?)
        };
        Ok(Self { file, map })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Opens a dump with `kdmp-parser`.
pub fn parse(path: &Path) -> Result<KernelDumpParser, String> {
    KernelDumpParser::new(path).map_err(|e| e.to_string())
}

/// A 64-bit value as the sidecar writes pointers: `0xfffff80312345678`.
fn hex64(v: u64) -> String {
    format!("{v:#018x}")
}

/// A bug check read from a dump header.
#[derive(Clone, Debug, Serialize)]
pub struct BugCheck {
    /// `0x000000D1`.
    pub code: String,
    /// The well-known name, when the code is in the table.
    pub name: Option<String>,
    /// The four parameters.
    pub parameters: [String; 4],
}

/// The `DUMP_HEADER64` fields an operator looks at.
#[derive(Clone, Debug, Serialize)]
pub struct HeaderInfo {
    /// `Signature` and `ValidDump` as text: `PAGEDU64`.
    pub signature: String,
    /// `DumpType`: 1 (full) or 5 (bitmap) for crashmon's dumps.
    pub dump_type: u32,
    /// Its name, as `kdmp-parser` knows it.
    pub dump_type_name: String,
    /// `MajorVersion` (0xF: a free build).
    pub major_version: u32,
    /// `MinorVersion` (the build number).
    pub minor_version: u32,
    /// `DirectoryTableBase`.
    pub directory_table_base: String,
    /// `PfnDataBase`.
    pub pfn_database: String,
    /// `PsLoadedModuleList`.
    pub ps_loaded_module_list: String,
    /// `PsActiveProcessHead`.
    pub ps_active_process_head: String,
    /// `KdDebuggerDataBlock`.
    pub kd_debugger_data_block: String,
    /// `MachineImageType`, e.g. `0x8664 (AMD64)`.
    pub machine_image_type: String,
    /// `NumberProcessors`.
    pub number_processors: u32,
    /// The bug check.
    pub bugcheck: BugCheck,
    /// `RequiredDumpSpace`.
    pub required_dump_space: i64,
    /// `SystemTime` as RFC 3339 UTC, when set.
    pub system_time: Option<String>,
}

/// One run of physical pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PageRun {
    /// First page frame number.
    pub base_page: u64,
    /// Pages in the run.
    pub page_count: u64,
}

/// The dump's physical memory.
#[derive(Clone, Debug, Serialize)]
pub struct PhysicalMemory {
    /// `PHYSICAL_MEMORY_DESCRIPTOR64.NumberOfPages`: the machine's pages.
    pub header_pages: u64,
    /// Its runs.
    pub header_runs: Vec<PageRun>,
    /// Pages the dump holds (all of them in a full dump, those in use in a bitmap dump).
    pub pages: u64,
    /// Runs of consecutive pages the dump holds.
    pub present_runs: u64,
}

/// One secondary data block.
#[derive(Clone, Debug, Serialize)]
pub struct BlobInfo {
    /// Its tag, braced: `{c4a50d01-6372-4d53-9d6d-6f6e64727631}`.
    pub tag: String,
    /// Where its data starts in the file.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

/// Everything `inspect` shows.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The dump file.
    pub file: String,
    /// Its size on disk.
    pub file_size: u64,
    /// The header, when `kdmp-parser` could parse the dump.
    pub header: Option<HeaderInfo>,
    /// Why it could not.
    pub parse_error: Option<String>,
    /// The physical memory, when parsed.
    pub physical_memory: Option<PhysicalMemory>,
    /// The secondary data blocks, in file order.
    pub secondary_data: Vec<BlobInfo>,
    /// The sidecar's path.
    pub sidecar_file: Option<String>,
    /// The sidecar.
    pub sidecar: Option<Sidecar>,
    /// Why the sidecar could not be read.
    pub sidecar_error: Option<String>,
}

/// The 16 bytes of a tag (a GUID in its memory layout) in braced text form.
pub fn tag_text(tag: &[u8; 16]) -> String {
    Uuid::from_bytes_le(*tag).braced().to_string()
}

/// The secondary data blocks of a dump's bytes: tag, data.
pub fn blobs(bytes: &[u8]) -> Vec<([u8; 16], &[u8])> {
    crashmon_dump_writer::secondary_blobs(bytes).map(|b| (b.guid, b.data)).collect()
}

fn blob_infos(bytes: &[u8]) -> Vec<BlobInfo> {
    blobs(bytes)
        .into_iter()
        .map(|(tag, data)| BlobInfo {
            tag: tag_text(&tag),
            offset: (data.as_ptr() as usize - bytes.as_ptr() as usize) as u64,
            size: data.len() as u64,
        })
        .collect()
}

/// Windows' FILETIME (100 ns since 1601-01-01 UTC) as RFC 3339, `None` when 0 or out of range.
fn filetime(t: i64) -> Option<String> {
    const UNIX_EPOCH_AS_FILETIME: i64 = 116_444_736_000_000_000;
    if t <= 0 {
        return None;
    }
    let since_unix = t.checked_sub(UNIX_EPOCH_AS_FILETIME)?;
    let secs = since_unix.div_euclid(10_000_000);
    let nanos = (since_unix.rem_euclid(10_000_000) * 100) as u32;
    DateTime::<Utc>::from_timestamp(secs, nanos)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn header_info(parser: &KernelDumpParser) -> HeaderInfo {
    let h: &Header64 = parser.headers();
    let text = |v: u32| String::from_utf8_lossy(&v.to_le_bytes()).into_owned();
    let machine = match h.machine_image_type {
        0x8664 => "AMD64",
        0xAA64 => "ARM64",
        0x014C => "I386",
        _ => "unknown",
    };
    HeaderInfo {
        signature: format!("{}{}", text(h.signature), text(h.valid_dump)),
        dump_type: h.dump_type,
        dump_type_name: format!("{:?}", parser.dump_type()),
        major_version: h.major_version,
        minor_version: h.minor_version,
        directory_table_base: hex64(h.directory_table_base),
        pfn_database: hex64(h.pfn_database),
        ps_loaded_module_list: hex64(h.ps_loaded_module_list),
        ps_active_process_head: hex64(h.ps_active_process_head),
        kd_debugger_data_block: hex64(h.kd_debugger_data_block),
        machine_image_type: format!("{:#x} ({machine})", h.machine_image_type),
        number_processors: h.number_processors,
        bugcheck: BugCheck {
            code: bugcheck::code_text(h.bug_check_code),
            name: bugcheck::name(h.bug_check_code).map(str::to_owned),
            parameters: h.bug_check_code_parameters.map(hex64),
        },
        required_dump_space: h.required_dump_space,
        system_time: filetime(h.system_time),
    }
}

/// `PHYSICAL_MEMORY_DESCRIPTOR64` from the header: `NumberOfRuns` (u32), `NumberOfPages`
/// (u64), then 16-byte runs (`BasePage`, `PageCount`).
fn header_runs(h: &Header64) -> (u64, Vec<PageRun>) {
    let b = &h.physical_memory_block_buffer;
    let u64_at =
        |at: usize| b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()));
    let runs = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let pages = u64_at(8).unwrap_or(0);
    let runs = (0..runs)
        .map_while(|i| {
            Some(PageRun { base_page: u64_at(0x10 + 16 * i)?, page_count: u64_at(0x18 + 16 * i)? })
        })
        .collect();
    (pages, runs)
}

fn physical_memory(parser: &KernelDumpParser) -> PhysicalMemory {
    let (header_pages, header_runs) = header_runs(parser.headers());
    let mut present_runs = 0u64;
    let mut next = None;
    for (gpa, _) in parser.physmem() {
        let pfn = u64::from(gpa) / 0x1000;
        if next != Some(pfn) {
            present_runs += 1;
        }
        next = Some(pfn + 1);
    }
    PhysicalMemory { header_pages, header_runs, pages: parser.physmem().len() as u64, present_runs }
}

/// What `inspect` shows of the dump that `located` names.
pub fn inspect(located: &Located) -> Result<Inspection, ToolError> {
    let bytes = DumpBytes::open(&located.dump)?;
    let (header, physical_memory, parse_error) = match parse(&located.dump) {
        Ok(p) => (Some(header_info(&p)), Some(physical_memory(&p)), None),
        Err(e) => (None, None, Some(e)),
    };
    Ok(Inspection {
        file: located.dump.display().to_string(),
        file_size: bytes.bytes().len() as u64,
        header,
        parse_error,
        physical_memory,
        secondary_data: blob_infos(bytes.bytes()),
        sidecar_file: located.sidecar_path.as_ref().map(|p| p.display().to_string()),
        sidecar: located.sidecar().cloned(),
        sidecar_error: located.sidecar.as_ref().and_then(|s| s.as_ref().err().cloned()),
    })
}

/// Parses a tag given on the command line, with or without braces, into its memory layout.
pub fn parse_tag(text: &str) -> Result<[u8; 16], ToolError> {
    Uuid::parse_str(text.trim())
        .map(|u| u.to_bytes_le())
        .map_err(|e| ToolError::BadTag { text: text.to_owned(), message: e.to_string() })
}

/// The data of the first secondary data block tagged `tag` in `located`'s dump.
pub fn extract(located: &Located, tag: &[u8; 16]) -> Result<Vec<u8>, ToolError> {
    let bytes = DumpBytes::open(&located.dump)?;
    let all = blobs(bytes.bytes());
    if let Some((_, data)) = all.iter().find(|(t, _)| t == tag) {
        return Ok(data.to_vec());
    }
    let present = if all.is_empty() {
        "the dump has no secondary data".to_owned()
    } else {
        let tags: Vec<String> =
            all.iter().map(|(t, d)| format!("{} ({} bytes)", tag_text(t), d.len())).collect();
        format!("tags present: {}", tags.join(", "))
    };
    Err(ToolError::NoSuchTag { tag: tag_text(tag), dump: located.dump.clone(), present })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            base_name("vm-20261123T084151Z-abc.incomplete.dmp"),
            Some("vm-20261123T084151Z-abc")
        );
        assert_eq!(base_name("vm-x.dmp.partial"), Some("vm-x"));
        assert_eq!(base_name("vm-x.json"), Some("vm-x"));
        assert_eq!(base_name("notes.txt"), None);
        assert!(is_dump_name("a.dmp") && !is_dump_name(".dmp") && !is_dump_name("a.json"));
    }

    #[test]
    fn tags_with_or_without_braces() {
        let want = "{c4a50d01-6372-4d53-9d6d-6f6e64727631}";
        for text in [want, "C4A50D01-6372-4D53-9D6D-6F6E64727631"] {
            let tag = parse_tag(text).unwrap();
            assert_eq!(&tag[..4], &0xC4A5_0D01u32.to_le_bytes());
            assert_eq!(tag_text(&tag), want);
        }
        assert!(parse_tag("not-a-guid").is_err());
    }

    #[test]
    fn filetimes() {
        assert_eq!(filetime(0), None);
        assert_eq!(filetime(116_444_736_000_000_000).as_deref(), Some("1970-01-01T00:00:00.000Z"));
    }
}
