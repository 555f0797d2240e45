//! Writes full and bitmap dumps of a synthetic physical memory (three runs with holes, real
//! 4-level page tables) in both write orders, and reads them back with kdmp-parser.

use std::collections::BTreeSet;
use std::io::Write as _;

use crashmon_dump_writer::format::{blob, header64 as h, summary_dump64 as sd};
use crashmon_dump_writer::{
    find_secondary_blob, layout, primary_data_end, scratch_size, secondary_blobs, write_dump,
    BugCheck, Context, DumpError, DumpIoType, DumpKind, DumpPlan, DumpSink, PhysicalMemory, Run,
    SecondaryBlob, WriteOrder, CONTEXT_ALL, HEADER_SIZE, MAX_RUNS, PAGE_SIZE,
};
use kdmp_parser::gxa::{Gpa, Gva};
use kdmp_parser::parse::KernelDumpParser;
use kdmp_parser::structs::DumpType;
use kdmp_parser::{phys, virt};

const PAGE: u64 = PAGE_SIZE as u64;

/// Three runs with holes before, between and after them: 0x59F pages, about 5.6 MiB.
const RUNS: [Run; 3] = [
    Run { base_page: 0x1, page_count: 0x9F },
    Run { base_page: 0x100, page_count: 0x300 },
    Run { base_page: 0x1000, page_count: 0x200 },
];

/// The page tables: PML4, PDPT, PD and PT in run 1.
const PML4_PFN: u64 = 0x110;
const PDPT_PFN: u64 = 0x111;
const PD_PFN: u64 = 0x112;
const PT_PFN: u64 = 0x113;
/// A kernel virtual page mapped with a 4 KiB PTE to PFN 0x1100 (run 2).
const VA_SMALL: u64 = 0xFFFF_F800_1234_5000;
const SMALL_PFN: u64 = 0x1100;
/// A 2 MiB large page (PDE with PS) mapped to physical 0x200000 (PFNs 0x200..0x400, run 1).
const VA_LARGE: u64 = 0xFFFF_F800_1260_0000;
const LARGE_PHYS: u64 = 0x20_0000;
const KNOWN: &[u8] = b"crashmon: the bytes at the known virtual address";
const KNOWN_OFFSET: u64 = 0x678;
/// An empty `LIST_ENTRY` (pointing at itself) that `PsLoadedModuleList` names.
const MODULE_LIST_OFFSET: u64 = 0x100;

const GUID_A: [u8; 16] = *b"crashmon-blob-A\0";
const GUID_B: [u8; 16] = *b"crashmon-blob-B\0";
const GUID_C: [u8; 16] = *b"crashmon-blob-C\0";

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Synthetic physical memory: one contiguous buffer per run.
struct Memory {
    runs: Vec<Run>,
    data: Vec<Vec<u8>>,
    /// Whether `pages` lends several pages at once.
    contiguous: bool,
}

impl Memory {
    fn new(runs: &[Run]) -> Self {
        let data = runs
            .iter()
            .map(|r| {
                let mut d = vec![0u8; (r.page_count * PAGE) as usize];
                for (i, word) in d.chunks_exact_mut(8).enumerate() {
                    let v = splitmix(r.base_page * 512 + i as u64);
                    word.copy_from_slice(&v.to_le_bytes());
                }
                d
            })
            .collect();
        Self { runs: runs.to_vec(), data, contiguous: true }
    }

    fn locate(&self, pfn: u64) -> Option<(usize, usize)> {
        self.runs.iter().enumerate().find_map(|(i, r)| {
            (pfn >= r.base_page && pfn < r.base_page + r.page_count)
                .then(|| (i, ((pfn - r.base_page) * PAGE) as usize))
        })
    }

    fn page_mut(&mut self, pfn: u64) -> &mut [u8] {
        let (r, o) = self.locate(pfn).expect("pfn in a run");
        &mut self.data[r][o..o + PAGE_SIZE]
    }

    fn write_phys(&mut self, addr: u64, bytes: &[u8]) {
        let o = (addr % PAGE) as usize;
        self.page_mut(addr / PAGE)[o..o + bytes.len()].copy_from_slice(bytes);
    }

    fn write_u64(&mut self, addr: u64, v: u64) {
        self.write_phys(addr, &v.to_le_bytes());
    }

