//! Independent checks of a dump that landed on the host.
//!
//! The dump is opened with `kdmp-parser`, a parser that knows nothing of crashmon, and compared
//! with what the test knows from elsewhere: the bug check it triggered, and QEMU's own image of
//! guest RAM (`pmemsave`, taken after the guest halted). Every physical page in the dump must
//! equal QEMU's copy, except the pages the guest declared it changed after writing them (the
//! dump writer's own stack and state). A guest variable is read through the dump's
//! DirectoryTableBase, and the driver's secondary data block is looked up by its GUID.

use kdmp_parser::gxa::{Gpa, Gva};
use kdmp_parser::parse::KernelDumpParser;
use kdmp_parser::structs::DumpType;
use memmap2::Mmap;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use thiserror::Error;

const PAGE: usize = 0x1000;

/// What the test knows independently of the dump.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Full (1) or bitmap (5).
    pub dump_type: DumpType,
    /// The bug-check code that was triggered.
    pub bugcheck_code: u32,
    /// Its parameters, when the test knows them all.
    pub bugcheck_parameters: Option<[u64; 4]>,
    /// Pages the guest declared it changed after writing them to the dump.
    pub modified_pfns: BTreeSet<u64>,
    /// A guest virtual address and the 8-byte value the guest said it holds.
    pub variable: Option<(u64, u64)>,
    /// GUID (memory layout) of a secondary data block that must be present, and its
    /// expected contents when known.
    pub secondary: Option<([u8; 16], Option<Vec<u8>>)>,
    /// The guest's deterministic workload, whose every page's content is known.
    pub workload: Option<Workload>,
}

/// The test guest's workload: every 8-byte word at physical address `pa` in `[start, end)` is
/// `splitmix64(pa ^ seed)`, except on the variable's page. In a bitmap dump the pages with
/// `pfn % 4 == 3` count as free and must be absent, except the variable's page, which the
/// guest's AddPages callback adds back.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// First physical address.
    pub start: u64,
    /// End physical address (exclusive).
    pub end: u64,
    /// The seed.
    pub seed: u64,
    /// The variable's page, which holds other data.
    pub var_pfn: u64,
    /// Percent of pages the guest left all zero (its `zero=` option).
    pub zero_percent: u64,
}

impl Workload {
    fn contains(&self, pfn: u64) -> bool {
        (self.start / PAGE as u64..self.end / PAGE as u64).contains(&pfn)
    }

    fn is_free(&self, pfn: u64) -> bool {
        self.contains(pfn) && pfn % 4 == 3 && pfn != self.var_pfn
    }

    /// Whether the guest left page `pfn` all zero: `splitmix64(pfn ^ seed ^ "zeropage") % 100`
    /// below the percent (the guest's rule, written here independently).
    fn is_zero_page(&self, pfn: u64) -> bool {
        const ZERO_SALT: u64 = u64::from_be_bytes(*b"zeropage");
        splitmix64(pfn ^ self.seed ^ ZERO_SALT) % 100 < self.zero_percent
    }

    /// Whether `page` (at page frame `pfn`) holds the expected words.
    fn page_is_intact(&self, pfn: u64, page: &[u8]) -> bool {
        if self.is_zero_page(pfn) {
            return page.iter().all(|&b| b == 0);
        }
        page.chunks_exact(8).enumerate().all(|(i, w)| {
            let pa = pfn * PAGE as u64 + 8 * i as u64;
            w == splitmix64(pa ^ self.seed).to_le_bytes()
        })
    }
}

/// splitmix64's output function (Steele, Lea and Flood), written here independently of the
/// guest's copy.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What passed.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// Bytes in the dump file.
    pub dump_bytes: u64,
    /// Physical pages in the dump.
    pub pages: u64,
    /// Pages compared equal with QEMU's memory image.
    pub pages_equal: u64,
    /// Declared-modified pages that did differ (allowed).
    pub pages_declared_modified: u64,
    /// Workload pages whose every word was checked.
    pub workload_pages: u64,
    /// Human-readable list of the checks that passed.
    pub checks: Vec<String>,
}