    /// The guest's memory with page tables mapping `VA_SMALL` and `VA_LARGE`.
    fn with_page_tables() -> Self {
        let mut m = Self::new(&RUNS);
        for pfn in [PML4_PFN, PDPT_PFN, PD_PFN, PT_PFN] {
            m.page_mut(pfn).fill(0);
        }
        let idx = |va: u64, level: u32| (va >> (12 + 9 * level)) & 0x1FF;
        const P_RW: u64 = 0x3;
        const PS: u64 = 0x80;
        assert_eq!(idx(VA_SMALL, 3), idx(VA_LARGE, 3));
        assert_eq!(idx(VA_SMALL, 2), idx(VA_LARGE, 2));
        m.write_u64(PML4_PFN * PAGE + 8 * idx(VA_SMALL, 3), (PDPT_PFN * PAGE) | P_RW);
        m.write_u64(PDPT_PFN * PAGE + 8 * idx(VA_SMALL, 2), (PD_PFN * PAGE) | P_RW);
        m.write_u64(PD_PFN * PAGE + 8 * idx(VA_SMALL, 1), (PT_PFN * PAGE) | P_RW);
        m.write_u64(PT_PFN * PAGE + 8 * idx(VA_SMALL, 0), (SMALL_PFN * PAGE) | P_RW);
        m.write_u64(PD_PFN * PAGE + 8 * idx(VA_LARGE, 1), LARGE_PHYS | P_RW | PS);
        m.write_phys(SMALL_PFN * PAGE + KNOWN_OFFSET, KNOWN);
        let list = VA_SMALL + MODULE_LIST_OFFSET;
        m.write_u64(SMALL_PFN * PAGE + MODULE_LIST_OFFSET, list);
        m.write_u64(SMALL_PFN * PAGE + MODULE_LIST_OFFSET + 8, list);
        m
    }

    fn all_pfns(&self) -> Vec<u64> {
        self.runs.iter().flat_map(|r| r.base_page..r.base_page + r.page_count).collect()
    }
}

impl PhysicalMemory for Memory {
    fn page(&self, pfn: u64) -> &[u8] {
        let (r, o) = self.locate(pfn).expect("asked only for pages in runs");
        &self.data[r][o..o + PAGE_SIZE]
    }

    fn pages(&self, first_pfn: u64, count: u64) -> Option<&[u8]> {
        if !self.contiguous {
            return None;
        }
        let (r, o) = self.locate(first_pfn).expect("asked only for pages in runs");
        let len = (count * PAGE) as usize;
        assert!(o + len <= self.data[r].len(), "asked for pages across a run's end");
        Some(&self.data[r][o..o + len])
    }
}

/// An in-memory dump file: explicit offsets land where they say, `u64::MAX` appends.
#[derive(Default)]
struct FileSink {
    file: Vec<u8>,
    calls: Vec<(u64, usize, DumpIoType)>,
    fail_after: Option<usize>,
}

impl DumpSink for FileSink {
    fn dump_io(&mut self, offset: u64, buffer: &[u8], kind: DumpIoType) {
        self.calls.push((offset, buffer.len(), kind));
        if kind == DumpIoType::Complete {
            return;
        }
        let at = if offset == u64::MAX { self.file.len() } else { offset as usize };
        if self.file.len() < at + buffer.len() {
            self.file.resize(at + buffer.len(), 0);
        }
        self.file[at..at + buffer.len()].copy_from_slice(buffer);
    }

    fn failed(&self) -> bool {
        self.fail_after.is_some_and(|n| self.calls.len() >= n)
    }
}

fn context() -> Context {
    let mut c = Context::zeroed();
    c.context_flags = CONTEXT_ALL;
    c.seg_cs = 0x10;
    c.seg_ss = 0x18;
    c.seg_ds = 0x2B;
    c.seg_es = 0x2B;
    c.seg_fs = 0x53;
    c.seg_gs = 0x2B;
    c.eflags = 0x0004_0246;
    c.mx_csr = 0x1F80;
    c.rax = 0x1111_2222_3333_4444;
    c.rbx = 0xB;
    c.rcx = 0xC;
    c.rdx = 0xD;
    c.r15 = 0xF15;
    c.rsp = 0xFFFF_F800_1234_5F00;
    c.rbp = 0xFFFF_F800_1234_5F80;
    c.rip = VA_SMALL + KNOWN_OFFSET;
    c
}

fn blobs() -> Vec<(Vec<u8>, [u8; 16])> {
    vec![
        (b"five!".to_vec(), GUID_A),
        ((0..10_000u32).map(|i| (i * 7 % 251) as u8).collect(), GUID_B),
        (Vec::new(), GUID_C),
    ]
}

const BUGCHECK: BugCheck =
    BugCheck { code: 0xE2, parameters: [0x1111, 0xFFFF_F800_0000_2222, 0x3333, 0x4444] };

fn plan<'a>(
    kind: DumpKind<'a>,
    order: WriteOrder,
    context: &'a Context,
    secondary: &'a [SecondaryBlob<'a>],
    chunk_size: usize,
) -> DumpPlan<'a> {
    DumpPlan {
        kind,
        order,
        bugcheck: BUGCHECK,
        context,
        directory_table_base: PML4_PFN * PAGE,
        runs: &RUNS,
        number_processors: 2,
        kd_debugger_data_block: 0,
        ps_loaded_module_list: VA_SMALL + MODULE_LIST_OFFSET,
        ps_active_process_head: 0,
        pfn_database: 0xFFFF_FA80_0000_0000,
        secondary,
        system_time: 0x01DB_0000_1234_5678,
        system_up_time: 0x0000_0001_2345_6789,
        chunk_size,
    }
}

fn write(plan: &DumpPlan, memory: &Memory) -> (FileSink, u64) {
    let mut scratch = vec![0xEEu8; scratch_size(plan) + 123];
    let mut sink = FileSink::default();
    let size = write_dump(plan, memory, &mut scratch, &mut sink).expect("dump written");
    (sink, size)
}

/// The bitmap the bitmap dumps use: two pages in three, plus every page the checks need.
fn test_bitmap(memory: &Memory) -> (Vec<u8>, BTreeSet<u64>) {
    let needed = [PML4_PFN, PDPT_PFN, PD_PFN, PT_PFN, SMALL_PFN, LARGE_PHYS / PAGE + 1];
    let end = RUNS[2].base_page + RUNS[2].page_count;
    let mut bitmap = vec![0u8; end.div_ceil(8) as usize];
    let mut set = BTreeSet::new();
    for pfn in memory.all_pfns() {
        if pfn % 3 != 0 || needed.contains(&pfn) {
            bitmap[(pfn / 8) as usize] |= 1 << (pfn % 8);
            set.insert(pfn);
        }
    }
    (bitmap, set)
}

/// Collapses the call kinds into their sequence of distinct runs.
fn kind_runs(calls: &[(u64, usize, DumpIoType)]) -> Vec<DumpIoType> {
    let mut out: Vec<DumpIoType> = Vec::new();
    for &(_, _, k) in calls {
        if out.last() != Some(&k) {
            out.push(k);
        }
    }
    out
}