/// A check that failed.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The dump or the RAM image could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// kdmp-parser refused the dump.
    #[error("kdmp-parser cannot parse {path}: {message}")]
    Parse {
        /// Which file.
        path: PathBuf,
        /// Its error.
        message: String,
    },
    /// A field or page is not what it should be.
    #[error("{0}")]
    Mismatch(String),
}

fn mismatch(message: String) -> VerifyError {
    VerifyError::Mismatch(message)
}

fn map(path: &Path) -> Result<Mmap, VerifyError> {
    let io = |source| VerifyError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the files are the harness's own outputs (a finished dump and a pmemsave image);
    // nothing writes them while they are mapped.
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// Checks `dump` against `expected` and, when given, `ram_image` (QEMU's `pmemsave` of guest
/// physical memory from address 0). The checks run in this order and the first that fails is
/// the error; each one that passes adds its line to [`Verified::checks`].
pub fn verify(
    dump: &Path,
    ram_image: Option<&Path>,
    expected: &Expected,
) -> Result<Verified, VerifyError> {
    let parser = KernelDumpParser::new(dump)
        .map_err(|e| VerifyError::Parse { path: dump.to_owned(), message: e.to_string() })?;
    let bytes = map(dump)?;
    let ram = ram_image.map(map).transpose()?;
    let mut v = Verified { dump_bytes: bytes.len() as u64, ..Default::default() };
    v.checks.push("kdmp-parser opens the dump".into());

    check_header(&parser, bytes.len(), expected, &mut v)?;
    let present = check_pages(&parser, &bytes, ram.as_deref(), expected, &mut v)?;
    if let Some(w) = &expected.workload {
        check_workload(w, &present, expected.dump_type, &mut v)?;
    }
    if let Some((va, value)) = expected.variable {
        check_variable(&parser, va, value, &mut v)?;
    }
    if let Some((guid, contents)) = &expected.secondary {
        check_secondary(&bytes, guid, contents.as_deref(), &mut v)?;
    }
    Ok(v)
}

/// The header: dump type, bug-check code and parameters, and `RequiredDumpSpace` against the
/// file's length.
fn check_header(
    parser: &KernelDumpParser,
    file_len: usize,
    expected: &Expected,
    v: &mut Verified,
) -> Result<(), VerifyError> {
    let headers = parser.headers();
    if parser.dump_type() != expected.dump_type {
        return Err(mismatch(format!(
            "dump type {:?}, expected {:?}",
            parser.dump_type(),
            expected.dump_type
        )));
    }
    v.checks.push(format!("dump type {:?}", expected.dump_type));
    if headers.bug_check_code != expected.bugcheck_code {
        return Err(mismatch(format!(
            "bug-check code {:#x}, expected {:#x}",
            headers.bug_check_code, expected.bugcheck_code
        )));
    }
    if let Some(params) = expected.bugcheck_parameters {
        if headers.bug_check_code_parameters != params {
            return Err(mismatch(format!(
                "bug-check parameters {:#x?}, expected {params:#x?}",
                headers.bug_check_code_parameters
            )));
        }
    }
    v.checks.push(format!("bug check {:#010x} and its parameters", expected.bugcheck_code));
    if headers.required_dump_space != file_len as i64 {
        return Err(mismatch(format!(
            "RequiredDumpSpace {} but the file has {file_len} bytes",
            headers.required_dump_space,
        )));
    }
    Ok(())
}

/// Every physical page kdmp-parser finds: inside the file, a workload page holding its known
/// content, and equal to QEMU's memory unless declared modified. Returns the PFNs present.
fn check_pages(
    parser: &KernelDumpParser,
    bytes: &[u8],
    ram: Option<&[u8]>,
    expected: &Expected,
    v: &mut Verified,
) -> Result<BTreeSet<u64>, VerifyError> {
    let mut present = BTreeSet::new();
    for (gpa, offset) in parser.physmem() {
        let gpa = u64::from(gpa);
        let pfn = gpa / PAGE as u64;
        v.pages += 1;
        let in_dump = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(PAGE)?))
            .ok_or_else(|| mismatch(format!("page {pfn:#x} lies past the end of the dump")))?;
        present.insert(pfn);
        if let Some(w) = &expected.workload {
            if w.contains(pfn) && pfn != w.var_pfn && !expected.modified_pfns.contains(&pfn) {
                if !w.page_is_intact(pfn, in_dump) {
                    return Err(mismatch(format!(
                        "workload page {pfn:#x} in the dump does not hold its known content"
                    )));
                }
                v.workload_pages += 1;
            }
        }
        let Some(ram) = ram else { continue };
        let in_ram = usize::try_from(gpa)
            .ok()
            .and_then(|a| ram.get(a..a.checked_add(PAGE)?))
            .ok_or_else(|| mismatch(format!("page {pfn:#x} is outside QEMU's RAM image")))?;
        if in_dump == in_ram {
            v.pages_equal += 1;
        } else if expected.modified_pfns.contains(&pfn) {
            v.pages_declared_modified += 1;
        } else {
            let at = in_dump.iter().zip(in_ram).position(|(a, b)| a != b).unwrap_or(0);
            return Err(mismatch(format!(
                "physical page {pfn:#x} differs from QEMU's memory at byte {at:#x} \
                 (dump {:#04x}, QEMU {:#04x}) and was not declared modified",
                in_dump[at], in_ram[at]
            )));
        }
    }
    if v.pages == 0 {
        return Err(mismatch("the dump holds no physical pages".into()));
    }
    if ram.is_some() {
        v.checks.push(format!(
            "{} physical pages equal QEMU's memory ({} declared modified)",
            v.pages_equal, v.pages_declared_modified
        ));
    }
    Ok(present)
}

/// The workload: some of its pages were checked, and a bitmap dump holds exactly the pages in
/// use plus the page AddPages added.
fn check_workload(
    w: &Workload,
    present: &BTreeSet<u64>,
    dump_type: DumpType,
    v: &mut Verified,
) -> Result<(), VerifyError> {
    if v.workload_pages == 0 {
        return Err(mismatch("no workload page in the dump".into()));
    }
    v.checks.push(format!("{} workload pages hold their known content", v.workload_pages));
    if dump_type != DumpType::Bmp {
        return Ok(());
    }
    if let Some(pfn) = present.iter().find(|&&pfn| w.is_free(pfn)) {
        return Err(mismatch(format!("free page {pfn:#x} is in the bitmap dump")));
    }
    if !present.contains(&w.var_pfn) {
        return Err(mismatch(format!(
            "the page {:#x} added by AddPages is missing from the bitmap dump",
            w.var_pfn
        )));
    }
    let used = (w.start / PAGE as u64..w.end / PAGE as u64).filter(|&p| !w.is_free(p));
    if let Some(pfn) = used.clone().find(|p| !present.contains(p)) {
        return Err(mismatch(format!("page in use {pfn:#x} is missing from the bitmap dump")));
    }
    v.checks.push("bitmap holds exactly the pages in use plus the AddPages page".into());
    Ok(())
}

/// A guest variable read through the dump's own page tables (DirectoryTableBase).
fn check_variable(
    parser: &KernelDumpParser,
    va: u64,
    value: u64,
    v: &mut Verified,
) -> Result<(), VerifyError> {
    let dtb = parser.headers().directory_table_base;
    let reader = kdmp_parser::virt::Reader::with_dtb(parser, Gpa::new(dtb));
    let mut buf = [0u8; 8];
    reader
        .read_exact(Gva::new(va), &mut buf)
        .map_err(|e| mismatch(format!("virtual read of {va:#x} through the DTB failed: {e}")))?;
    if u64::from_le_bytes(buf) != value {
        return Err(mismatch(format!(
            "guest variable at {va:#x} reads {:#x} through the DTB, expected {value:#x}",
            u64::from_le_bytes(buf)
        )));
    }
    v.checks.push(format!("variable at {va:#x} = {value:#x} through DirectoryTableBase {dtb:#x}"));
    Ok(())
}