fn check_calls(sink: &FileSink, plan: &DumpPlan) {
    let calls = &sink.calls;
    let last = *calls.last().unwrap();
    assert_eq!(last, (u64::MAX, 0, DumpIoType::Complete), "the last call completes the dump");
    assert_eq!(calls.iter().filter(|c| c.2 == DumpIoType::Complete).count(), 1);
    let data_calls = &calls[..calls.len() - 1];
    assert!(data_calls.iter().all(|c| c.1 > 0), "no empty data call");
    let header_calls: Vec<_> = data_calls.iter().filter(|c| c.2 == DumpIoType::Header).collect();
    assert_eq!(header_calls.len(), 1, "the header goes out in one call");
    assert_eq!(header_calls[0].1, scratch_size(plan));
    for c in data_calls.iter().filter(|c| c.2 != DumpIoType::Header) {
        assert!(c.1 <= plan.chunk_size, "call of {:#x} bytes exceeds the chunk size", c.1);
    }
    for c in data_calls.iter().filter(|c| c.2 == DumpIoType::Body) {
        assert_eq!(c.1 % PAGE_SIZE, 0, "body calls carry whole pages");
    }
    let with_secondary = !plan.secondary.is_empty();
    match plan.order {
        WriteOrder::Sequential => {
            assert!(data_calls.iter().all(|c| c.0 == u64::MAX), "sequential offsets are -1");
            let mut expected = vec![DumpIoType::Header, DumpIoType::Body];
            if with_secondary {
                expected.push(DumpIoType::SecondaryData);
            }
            expected.push(DumpIoType::Complete);
            assert_eq!(kind_runs(calls), expected);
        }
        WriteOrder::OutOfOrder => {
            assert!(data_calls.iter().all(|c| c.0 != u64::MAX), "explicit offsets everywhere");
            let mut expected = vec![DumpIoType::Body, DumpIoType::Header];
            if with_secondary {
                expected.push(DumpIoType::SecondaryData);
            }
            expected.push(DumpIoType::Complete);
            assert_eq!(kind_runs(calls), expected);
            let body: Vec<u64> =
                data_calls.iter().filter(|c| c.2 == DumpIoType::Body).map(|c| c.0).collect();
            assert!(body.windows(2).all(|w| w[0] > w[1]), "body written back to front");
            assert_eq!(header_calls[0].0, 0);
            let secondary: Vec<u64> = data_calls
                .iter()
                .filter(|c| c.2 == DumpIoType::SecondaryData)
                .map(|c| c.0)
                .collect();
            assert!(secondary.windows(2).all(|w| w[0] > w[1]), "secondary written back to front");
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn parse(bytes: &[u8]) -> (tempfile::NamedTempFile, KernelDumpParser) {
    let mut tmp = tempfile::Builder::new().suffix(".dmp").tempfile().unwrap();
    tmp.write_all(bytes).unwrap();
    tmp.flush().unwrap();
    let parser = KernelDumpParser::new(tmp.path()).expect("kdmp-parser reads the dump");
    (tmp, parser)
}

/// Everything a reader of the dump can check.
fn check_dump(plan: &DumpPlan, memory: &Memory, bytes: &[u8], pages: &BTreeSet<u64>) {
    let lay = layout(plan).unwrap();
    assert_eq!(bytes.len() as u64, lay.file_size);

    // Raw header fields kdmp-parser does not interpret.
    assert_eq!(&bytes[..8], b"PAGEDU64");
    assert_eq!(u32_at(bytes, h::MAJOR_VERSION), 0xF);
    assert_eq!(u32_at(bytes, h::MINOR_VERSION), 26100);
    assert_eq!(u32_at(bytes, h::MACHINE_IMAGE_TYPE), 0x8664);
    assert_eq!(&bytes[h::VERSION_USER..h::VERSION_USER + 8], b"PAGEPAGE");
    assert_eq!(&bytes[h::COMMENT..h::COMMENT + 128], &b"PAGE".repeat(32)[..]);
    assert_eq!(&bytes[0x3C..0x40], b"PAGE", "alignment gap keeps the pattern");
    assert_eq!(&bytes[HEADER_SIZE - 4..HEADER_SIZE], b"PAGE");
    let ctx_end = h::CONTEXT_RECORD + crashmon_dump_writer::CONTEXT_SIZE;
    assert_eq!(&bytes[ctx_end..ctx_end + 4], b"PAGE");
    let runs_end = h::PHYSICAL_MEMORY_BLOCK + 0x10 + RUNS.len() * 0x10;
    assert_eq!(&bytes[runs_end..runs_end + 4], b"PAGE");
    assert_eq!(u64_at(bytes, h::PHYSICAL_MEMORY_BLOCK + 8), 0x59F);
    let mut ctx_bytes = [0u8; crashmon_dump_writer::CONTEXT_SIZE];
    ctx_bytes.copy_from_slice(&bytes[h::CONTEXT_RECORD..ctx_end]);
    assert_eq!(&Context::from_bytes(&ctx_bytes), plan.context);

    let (_file, parser) = parse(bytes);
    let hd = parser.headers();
    match plan.kind {
        DumpKind::Full => assert_eq!(parser.dump_type(), DumpType::Full),
        DumpKind::Bitmap { .. } => {
            assert_eq!(parser.dump_type(), DumpType::Bmp);
            assert_eq!(&bytes[HEADER_SIZE..HEADER_SIZE + 8], b"SDMPDUMP");
            assert_eq!(u64_at(bytes, HEADER_SIZE + sd::FIRST_PAGE), lay.first_page);
            assert_eq!(u64_at(bytes, HEADER_SIZE + sd::TOTAL_PRESENT_PAGES), pages.len() as u64);
            assert_eq!(u64_at(bytes, HEADER_SIZE + sd::PAGES), 0x1200);
        }
    }
    assert_eq!(hd.bug_check_code, BUGCHECK.code);
    assert_eq!(hd.bug_check_code_parameters, BUGCHECK.parameters);
    assert_eq!(hd.directory_table_base, PML4_PFN * PAGE);
    assert_eq!(hd.number_processors, 2);
    assert_eq!(hd.pfn_database, plan.pfn_database);
    assert_eq!(hd.ps_loaded_module_list, plan.ps_loaded_module_list);
    assert_eq!(hd.ps_active_process_head, 0);
    assert_eq!(hd.kd_debugger_data_block, 0);
    assert_eq!(hd.required_dump_space, bytes.len() as i64);
    assert_eq!(hd.system_time, plan.system_time as i64);
    assert_eq!(hd.system_up_time, plan.system_up_time as i64);
    assert_eq!(hd.major_version, 0xF);
    assert_eq!(hd.machine_image_type, 0x8664);

    let ctx = parser.context_record();
    assert_eq!(ctx.rip, plan.context.rip);
    assert_eq!(ctx.rsp, plan.context.rsp);
    assert_eq!(ctx.rax, plan.context.rax);
    assert_eq!(ctx.r15, plan.context.r15);
    assert_eq!(ctx.context_flags, CONTEXT_ALL);
    assert_eq!((ctx.seg_cs, ctx.seg_ss, ctx.seg_gs), (0x10, 0x18, 0x2B));
    assert_eq!(ctx.eflags, plan.context.eflags);
    assert_eq!(ctx.mxcsr, 0x1F80);

    let exr = parser.exception_record();
    assert_eq!(exr.exception_code, BUGCHECK.code);
    assert_eq!(exr.exception_address, plan.context.rip);
    assert_eq!(exr.number_parameters, 4);
    assert_eq!(exr.exception_information[..4], BUGCHECK.parameters);

    // Exactly the expected pages, each equal to the synthetic memory.
    let in_dump: BTreeSet<u64> = parser.physmem().map(|(gpa, _)| gpa.pfn()).collect();
    assert_eq!(&in_dump, pages, "the dump holds exactly the selected pages");
    for (gpa, offset) in parser.physmem() {
        let o = offset as usize;
        assert_eq!(&bytes[o..o + PAGE_SIZE], memory.page(gpa.pfn()), "page {:#x}", gpa.pfn());
    }
    let phys = phys::Reader::new(&parser);
    for &pfn in pages.iter().step_by(97) {
        let mut buf = vec![0u8; PAGE_SIZE];
        phys.read_exact(Gpa::new(pfn * PAGE), &mut buf).unwrap();
        assert_eq!(buf, memory.page(pfn));
    }
    let missing = memory.all_pfns().into_iter().find(|p| !pages.contains(p));
    for pfn in missing.into_iter().chain([0, 0xA0, 0x500, 0x1200]) {
        let mut b = [0u8; 8];
        assert!(phys.read_exact(Gpa::new(pfn * PAGE), &mut b).is_err(), "PFN {pfn:#x} absent");
    }

    // Virtual reads through the directory table base: a 4 KiB page and a 2 MiB page.
    let virt = virt::Reader::new(&parser);
    let mut buf = vec![0u8; KNOWN.len()];
    virt.read_exact(Gva::new(VA_SMALL + KNOWN_OFFSET), &mut buf).unwrap();
    assert_eq!(buf, KNOWN);
    let mut buf = [0u8; 64];
    virt.read_exact(Gva::new(VA_LARGE + 0x1234), &mut buf).unwrap();
    assert_eq!(&buf[..], &memory.page(LARGE_PHYS / PAGE + 1)[0x234..0x274]);
    assert_eq!(parser.kernel_modules().len(), 0, "the module list is empty");
    let t = virt.translate(Gva::new(VA_SMALL)).unwrap();
    assert_eq!(t.pfn.u64(), SMALL_PFN);

    // Secondary data.
    assert_eq!(primary_data_end(bytes), Some(lay.secondary_offset));
    let found: Vec<SecondaryBlob> = secondary_blobs(bytes).collect();
    assert_eq!(found.len(), plan.secondary.len());
    for (f, b) in found.iter().zip(plan.secondary) {
        assert_eq!(f, b);
        assert_eq!(find_secondary_blob(bytes, &b.guid), Some(b.data));
    }
    assert_eq!(find_secondary_blob(bytes, &[0x42; 16]), None);
}

#[test]
fn full_and_bitmap_dumps_in_both_orders_parse_with_kdmp_parser() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let blob_data = blobs();
    let secondary: Vec<SecondaryBlob> =
        blob_data.iter().map(|(d, g)| SecondaryBlob { guid: *g, data: d }).collect();
    let (bitmap, selected) = test_bitmap(&memory);
    let all: BTreeSet<u64> = memory.all_pfns().into_iter().collect();
    let kinds = [(DumpKind::Full, &all), (DumpKind::Bitmap { bitmap: &bitmap }, &selected)];
    for (kind, pages) in kinds {
        for order in [WriteOrder::Sequential, WriteOrder::OutOfOrder] {
            let p = plan(kind, order, &ctx, &secondary, 0x10000);
            let (sink, size) = write(&p, &memory);
            assert_eq!(size, sink.file.len() as u64);
            check_calls(&sink, &p);
            check_dump(&p, &memory, &sink.file, pages);
        }
    }
}

#[test]
fn dumps_without_secondary_data_end_with_the_primary_data() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let (bitmap, selected) = test_bitmap(&memory);
    let all: BTreeSet<u64> = memory.all_pfns().into_iter().collect();
    for (kind, pages) in [(DumpKind::Full, &all), (DumpKind::Bitmap { bitmap: &bitmap }, &selected)]
    {
        for order in [WriteOrder::Sequential, WriteOrder::OutOfOrder] {
            let p = plan(kind, order, &ctx, &[], 0x4000);
            let (sink, size) = write(&p, &memory);
            let lay = layout(&p).unwrap();
            assert_eq!(size, lay.secondary_offset);
            assert_eq!(lay.secondary_size, 0);
            check_calls(&sink, &p);
            check_dump(&p, &memory, &sink.file, pages);
            assert_eq!(secondary_blobs(&sink.file).count(), 0);
        }
    }
}

#[test]
fn sequential_and_out_of_order_files_are_byte_identical() {
    let mut memory = Memory::with_page_tables();
    let ctx = context();
    let blob_data = blobs();
    let secondary: Vec<SecondaryBlob> =
        blob_data.iter().map(|(d, g)| SecondaryBlob { guid: *g, data: d }).collect();
    let (bitmap, _) = test_bitmap(&memory);
    // A bitmap longer than needed (trailing zero bytes) is fine.
    let mut long_bitmap = bitmap.clone();
    long_bitmap.extend_from_slice(&[0; 100]);
    for kind in [
        DumpKind::Full,
        DumpKind::Bitmap { bitmap: &bitmap },
        DumpKind::Bitmap { bitmap: &long_bitmap },
    ] {
        let mut reference: Option<Vec<u8>> = None;
        for contiguous in [true, false] {
            memory.contiguous = contiguous;
            for chunk in [0x1000, 0x3000, 0x10000, 0x100000] {
                for order in [WriteOrder::Sequential, WriteOrder::OutOfOrder] {
                    let p = plan(kind, order, &ctx, &secondary, chunk);
                    let (sink, _) = write(&p, &memory);
                    check_calls(&sink, &p);
                    match &reference {
                        None => reference = Some(sink.file),
                        Some(r) => assert!(
                            *r == sink.file,
                            "{kind:?} {order:?} chunk {chunk:#x} contiguous {contiguous} differs"
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn one_page_per_call_without_contiguous_memory() {
    let mut memory = Memory::with_page_tables();
    memory.contiguous = false;
    let ctx = context();
    let p = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &[], 0x10000);
    let (sink, _) = write(&p, &memory);
    let body: Vec<_> = sink.calls.iter().filter(|c| c.2 == DumpIoType::Body).collect();
    assert_eq!(body.len(), 0x59F);
    assert!(body.iter().all(|c| c.1 == PAGE_SIZE));
}

#[test]
fn a_bitmap_selecting_everything_matches_the_full_dump_pages() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let mut bitmap = vec![0u8; 0x1200 / 8];
    for pfn in memory.all_pfns() {
        bitmap[(pfn / 8) as usize] |= 1 << (pfn % 8);
    }
    let all: BTreeSet<u64> = memory.all_pfns().into_iter().collect();
    let p = plan(DumpKind::Bitmap { bitmap: &bitmap }, WriteOrder::OutOfOrder, &ctx, &[], 0x8000);
    let (sink, _) = write(&p, &memory);
    check_dump(&p, &memory, &sink.file, &all);
    // The pages themselves are the full dump's, after a longer header region.
    let full = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &[], 0x8000);
    let (full_sink, _) = write(&full, &memory);
    let first = layout(&p).unwrap().first_page as usize;
    assert_eq!(&sink.file[first..], &full_sink.file[HEADER_SIZE..]);
}

#[test]
fn scratch_size_rule() {
    let ctx = context();
    let p = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &[], 0x1000);
    assert_eq!(scratch_size(&p), HEADER_SIZE);
    let bitmap = vec![0u8; 0x240];
    let p = plan(DumpKind::Bitmap { bitmap: &bitmap }, WriteOrder::Sequential, &ctx, &[], 0x1000);
    // 0x38 + 0x240 bytes of bitmap header and bitmap fit in one page.
    assert_eq!(scratch_size(&p), HEADER_SIZE + PAGE_SIZE);
    assert_eq!(layout(&p).unwrap().first_page, (HEADER_SIZE + PAGE_SIZE) as u64);
    // 4 GiB ending at PFN 0x100000: 0x20000 bytes of bitmap.
    let runs = [Run { base_page: 0, page_count: 0x10_0000 }];
    let big = vec![0u8; 0x20000];
    let mut p = plan(DumpKind::Bitmap { bitmap: &big }, WriteOrder::Sequential, &ctx, &[], 0x1000);
    p.runs = &runs;
    assert_eq!(scratch_size(&p), HEADER_SIZE + 0x21000);
    assert_eq!(layout(&p).unwrap().first_page, (HEADER_SIZE + 0x21000) as u64);
}

fn expect_error(p: &DumpPlan, memory: &Memory, scratch_len: usize, expected: DumpError) {
    let mut scratch = vec![0u8; scratch_len];
    let mut sink = FileSink::default();
    assert_eq!(write_dump(p, memory, &mut scratch, &mut sink), Err(expected));
    assert!(sink.calls.is_empty(), "an invalid plan makes no call ({expected:?})");
    let _ = expected.to_string();
}

#[test]
fn bad_plans_are_refused_before_any_call() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let base = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &[], 0x10000);
    let s = HEADER_SIZE;

    for chunk_size in [0, 0x800, 0x1800, 0x1_0000_1000] {
        let p = DumpPlan { chunk_size, ..base };
        expect_error(&p, &memory, s, DumpError::BadChunkSize { chunk_size });
    }

    expect_error(&DumpPlan { runs: &[], ..base }, &memory, s, DumpError::NoRuns);

    let overlap = [RUNS[0], Run { base_page: 0x90, page_count: 0x20 }];
    let p = DumpPlan { runs: &overlap, ..base };
    expect_error(&p, &memory, s, DumpError::RunsOverlapOrUnsorted { index: 1 });

    let unsorted = [RUNS[1], RUNS[0]];
    let p = DumpPlan { runs: &unsorted, ..base };
    expect_error(&p, &memory, s, DumpError::RunsOverlapOrUnsorted { index: 1 });

    let empty = [RUNS[0], Run { base_page: 0x200, page_count: 0 }];
    let p = DumpPlan { runs: &empty, ..base };
    expect_error(&p, &memory, s, DumpError::EmptyRun { index: 1 });

    let huge = [Run { base_page: u64::MAX - 1, page_count: 4 }];
    let p = DumpPlan { runs: &huge, ..base };
    expect_error(&p, &memory, s, DumpError::RunOutOfRange { index: 0 });
    let past = [Run { base_page: (1 << 40) - 1, page_count: 2 }];
    let p = DumpPlan { runs: &past, ..base };
    expect_error(&p, &memory, s, DumpError::RunOutOfRange { index: 0 });

    let many: Vec<Run> =
        (0..=MAX_RUNS as u64).map(|i| Run { base_page: i * 2, page_count: 1 }).collect();
    let p = DumpPlan { runs: &many, ..base };
    expect_error(&p, &memory, s, DumpError::TooManyRuns { count: MAX_RUNS + 1, max: MAX_RUNS });
    // The maximum itself is fine.
    assert!(layout(&DumpPlan { runs: &many[..MAX_RUNS], ..base }).is_ok());

    let (bitmap, _) = test_bitmap(&memory);
    let short = &bitmap[..bitmap.len() - 1];
    let p = DumpPlan { kind: DumpKind::Bitmap { bitmap: short }, ..base };
    expect_error(&p, &memory, 0x10000, DumpError::BitmapTooShort { needed: 0x240, got: 0x23F });

    for outside in [0u64, 0xA0, 0xFF, 0x400, 0xFFF, 0x1200, 0x1234] {
        let mut b = bitmap.clone();
        b.resize(0x300, 0);
        b[(outside / 8) as usize] |= 1 << (outside % 8);
        let p = DumpPlan { kind: DumpKind::Bitmap { bitmap: &b }, ..base };
        expect_error(&p, &memory, 0x10000, DumpError::BitmapPageOutsideRuns { pfn: outside });
    }

    let p = DumpPlan { kind: DumpKind::Bitmap { bitmap: &bitmap }, ..base };
    let needed = scratch_size(&p);
    expect_error(&p, &memory, needed - 1, DumpError::ScratchTooSmall { needed, got: needed - 1 });
    expect_error(&base, &memory, 0, DumpError::ScratchTooSmall { needed: s, got: 0 });
}

#[test]
fn failures_while_writing_leave_the_dump_incomplete() {
    /// Memory whose page 0x150 is short.
    struct Broken(Memory);
    impl PhysicalMemory for Broken {
        fn page(&self, pfn: u64) -> &[u8] {
            let p = self.0.page(pfn);
            if pfn == 0x150 {
                &p[..100]
            } else {
                p
            }
        }
    }
    let memory = Memory::with_page_tables();
    let ctx = context();
    let p = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &[], 0x10000);
    let mut scratch = vec![0u8; HEADER_SIZE];
    let mut sink = FileSink::default();
    let broken = Broken(memory);
    let r = write_dump(&p, &broken, &mut scratch, &mut sink);
    assert_eq!(r, Err(DumpError::BadPage { pfn: 0x150, expected: PAGE, got: 100 }));
    assert!(sink.calls.iter().all(|c| c.2 != DumpIoType::Complete));

    /// Memory whose `pages` lends a slice of the wrong length.
    struct BadPages(Memory);
    impl PhysicalMemory for BadPages {
        fn page(&self, pfn: u64) -> &[u8] {
            self.0.page(pfn)
        }
        fn pages(&self, first_pfn: u64, _count: u64) -> Option<&[u8]> {
            Some(self.0.page(first_pfn))
        }
    }
    let mut sink = FileSink::default();
    let r = write_dump(&p, &BadPages(broken.0), &mut scratch, &mut sink);
    assert_eq!(r, Err(DumpError::BadPage { pfn: 1, expected: 0x10000, got: PAGE_SIZE }));

    let memory = Memory::with_page_tables();
    let mut sink = FileSink { fail_after: Some(5), ..Default::default() };
    let r = write_dump(&p, &memory, &mut scratch, &mut sink);
    assert_eq!(r, Err(DumpError::SinkFailed));
    assert_eq!(sink.calls.len(), 5, "writing stops at the first failure");
}

#[test]
fn secondary_blob_layout_on_disk() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let data = b"0123456789abc";
    let secondary =
        [SecondaryBlob { guid: GUID_A, data }, SecondaryBlob { guid: GUID_B, data: &data[..8] }];
    let p = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &secondary, 0x10000);
    let (sink, size) = write(&p, &memory);
    let f = &sink.file;
    let at = (HEADER_SIZE as u64 + 0x59F * PAGE) as usize;
    assert_eq!(&f[at..at + 8], b"DumpBlob");
    assert_eq!(u32_at(f, at + 8), 0x10);
    assert_eq!(u32_at(f, at + 12), 0xF000_0000 | 26100);
    let b0 = at + blob::FILE_HEADER_SIZE;
    assert_eq!(u32_at(f, b0), 0x20);
    assert_eq!(&f[b0 + 4..b0 + 20], &GUID_A);
    assert_eq!((u32_at(f, b0 + 0x14), u32_at(f, b0 + 0x18), u32_at(f, b0 + 0x1C)), (13, 0, 3));
    assert_eq!(&f[b0 + 0x20..b0 + 0x20 + 13], data);
    assert_eq!(&f[b0 + 0x2D..b0 + 0x30], &[0, 0, 0]);
    let b1 = b0 + 0x30;
    assert_eq!(b1 % 8, 0);
    assert_eq!(&f[b1 + 4..b1 + 20], &GUID_B);
    assert_eq!((u32_at(f, b1 + 0x14), u32_at(f, b1 + 0x1C)), (8, 0));
    assert_eq!(size as usize, b1 + 0x28);
    assert_eq!(f.len(), b1 + 0x28);
    assert_eq!(u64_at(f, h::REQUIRED_DUMP_SPACE), size);
}

#[test]
fn blob_reader_never_panics_on_damaged_files() {
    let memory = Memory::with_page_tables();
    let ctx = context();
    let blob_data = blobs();
    let secondary: Vec<SecondaryBlob> =
        blob_data.iter().map(|(d, g)| SecondaryBlob { guid: *g, data: d }).collect();
    let p = plan(DumpKind::Full, WriteOrder::Sequential, &ctx, &secondary, 0x10000);
    let (sink, _) = write(&p, &memory);
    let file = sink.file;
    let start = primary_data_end(&file).unwrap() as usize;

    // Truncations: every blob that is still whole is found, none past the cut.
    for cut in (start..file.len()).step_by(3).chain([0, 7, 0x100, HEADER_SIZE]) {
        let found: Vec<_> = secondary_blobs(&file[..cut]).collect();
        assert!(found.len() <= secondary.len());
        for (f, b) in found.iter().zip(&secondary) {
            assert_eq!(f, b);
        }
    }
    // Corruptions of every byte of the blob area, one at a time.
    for i in start..start + 0x60 {
        for v in [0x00, 0xFF, 0x7F, 0x10] {
            let mut damaged = file.clone();
            damaged[i] = v;
            let _ = secondary_blobs(&damaged).count();
            let _ = find_secondary_blob(&damaged, &GUID_B);
        }
    }
    // Header damage.
    for (at, v) in [(0usize, 0u8), (h::DUMP_TYPE, 9), (h::PHYSICAL_MEMORY_BLOCK, 0xFF)] {
        let mut damaged = file.clone();
        damaged[at] = v;
        let _ = find_secondary_blob(&damaged, &GUID_A);
    }
    let mut damaged = file.clone();
    damaged[h::REQUIRED_DUMP_SPACE..h::REQUIRED_DUMP_SPACE + 8].copy_from_slice(&[0xFF; 8]);
    assert_eq!(find_secondary_blob(&damaged, &GUID_B), Some(&blob_data[1].0[..]));
    assert_eq!(find_secondary_blob(&[], &GUID_A), None);
    assert_eq!(find_secondary_blob(&[0xAB; 0x3000], &GUID_A), None);
}