/// A secondary data block found by its GUID and, when the test knows them, its bytes.
fn check_secondary(
    bytes: &[u8],
    guid: &[u8; 16],
    contents: Option<&[u8]>,
    v: &mut Verified,
) -> Result<(), VerifyError> {
    let blob = crashmon_dump_writer::find_secondary_blob(bytes, guid)
        .ok_or_else(|| mismatch(format!("no secondary data block tagged {}", guid_string(guid))))?;
    if let Some(want) = contents {
        if blob != want {
            return Err(mismatch(format!(
                "secondary block {} holds {} bytes that differ from the expected {}",
                guid_string(guid),
                blob.len(),
                want.len()
            )));
        }
    }
    v.checks.push(format!("secondary data block {} ({} bytes)", guid_string(guid), blob.len()));
    Ok(())
}

/// A GUID in its usual text form, from its memory layout (Data1..3 little endian).
pub fn guid_string(g: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*g).braced().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crashmon_dump_writer::{
        self as dw, BugCheck, Context, DumpIoType, DumpKind, DumpPlan, Run, SecondaryBlob,
        WriteOrder,
    };
    use std::io::Write;

    struct Ram(Vec<u8>);
    impl dw::PhysicalMemory for Ram {
        fn page(&self, pfn: u64) -> &[u8] {
            let at = pfn as usize * PAGE;
            &self.0[at..at + PAGE]
        }
    }
    struct File_(Vec<u8>);
    impl dw::DumpSink for File_ {
        fn dump_io(&mut self, offset: u64, buffer: &[u8], _kind: DumpIoType) {
            let at = if offset == u64::MAX { self.0.len() } else { offset as usize };
            if self.0.len() < at + buffer.len() {
                self.0.resize(at + buffer.len(), 0);
            }
            self.0[at..at + buffer.len()].copy_from_slice(buffer);
        }
    }

    const GUID: [u8; 16] = *b"crashmon-test-id";

    /// 64 pages of RAM; page 1 is a PML4 / page 2 a PDPT / page 3 a PD mapping the first 2 MiB
    /// at virtual 0xffff800000000000; the variable sits in page 9.
    fn ram() -> Vec<u8> {
        let mut ram: Vec<u8> = (0..64 * PAGE).map(|i| (i * 31 / 7) as u8).collect();
        let put = |ram: &mut Vec<u8>, at: usize, v: u64| {
            ram[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        for p in 1..4 {
            ram[p * PAGE..(p + 1) * PAGE].fill(0);
        }
        put(&mut ram, PAGE + 256 * 8, (2 * PAGE as u64) | 3);
        put(&mut ram, 2 * PAGE, (3 * PAGE as u64) | 3);
        put(&mut ram, 3 * PAGE, 0x83); // 2 MiB page at physical 0
        put(&mut ram, 9 * PAGE + 16, 0x1234_5678_9abc_def0);
        ram
    }

    fn write(ram: &[u8], dir: &Path) -> (PathBuf, PathBuf) {
        let ctx = Context::zeroed();
        let plan = DumpPlan {
            kind: DumpKind::Full,
            order: WriteOrder::Sequential,
            bugcheck: BugCheck { code: 0xD1, parameters: [1, 2, 3, 4] },
            context: &ctx,
            directory_table_base: PAGE as u64,
            runs: &[Run { base_page: 0, page_count: 64 }],
            number_processors: 1,
            kd_debugger_data_block: 0,
            ps_loaded_module_list: 0,
            ps_active_process_head: 0,
            pfn_database: 0,
            secondary: &[SecondaryBlob { guid: GUID, data: b"driver state" }],
            system_time: 0,
            system_up_time: 0,
            chunk_size: 0x4000,
        };
        let mut scratch = vec![0u8; dw::scratch_size(&plan)];
        let mut out = File_(Vec::new());
        dw::write_dump(&plan, &Ram(ram.to_vec()), &mut scratch, &mut out).unwrap();
        let dump = dir.join("d.dmp");
        let image = dir.join("ram.bin");
        File::create(&dump).unwrap().write_all(&out.0).unwrap();
        File::create(&image).unwrap().write_all(ram).unwrap();
        (dump, image)
    }

    fn expected() -> Expected {
        Expected {
            dump_type: DumpType::Full,
            bugcheck_code: 0xD1,
            bugcheck_parameters: Some([1, 2, 3, 4]),
            modified_pfns: BTreeSet::new(),
            variable: Some((0xffff_8000_0000_0000 + 9 * PAGE as u64 + 16, 0x1234_5678_9abc_def0)),
            secondary: Some((GUID, Some(b"driver state".to_vec()))),
            workload: None,
        }
    }

    #[test]
    fn a_faithful_dump_passes_every_check() {
        let dir = tempfile::tempdir().unwrap();
        let (dump, image) = write(&ram(), dir.path());
        let v = verify(&dump, Some(&image), &expected()).unwrap();
        assert_eq!((v.pages, v.pages_equal), (64, 64));
        assert_eq!(v.checks.len(), 6, "{:?}", v.checks);
    }

    #[test]
    fn every_kind_of_lie_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let ram0 = ram();
        let (dump, image) = write(&ram0, dir.path());
        // QEMU saw different bytes in page 20 than the dump holds.
        let mut other = ram0.clone();
        other[20 * PAGE + 5] ^= 0xFF;
        std::fs::write(&image, &other).unwrap();
        let e = verify(&dump, Some(&image), &expected()).unwrap_err().to_string();
        assert!(e.contains("page 0x14 differs"), "{e}");
        // ... unless the guest declared it.
        let mut declared = expected();
        declared.modified_pfns.insert(20);
        assert_eq!(verify(&dump, Some(&image), &declared).unwrap().pages_declared_modified, 1);
        std::fs::write(&image, &ram0).unwrap();
        type Case = (fn(&mut Expected), &'static str);
        let cases: [Case; 5] = [
            (|e| e.bugcheck_code = 0x50, "bug-check code"),
            (|e| e.bugcheck_parameters = Some([1, 2, 3, 5]), "parameters"),
            (|e| e.dump_type = DumpType::Bmp, "dump type"),
            (|e| e.variable = Some((e.variable.unwrap().0, 7)), "guest variable"),
            (|e| e.secondary = Some((*b"some-other-guid!", None)), "no secondary"),
        ];
        for (change, needle) in cases {
            let mut e = expected();
            change(&mut e);
            let err = verify(&dump, Some(&image), &e).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // A truncated dump is refused.
        let bytes = std::fs::read(&dump).unwrap();
        std::fs::write(&dump, &bytes[..bytes.len() - PAGE]).unwrap();
        assert!(verify(&dump, Some(&image), &expected()).is_err());
    }

    #[test]
    fn workload_content_is_checked_word_by_word() {
        let dir = tempfile::tempdir().unwrap();
        let mut ram0 = ram();
        let seed = 0xfeed;
        for pfn in 16..64u64 {
            for i in 0..PAGE / 8 {
                let pa = pfn * PAGE as u64 + 8 * i as u64;
                let at = pa as usize;
                ram0[at..at + 8].copy_from_slice(&splitmix64(pa ^ seed).to_le_bytes());
            }
        }
        let mut e = expected();
        e.variable = None;
        e.workload = Some(Workload {
            start: 16 * PAGE as u64,
            end: 64 * PAGE as u64,
            seed,
            var_pfn: 9,
            zero_percent: 0,
        });
        let (dump, image) = write(&ram0, dir.path());
        assert_eq!(verify(&dump, Some(&image), &e).unwrap().workload_pages, 48);
        assert_eq!(verify(&dump, None, &e).unwrap().pages_equal, 0, "no image, no comparison");
        let mut bad = ram0.clone();
        bad[40 * PAGE + 8] ^= 1; // the dump and QEMU agree, but the content is not the workload's
        let (dump, _) = write(&bad, dir.path());
        let err = verify(&dump, None, &e).unwrap_err().to_string();
        assert!(err.contains("workload page 0x28"), "{err}");
    }

    #[test]
    fn splitmix64_reference_values() {
        // First outputs of the reference generator seeded with 0 (state += golden gamma).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn guid_text() {
        let g = [0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(guid_string(&g), "{12345678-9abc-def0-0102-030405060708}");
        assert_eq!(
            guid_string(&crate::scenario::DRIVER_GUID),
            "{c4a50d01-6372-4d53-9d6d-6f6e64727631}"
        );
        assert_eq!(
            guid_string(&crate::scenario::REPORT_GUID),
            "{c4a50d02-6775-4573-8000-7265706f7274}"
        );
    }
}
